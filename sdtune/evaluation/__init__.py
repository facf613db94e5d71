"""Judging a LoRA while it trains: the ``eval:`` section, its metrics, the reference evaluation
callback and the sample grids.
"""
