"""Composing and checking configs: repo paths, OmegaConf resolvers, override rewriting and the early
checks of every section, before anything heavy is imported or loaded.
"""
