"""Shared constants with no heavy imports (the data stage imports these without torch)."""

#: Image file suffixes sdtune trains on and the data stage keeps.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
