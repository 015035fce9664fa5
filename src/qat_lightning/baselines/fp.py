"""The full-precision teacher itself, scored like every method (the row every table starts with)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from qat_lightning.baselines.method import Method, register

__all__ = ["FP"]


@register
@dataclass
class FP(Method):
    """No quantization: `build` returns the model itself; as `init=teacher`, QAT starts from the teacher."""

    name: ClassVar[str] = "fp"

    def build(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None = None,
              base: nn.Module | None = None) -> nn.Module:
        return model
