"""``python -m sdtune.morph``: a transition between two images through their LoRAs and DDIM-inverted
noise, with its inputs, outputs, single-image training and inversion.
"""
