"""QuaRot (Ashkboos et al. 2024): rotate the FP model (`rotate/`), then quantize: RTN (`quarot`) or GPTQ
(`quarot_gptq`), or RTN after rotation and flattened key channels (`quarot_kvsmooth`). As `init=quarot` (alias
`init=rotate`), QAT starts from the rotated teacher.

R1 + R2 are absorbed (a plain checkpoint: exports and llama.cpp run it); R3 / R4 are online rotations our
own student and export run (docs/ROTATIONS.md says which engines can).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from qat_lightning.baselines.gptq import _check_options, gptq_weights, weights_prequantized_config
from qat_lightning.baselines.method import Method, register
from qat_lightning.quant import as_quant_config

__all__ = ["QuaRot", "QuaRotGPTQ", "QuaRotKVSmooth", "r2_undoes_the_cache_rotation"]

log = logging.getLogger(__name__)


def r2_undoes_the_cache_rotation(model: nn.Module, qcfg: Any, kind: str = "hadamard", seed: int = 0) -> bool:
    """True when R2 hands the value cache back unrotated: llama.cpp multiplies a quantized value cache by the
    Walsh-Hadamard H (`attn_rot_v`, emulated by `quant.kv_hadamard`), and our R2 is diag(s)·H, so the cache
    stores ``v·diag(s)·H·H = v·diag(s)``, sign flips of the unrotated values (docs/ROTATIONS.md)."""
    from qat_lightning.models.adapter import adapter_for
    from qat_lightning.quant.ggml import hadamard_rotate
    from qat_lightning.rotate.hadamard import rotation_matrix

    ad = adapter_for(model)
    name = next(n for n, _ in ad.decoder_linears(model) if n.endswith("v_proj"))
    spec = as_quant_config(qcfg).kv_spec(name, ad.head_dim)
    if not spec.enabled or not spec.hadamard:
        return False
    q2 = rotation_matrix(ad.head_dim, kind, seed)  # (hd, hd); any draw: the signs do not change the structure
    cached = hadamard_rotate(q2, spec.hadamard)  # (hd, hd): R2, then the cache's rotation
    return bool(((cached.abs() > 1e-6).sum(-1) == 1).all())


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

    def rotate(self, model: nn.Module, qcfg: Any = None) -> nn.Module:
        from qat_lightning.rotate import rotate_model

        if self.r2 and qcfg is not None and r2_undoes_the_cache_rotation(model, qcfg, self.kind, self.seed):
            log.warning("%s: R2 cancels the quantized KV cache's own Hadamard rotation of the values (llama.cpp's "
                        "attn_rot_v, quant.kv_hadamard): the cache stores them unrotated. Set methods.%s.r2=false "
                        "(the cache already rotates them) or quant.kv_hadamard=false.", self.name, self.name)

        return rotate_model(model, r1=self.r1, r2=self.r2, r3=self.r3, r4=self.r4, seed=self.seed, kind=self.kind)

    def transform(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None) -> nn.Module:
        return self.rotate(model, qcfg)

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
        rotated = self.rotate(model, qcfg)
        return gptq_weights(rotated, qcfg, calib_batches, self.block_size, self.percdamp, self.act_order)

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

        return kv_smooth_model(self.rotate(model, qcfg), calib_batches, self.strength)
