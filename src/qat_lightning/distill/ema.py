"""`StudentEMA`: an exponential moving average of the student's trained weights, kept as the student at the end.

Why: our QAT steps are small (4 x 128 tokens), so the last weights carry the last batches' noise, and 4-bit
rounding turns that noise into codes flipping between neighbours (Nagel et al. 2022, "Overcoming oscillations
in quantization-aware training"); an average over the last ~1/(1-decay) steps is a cheap denoiser.

Why not Lightning's `EMAWeightAveraging`: it averages the whole LightningModule, the frozen teacher included (a
second full copy updated every step), and does not support sharded models. This averages only the student's
trainable parameters, with torch's own update (`swa_utils.get_ema_multi_avg_fn`), and is refused with FSDP2
at start-up (`config.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch.optim.swa_utils import get_ema_multi_avg_fn


class StudentEMA(Callback):
    """EMA of `pl_module.student`'s parameters that require grad; `copy_to` makes it the student after `fit`.

    Torch's convention: the first update (the first optimizer step >= `start_step`) copies the weights, every
    later one does `ema = decay * ema + (1 - decay) * w`. Saved in and restored from checkpoints, so a resumed
    run averages exactly as an uninterrupted one.
    """

    def __init__(self, decay: float, start_step: int = 0) -> None:
        self.decay = decay
        self.start_step = start_step
        self._update = get_ema_multi_avg_fn(decay)
        self._shadow: list[torch.Tensor] | None = None
        self._last_step = -1  # the optimizer step last averaged (one update per step under accumulation)

    @staticmethod
    def _params(pl_module: Any) -> list[torch.Tensor]:
        return [p for p in pl_module.student.parameters() if p.requires_grad]

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps taken so far
        if step == self._last_step or step < max(self.start_step, 1):
            return
        self._last_step = step
        params = [p.detach() for p in self._params(pl_module)]
        if self._shadow is None:
            self._shadow = [p.clone() for p in params]
            return
        if self._shadow[0].device != params[0].device:  # restored from a checkpoint onto the CPU
            self._shadow = [s.to(p.device) for s, p in zip(self._shadow, params, strict=True)]
        self._update(self._shadow, params, None)

    @torch.no_grad()
    def copy_to(self, pl_module: Any) -> bool:
        """Put the average into the student (after `fit`: Lightning's last checkpoint, written at train end,
        must keep the raw weights a resumed run continues from). False when no step reached `start_step`."""
        if self._shadow is None:
            return False
        for param, average in zip(self._params(pl_module), self._shadow, strict=True):
            param.copy_(average)
        return True

    def state_dict(self) -> dict[str, Any]:
        shadow = None if self._shadow is None else [s.cpu() for s in self._shadow]
        return {"decay": self.decay, "start_step": self.start_step, "last_step": self._last_step, "shadow": shadow}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (state_dict["decay"], state_dict["start_step"]) != (self.decay, self.start_step):
            raise ValueError(f"the checkpoint's EMA has decay {state_dict['decay']}, start step "
                             f"{state_dict['start_step']}; this run asks for {self.decay}, {self.start_step}")
        self._last_step = state_dict["last_step"]
        self._shadow = state_dict["shadow"]
