"""``python -m sdtune [overrides]``: compose the Hydra config in ``conf/`` and train a LoRA.

``--cfg job`` prints the composed config without loading anything; ``-m`` sweeps.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import CONF_DIR, ROOT, expand_home, register_resolvers
from .errors import SdtuneError

register_resolvers()


# An absolute path: Hydra resolves a relative one against the package when this module is imported
# (tests, other tools) rather than run with -m.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from .train import train  # heavy imports only once Hydra has parsed the command line

    try:
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    except SdtuneError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        sys.exit(2)
    # The value Hydra sweepers (Optuna) minimise: the fixed validation loss when there is one.
    for key in ("val/loss", "train/loss_epoch", "train/loss"):
        if key in metrics:
            return metrics[key]
    return None


def cli() -> None:
    """The command: check that the run folder can be written before Hydra tries to make it."""
    from .run_folder import output_dir_problem

    sys.argv[1:] = expand_home(sys.argv[1:])
    problem = output_dir_problem(sys.argv[1:], default_root=ROOT / "outputs")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
