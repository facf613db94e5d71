"""``python -m sdtune.bench [overrides]`` (``make bench``): compose ``conf/bench.yaml`` and run the bench.

``--cfg job`` prints the composed config; see docs/benchmarks.md for presets and columns.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sdtune.config.paths import CONF_DIR
from sdtune.config.resolvers import register_resolvers
from sdtune.utils.errors import exit_on_user_error

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def main(cfg: DictConfig) -> None:
    # deferred: torch, Lightning and the models (seconds), until Hydra has parsed the command line (--help, --cfg job)
    from sdtune.bench.suite import run_bench

    hydra_cfg = HydraConfig.get()
    with exit_on_user_error():
        code = run_bench(cfg, list(hydra_cfg.overrides.task), dict(hydra_cfg.runtime.choices), hydra_cfg.runtime.output_dir)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
