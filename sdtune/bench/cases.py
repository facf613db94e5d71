"""What one bench run measures: models x cases, each case a list of ordinary config overrides.

A case is written exactly as on the ``python -m sdtune`` command line (``data.cache_latents=true``,
``optim=adamw8bit``), and its config is composed by Hydra from ``conf/bench.yaml`` plus the
user's overrides plus the case's, so the bench measures the configs users actually run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

REFERENCE = "reference"


@dataclass(frozen=True)
class Case:
    """One measured configuration of one model."""

    name: str
    overrides: tuple[str, ...] = ()
    kind: str = "sdtune"  # "sdtune": LoRATrainingModule under lightning.Trainer; "reference": the plain loop
    vs: str | None = None  # ratio of ms/step against this case (besides the reference)
    needs: tuple[str, ...] = ()  # "cuda" and/or packages; the row reads n/a where they are missing
    warmup: int | None = None  # extra warm-up steps (torch.compile compiles in its first steps)
    rounds: int | None = None  # cap on rounds (each round of a compiled case compiles again)
    label: str = ""
    switch: bool = False  # a speed-switch row (measured on bench.switch_models only)

    @property
    def variant(self) -> str:
        if self.label:
            return self.label
        return ("reference loop" if self.kind == REFERENCE else "sdtune") + (" " + " ".join(self.overrides) if self.overrides else "")


def _case(name: str, node: Mapping[str, Any], switch: bool) -> Case:
    return Case(
        name=name,
        overrides=tuple(node.get("overrides") or ()),
        kind=node.get("kind", "sdtune"),
        vs=node.get("vs"),
        needs=tuple(node.get("needs") or ()),
        warmup=node.get("warmup"),
        rounds=node.get("rounds"),
        label=node.get("label") or "",
        switch=switch,
    )


def cases_from_config(bench: Mapping[str, Any]) -> list[Case]:
    """``bench.cases`` (every model) then ``bench.switches`` (speed switches); null entries are off."""
    out = [_case(name, node, False) for name, node in (bench.get("cases") or {}).items() if node is not None]
    out += [_case(name, node, True) for name, node in (bench.get("switches") or {}).items() if node is not None]
    names = {c.name for c in out}
    for case in out:
        if case.vs is not None and case.vs not in names:
            raise ValueError(f"bench case {case.name!r} compares against {case.vs!r}, which is not a case")
    return out


def missing_requirements(case: Case, device: torch.device) -> str | None:
    """Why ``case`` cannot run here (e.g. ``"needs CUDA"``), or None when it can."""
    missing = []
    for need in case.needs:
        if need == "cuda":
            if device.type != "cuda":
                missing.append("CUDA")
        elif importlib.util.find_spec(need) is None:
            missing.append(f"the {need} package")
    return "needs " + " and ".join(missing) if missing else None


def models_to_run(bench: Mapping[str, Any], task_overrides: Sequence[str], composed_model: str) -> list[str]:
    """``model=`` on the command line (or ``bench.models=null``) means just that model, else ``bench.models``."""
    if any(o.split("=", 1)[0].lstrip("+~") == "model" for o in task_overrides) or not bench.get("models"):
        return [composed_model]
    return list(bench["models"])


def without_model(task_overrides: Sequence[str]) -> list[str]:
    return [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") != "model"]


@dataclass
class Plan:
    """Steps per round and rounds; ``timed`` is False for FLOP-only rows (full size on a CPU)."""

    steps: int
    warmup: int
    rounds: int
    timed: bool
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def plan_for(bench: Mapping[str, Any], device: torch.device) -> Plan:
    steps, warmup, rounds = bench.get("steps"), int(bench.get("warmup", 3)), int(bench.get("rounds", 1))
    if steps is None and bench.get("random_init") and device.type != "cuda":
        return Plan(0, warmup, rounds, timed=False, reason="n/a (CPU)")
    return Plan(int(steps if steps is not None else bench.get("default_steps", 12)), warmup, rounds, timed=True)
