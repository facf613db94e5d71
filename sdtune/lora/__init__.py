"""LoRA files and layers: peft layers and adapter variants, the key tables of every format we read
or write, header metadata, checks, and applying foreign files to a loaded base.
"""
