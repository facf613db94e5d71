"""``python -m sdtune [overrides]``: compose the Hydra config in ``conf/`` and train a LoRA.

``--cfg job`` prints the composed config without loading anything; ``-m`` sweeps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sdtune.config.overrides import expand_home, normalize_overrides
from sdtune.config.paths import CONF_DIR
from sdtune.config.resolvers import register_resolvers
from sdtune.run.folder import output_dir_problem
from sdtune.run.resume import resume_argv
from sdtune.utils.errors import exit_on_user_error

register_resolvers()


# An absolute path: Hydra resolves a relative one against the package when this module is imported
# (tests, other tools) rather than run with -m.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    # deferred: torch, Lightning, diffusers and the training stack (seconds), until Hydra has parsed the
    # command line, so --help and --cfg job answer at once
    from sdtune.run.train import train

    with exit_on_user_error():
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    return optimized_value(cfg.get("optimized_metric"), metrics)


def main() -> None:
    """Hydra's app on ``sys.argv``, whose overrides are first put in the form Hydra takes
    (:func:`~sdtune.config.overrides.normalize_overrides`: documented keys of sections that are off by default,
    our message for a key that is no setting)."""
    with exit_on_user_error():
        sys.argv[1:] = normalize_overrides(sys.argv[1:])
    _hydra_main()


def optimized_value(name: str | None, metrics: dict[str, float]) -> float | None:
    """The value a Hydra sweeper (Optuna) optimises: ``optimized_metric``, else the fixed
    validation loss when there is one, else the training loss."""
    if name:
        if name not in metrics:
            print(f"\nerror: optimized_metric={name!r} was not logged by this run; logged: {sorted(metrics)}. "
                  "Fix: choose one of those (val/loss needs data.val_images > 0).", file=sys.stderr)
            sys.exit(2)
        return metrics[name]
    for key in ("val/loss", "train/loss_epoch", "train/loss"):
        if key in metrics:
            return metrics[key]
    return None


def cli() -> None:
    """The command: check that the run folder can be written before Hydra tries to make it."""
    with exit_on_user_error():  # ckpt_path=<run>: that run's own overrides first (vetted: a folder may be shared)
        sys.argv[1:] = resume_argv(expand_home(sys.argv[1:]))
    problem = output_dir_problem(sys.argv[1:], default_root=Path.cwd() / "outputs")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
