"""Shared test helpers: plain functions and constants that test modules import.

One module per kind of help (paths, configs, models, command runs, files, images, ComfyUI's rules,
the GPU scenarios). Fixtures stay in ``tests/conftest.py``; no test module imports another.
"""
