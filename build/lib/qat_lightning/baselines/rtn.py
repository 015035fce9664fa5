"""Round-to-nearest (RTN): the student's own quantizers applied to the teacher with no training.

The floor every other method is measured against, and by construction the QAT student at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from qat_lightning.baselines.calibration import as_quant_config
from qat_lightning.baselines.method import Method, register
from qat_lightning.quant import QuantConfig, quantize_model

__all__ = ["RTN", "rtn"]


@register
@dataclass
class RTN(Method):
    """The student's quantizers on the unchanged teacher."""

    name: ClassVar[str] = "rtn"


def rtn(teacher: nn.Module, qcfg: QuantConfig | Any) -> nn.Module:
    """Fake-quantized copy of `teacher` (MinMax scales of `qcfg`, recomputed each forward); teacher untouched."""
    return quantize_model(teacher, as_quant_config(qcfg))
