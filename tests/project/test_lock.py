"""requirements.lock is the install CI tests: it must pin every package pyproject.toml asks for
(dev extra included), each inside its range, and torch must stay the CPU wheel."""

from __future__ import annotations

import re

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.helpers.paths import ROOT


def lock_pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if match:
            pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def wanted() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_every_dependency_is_pinned_inside_its_range():
    pins = lock_pins()
    assert len(pins) > 100  # the transitive closure, not only the direct dependencies
    problems = []
    for req in wanted():
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req.name}: not in requirements.lock")
        elif not req.specifier.contains(pin, prereleases=True):
            problems.append(f"{req.name}=={pin} is outside pyproject.toml's {req.specifier}")
    assert not problems, "run `make lock`: " + "; ".join(problems)


def test_torch_is_the_cpu_wheel_and_no_cuda_package_is_locked():
    pins = lock_pins()
    assert str(pins["torch"]).endswith("+cpu")
    assert not [name for name in pins if name.startswith("nvidia-")]



def test_the_gpu_only_pin_is_inside_the_nf4_extra():
    """bitsandbytes is left out of the lock (CUDA only, and it slows every import of peft); the
    Makefile's pin that `make test-gpu` installs must stay inside the range pyproject.toml gives."""
    pin = re.search(r"^BNB_PIN = bitsandbytes==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert pin, "Makefile lost BNB_PIN"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (req,) = [Requirement(r) for r in project["optional-dependencies"]["nf4"]]
    assert req.name == "bitsandbytes" and req.specifier.contains(Version(pin[1]))
    assert "bitsandbytes" not in lock_pins()
