"""sdtune: LoRA training for Stable Diffusion families (see README.md)."""

import os

import torch

if not torch.cuda.is_available():
    # torchao's C++ kernels are CUDA builds; without CUDA, importing them (diffusers does, on import)
    # only prints load failures, and model.quantize=int8, the CPU's mode, needs none of them.
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
