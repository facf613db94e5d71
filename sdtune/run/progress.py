"""One progress bar for the whole run: ``step N/total``, elapsed and remaining time, smoothed loss.

Lightning's own bars count batches within an epoch (``Epoch 17/-2 ... 7/11`` when a run is
bounded by steps), which says nothing about when the run ends. LoRA runs are bounded by steps,
so this bar counts optimizer steps against ``trainer.max_steps`` (or the estimated total). The
loss is smoothed on the device (an exponential moving average) and read back only when the bar
is redrawn, about once a second, so the bar adds no per-step host synchronisation on a GPU.
"""

from __future__ import annotations

import sys
import time

import torch
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm


class RunProgress(ProgressBar):
    def __init__(self, smoothing: float = 0.9, refresh_seconds: float = 1.0):
        super().__init__()
        self.smoothing = smoothing
        self.refresh_seconds = refresh_seconds
        self._enabled = True
        self.bar: tqdm | None = None
        self.ema: torch.Tensor | None = None
        self._drawn = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args, **kwargs) -> None:
        (self.bar.write if self.bar is not None else print)(" ".join(map(str, args)))

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        total = int(total) if total != float("inf") else None
        self.bar = tqdm(total=total, initial=trainer.global_step, desc="training", unit="step", file=sys.stderr,
                        dynamic_ncols=True, disable=not (self._enabled and trainer.is_global_zero))
        self.ema = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):
            loss = loss.detach().float()
            self.ema = loss if self.ema is None else torch.lerp(loss, self.ema, self.smoothing)
        if self.bar is None or trainer.global_step <= self.bar.n:
            return  # gradient accumulation: the step is not finished yet
        self.bar.update(trainer.global_step - self.bar.n)
        now = time.monotonic()
        if now - self._drawn >= self.refresh_seconds and self.ema is not None:
            self._drawn = now
            self.bar.set_postfix(loss=f"{float(self.ema):.4f}", epoch=trainer.current_epoch, refresh=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)
