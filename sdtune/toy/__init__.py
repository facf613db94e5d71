"""Toy base models that really generate: a procedural image domain, a probe that reads it, and the
pretraining that teaches SD1.5-, SDXL- and Kolors-architecture miniatures to draw it."""
