"""``python -m sdtune.plan [--gb N] <the overrides of a training run>``: the GPU memory that run
will need, by component, before any weight is read.

    python -m sdtune.plan experiment=flux_lora --gb 24
    python -m sdtune.plan hardware=12gb model=sdxl data.root=/data/set

The overrides are composed exactly as ``python -m sdtune`` composes them and pass the run's own
config checks first. The card's size is ``--gb N``, else the ``hardware=<N>gb`` preset's. Exit
status: 0 the run fits (or no card size was given), 1 it does not, 2 the config is invalid.
The method and its limits: docs/memory.md.
"""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from sdtune.config.overrides import expand_home, normalize_overrides
from sdtune.config.paths import CONF_DIR
from sdtune.config.resolvers import register_resolvers
from sdtune.utils.errors import ConfigError, exit_on_user_error

register_resolvers()
USAGE = "usage: python -m sdtune.plan [--gb N] [key=value ...]  (the overrides of python -m sdtune)"


def split_gb(argv: list[str]) -> tuple[float | None, list[str]]:
    """(``--gb``'s value or None, the other arguments)."""
    gib, rest = None, []
    args = iter(argv)
    for arg in args:
        if arg == "--gb" or arg.startswith("--gb="):
            value = arg.partition("=")[2] if "=" in arg else next(args, "")
            try:
                gib = float(value)
            except ValueError:
                raise ConfigError(f"--gb {value!r} is not a number of GiB. Fix: e.g. --gb 24.") from None
            if not gib > 0:
                raise ConfigError(f"--gb {value} must be a positive number of GiB. Fix: e.g. --gb 24.")
        else:
            rest.append(arg)
    return gib, rest


def compose_run(overrides: list[str]) -> DictConfig:
    """The config ``python -m sdtune OVERRIDES`` trains with (the run folder is not made)."""
    overrides = normalize_overrides(expand_home(overrides))
    if not any(o.startswith("paths.output_dir=") for o in overrides):
        overrides.append("paths.output_dir=/nonexistent-plan-output")  # resolvable without Hydra's run
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"{str(err).splitlines()[0]}\n{USAGE}") from None


def run(argv: list[str]) -> int:
    """Print the plan for ``argv``; the exit status (0 fits or no size given, 1 does not fit)."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    gib, overrides = split_gb(argv)
    # deferred: torch, diffusers and the training stack, after the arguments are read (--help answers at once)
    from sdtune.planning import plan_memory
    from sdtune.run.checks import validate  # deferred: as above (torch, the section checks)

    cfg = compose_run(overrides)
    root = cfg.data.get("root")
    if not root:  # a plan needs no dataset (the caches are then counted for an assumed one)
        cfg.data.root = "(no dataset: planning)"
    validate(cfg, planned_fit=False)  # the run's checks; the verdict is this command's, exit 1 not 2
    cfg.data.root = root
    preset = cfg.get("hardware_preset")
    if gib is None and preset and preset.get("memory_gib") is not None:
        gib = float(preset.memory_gib)
    plan = plan_memory(cfg, gib)
    print(plan.render(gib))
    return 0 if gib is None or plan.fits(gib) else 1


def main() -> None:
    with exit_on_user_error():
        status = run(sys.argv[1:])
    sys.exit(status)


if __name__ == "__main__":
    main()
