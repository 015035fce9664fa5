"""QuaRot (Ashkboos et al. 2024): rotate the FP model (`rotate/`), then quantize: RTN (`quarot`) or GPTQ
(`quarot_gptq`), or RTN after rotation and flattened key channels (`quarot_kvsmooth`). As `init=quarot` (alias
`init=rotate`), QAT starts from the rotated teacher.

R1 + R2 are absorbed (a plain checkpoint: exports and llama.cpp run it); R3 / R4 are online rotations our
own student and export run (docs/ROTATIONS.md says which engines can).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from qat_lightning.baselines.gptq import _check_options, gptq_weights, weights_prequantized_config
from qat_lightning.baselines.method import Method, register
from qat_lightning.quant import as_quant_config

__all__ = ["QuaRot", "QuaRotGPTQ", "QuaRotKVSmooth"]


@register
@dataclass
class QuaRot(Method):
    """Rotations r1 (residual), r2 (values/o_proj), r3 (q/k after RoPE, online), r4 (down_proj input,
    online), seeded random Hadamard (`kind: hadamard`) or Haar-random (`kind: random`); then RTN."""

    name: ClassVar[str] = "quarot"
    r1: bool = True
    r2: bool = True
    r3: bool = False
    r4: bool = False
    seed: int = 0
    kind: str = "hadamard"

    def __post_init__(self) -> None:
        from qat_lightning.rotate.hadamard import check_kind

        check_kind(self.kind)

    def rotate(self, model: nn.Module) -> nn.Module:
        from qat_lightning.rotate import rotate_model

        return rotate_model(model, r1=self.r1, r2=self.r2, r3=self.r3, r4=self.r4, seed=self.seed, kind=self.kind)

    def transform(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None) -> nn.Module:
        return self.rotate(model)

    def finish_student(self, student: nn.Module) -> nn.Module:
        from qat_lightning.rotate import attach_online_rotations

        # online rotations wrap the (possibly KV-quantizing) attention the student ends up with
        return attach_online_rotations(student)


@register
@dataclass
class QuaRotGPTQ(QuaRot):
    """QuaRot's rotations, then GPTQ's weights (block_size, percdamp, act_order as `methods.gptq`)."""

    name: ClassVar[str] = "quarot_gptq"
    needs_calibration: ClassVar[bool] = True
    block_size: int = 128
    percdamp: float = 0.01
    act_order: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_options(self.block_size, self.percdamp)

    def transform(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None) -> nn.Module:
        return gptq_weights(self.rotate(model), qcfg, calib_batches, self.block_size, self.percdamp, self.act_order)

    def student_config(self, qcfg: Any) -> Any:
        return weights_prequantized_config(as_quant_config(qcfg))


@register
@dataclass
class QuaRotKVSmooth(QuaRot):
    """QuaRot's rotations, then flattened key channels (`kvsmooth`), then RTN. R1/R2 leave the keys (k_proj's
    outputs) unchanged, so the key scales are kvsmooth's on the unrotated teacher; the two fix different
    errors (weight/activation outliers vs the per-token 4-bit key cache) and compose exactly in FP."""

    name: ClassVar[str] = "quarot_kvsmooth"
    needs_calibration: ClassVar[bool] = True
    strength: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1]; got {self.strength}")

    def transform(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None) -> nn.Module:
        from qat_lightning.baselines.kv_smooth import kv_smooth_model

        return kv_smooth_model(self.rotate(model), calib_batches, self.strength)
