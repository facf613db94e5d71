"""sdtune: LoRA training for Stable Diffusion families (see README.md)."""

import logging
import os

# diffusers imports torchao as soon as it is imported itself. torchao 0.18's C++ extensions (MX and
# CUTLASS kernels for formats sdtune does not use) are built for another Python and torch, so loading
# them only prints failures; model.quantize's int8 and fp8 weight-only modes are plain PyTorch.
# Set here, before anything imports diffusers, and without importing torch (start-up stays fast).
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
# bitsandbytes (model.quantize=nf4, optim=adamw8bit) tries to fetch a CPU kernel from a hub on import
# and warns when it cannot; sdtune never runs bitsandbytes on the CPU.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# What torchao 0.18 says on import under torch 2.13, none of it about what sdtune uses: the skipped
# extensions (above), its enum classes registered with torch's pytree (deprecated), and diffusers
# failing to import torchao's retired tensor classes (for loading checkpoints saved quantized).
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)
