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

__all__ = ["QuaRot", "QuaRotGPTQ", "QuaRotKVSmooth", "best_draw", "r2_undoes_the_cache_rotation"]

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
    online), seeded random Hadamard (`kind: hadamard`) or Haar-random (`kind: random`); then RTN.

    `draws > 1` keeps the best of that many sign draws (seeds ``seed, seed + 1000, ...``): the one whose
    quantized student (this method's `build`) has the lowest KL to the teacher on the calibration batches.
    Why: the draw moves SmolLM2's W4A8KV4 start (53.8-55.8 over four draws on one calibration set), and the
    teacher's own generated batches rank draws with no real data. Measured (RESULTS.md): that ranking was right
    at 8 calibration batches and wrong at 32, and GPTQ's calibration size moved the start more than the draw, so
    this is an option, off by default. Draw 0 is `seed` itself, so `draws=1` is the plain method.
    """

    name: ClassVar[str] = "quarot"
    r1: bool = True
    r2: bool = True
    r3: bool = False
    r4: bool = False
    seed: int = 0
    kind: str = "hadamard"
    draws: int = 1

    def __post_init__(self) -> None:
        from qat_lightning.rotate.hadamard import check_kind

        check_kind(self.kind)
        if self.draws < 1:
            raise ValueError(f"methods.{self.name}.draws must be >= 1; got {self.draws}")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.draws > 1  # the draws are ranked on the calibration batches

    def draw_seeds(self) -> list[int]:
        """The seeds `draws` tries, `seed` first."""
        return [self.seed + DRAW_STRIDE * j for j in range(self.draws)]

    def rotate(self, model: nn.Module, qcfg: Any = None, seed: int | None = None) -> nn.Module:
        from qat_lightning.rotate import rotate_model

        seed = self.seed if seed is None else seed
        if self.r2 and qcfg is not None and r2_undoes_the_cache_rotation(model, qcfg, self.kind, seed):
            log.warning("%s: R2 cancels the quantized KV cache's own Hadamard rotation of the values (llama.cpp's "
                        "attn_rot_v, quant.kv_hadamard): the cache stores them unrotated. Set methods.%s.r2=false "
                        "(the cache already rotates them) or quant.kv_hadamard=false.", self.name, self.name)

        return rotate_model(model, r1=self.r1, r2=self.r2, r3=self.r3, r4=self.r4, seed=seed, kind=self.kind)

    def transform_draw(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None, seed: int) -> nn.Module:
        """The FP model of one sign draw (what `transform` returns when `draws == 1`)."""
        return self.rotate(model, qcfg, seed)

    def transform(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None) -> nn.Module:
        if self.draws == 1:
            return self.transform_draw(model, qcfg, calib_batches, self.seed)
        return best_draw(self, model, qcfg, calib_batches)

    def finish_student(self, student: nn.Module) -> nn.Module:
        from qat_lightning.rotate import attach_online_rotations

        # online rotations wrap the (possibly KV-quantizing) attention the student ends up with
        return attach_online_rotations(student)


DRAW_STRIDE = 1000  # draw j of seed s is seed s + 1000 j: seeds 0..999 never share a draw


def best_draw(method: QuaRot, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None) -> nn.Module:
    """`method.transform_draw` for each of `method.draw_seeds()`; keeps the FP model whose quantized student
    has the lowest KL to `model` (the teacher) on `calib_batches`. Its rotation record holds the chosen seed,
    so a saved student rebuilds the same online rotations."""
    import torch

    from qat_lightning.eval.agreement import kl_and_agreement
    from qat_lightning.quant import quantize_model

    if not calib_batches:
        raise ValueError(f"methods.{method.name}.draws={method.draws} ranks the draws on calibration batches; "
                         "none were given")
    if qcfg is None:
        raise ValueError(f"methods.{method.name}.draws={method.draws} ranks the draws by their quantized "
                         "student; give the quant config")
    student_cfg = as_quant_config(method.student_config(qcfg))
    best: tuple[float, int, nn.Module] | None = None
    for seed in method.draw_seeds():
        base = method.transform_draw(model, qcfg, calib_batches, seed)
        student = method.finish_student(quantize_model(base, student_cfg, inplace=False)).eval()
        with torch.no_grad():
            kl = kl_and_agreement(model, student, calib_batches)["kl"]
        del student
        log.info("%s: sign draw seed %d: quantized student's KL to the teacher on %d calibration batches %.5f",
                 method.name, seed, len(calib_batches), kl)
        if best is None or kl < best[0]:
            best = (kl, seed, base)
        else:
            del base
    assert best is not None
    log.info("%s: kept sign draw seed %d of %s (KL %.5f)", method.name, best[1], method.draw_seeds(), best[0])
    return best[2]


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

    def transform_draw(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None, seed: int) -> nn.Module:
        rotated = self.rotate(model, qcfg, seed)
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

    def transform_draw(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None, seed: int) -> nn.Module:
        from qat_lightning.baselines.kv_smooth import kv_smooth_model

        return kv_smooth_model(self.rotate(model, qcfg, seed), calib_batches, self.strength)
