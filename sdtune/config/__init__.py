"""Composing configs, low in the layers (it imports only :mod:`sdtune.utils`, omegaconf and yaml):

* :mod:`~sdtune.config.paths`: the repository root and ``conf/``;
* :mod:`~sdtune.config.resolvers`: the ``${sdtune_...:}`` resolvers the config files use;
* :mod:`~sdtune.config.overrides`: command-line overrides rewritten for Hydra;
* :mod:`~sdtune.config.schema`: the known keys of sdtune's own sections;
* :mod:`~sdtune.config.values`: one set of value checks (numbers, ranges, choices, paths, guidance)
  for training, generate, merge, morph and evaluation.

Each section's checks live beside the code that uses the section; :mod:`sdtune.run.checks`
assembles them (``validate``).
"""
