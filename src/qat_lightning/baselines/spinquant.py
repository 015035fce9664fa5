"""SpinQuant (Liu et al. 2024), data-free: QuaRot's rotations with R1 and R2 then learned against the quantized
student's distillation loss on the run's calibration batches (`rotate/learned.py`); then RTN (`spinquant`) or
GPTQ (`spinquant_gptq`, what SpinQuant reports for its weights). As `init=spinquant`, QAT starts from the
learned-rotation teacher.

R1 + R2 are absorbed (a plain checkpoint that exports and llama.cpp run); R3 / R4, when set, stay fixed online
Hadamards (docs/ROTATIONS.md says which engines run them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from qat_lightning.baselines.gptq import _check_options, gptq_weights
from qat_lightning.baselines.method import Method, register
from qat_lightning.baselines.quarot import QuaRot, QuaRotGPTQ

__all__ = ["SpinQuant", "SpinQuantGPTQ"]


@register
@dataclass
class SpinQuant(Method):
    """Learned R1 (+ one R2 per layer when `learn_r2`), `steps` Adam steps at `lr` from the seeded Hadamard."""

    name: ClassVar[str] = "spinquant"
    needs_calibration: ClassVar[bool] = True
    steps: int = 100
    lr: float = 1e-3
    learn_r2: bool = True
    r3: bool = False
    r4: bool = False
    seed: int = 0
    kind: str = "hadamard"

    def __post_init__(self) -> None:
        from qat_lightning.rotate.hadamard import check_kind

        check_kind(self.kind)
        if self.steps < 1 or self.lr <= 0:
            raise ValueError(f"spinquant needs steps >= 1 and lr > 0, got steps={self.steps}, lr={self.lr}")

    def transform(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None) -> nn.Module:
        from qat_lightning.rotate.learned import learn_rotations

        rotated, _ = learn_rotations(model, qcfg, calib_batches, steps=self.steps, lr=self.lr,
                                     learn_r2=self.learn_r2, r3=self.r3, r4=self.r4, seed=self.seed, kind=self.kind)
        return rotated

    finish_student = QuaRot.finish_student  # the online R3/R4 wrap the student's (KV-quantizing) attention


@register
@dataclass
class SpinQuantGPTQ(SpinQuant):
    """The learned rotation (learned against the RTN student, as `spinquant`), then GPTQ's weights on the
    rotated model (block_size, percdamp, act_order as `methods.gptq`)."""

    name: ClassVar[str] = "spinquant_gptq"
    block_size: int = 128
    percdamp: float = 0.01
    act_order: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_options(self.block_size, self.percdamp)

    def transform(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None) -> nn.Module:
        rotated = super().transform(model, qcfg, calib_batches)
        return gptq_weights(rotated, qcfg, calib_batches, self.block_size, self.percdamp, self.act_order)

    student_config = QuaRotGPTQ.student_config  # GPTQ's weights are on the grid: no second rounding
