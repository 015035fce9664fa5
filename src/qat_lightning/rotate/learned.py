"""Learned rotations (SpinQuant, Liu et al. 2024): R1 and one R2 per layer, trained so the *quantized* model
matches the FP teacher, starting from QuaRot's random Hadamard.

Why: a random Hadamard is one draw, and the draw matters (W4A4KV4 RTN after R1+R2: 5046 vs 13787 for two
seeds, docs/ROTATIONS.md). SpinQuant optimises the rotations on the orthogonal group against the quantized
network's loss. Two choices differ from its code, both to reuse what exists:

- Orthogonality comes from `torch.nn.utils.parametrizations.orthogonal` (the Cayley map of a skew-symmetric
  matrix, any torch optimizer) instead of SpinQuant's hand-written Cayley SGD.
- The loss is the distillation loss QAT uses (soft cross-entropy to the teacher's logits on the run's
  calibration batches, `distill.losses`), not next-token CE on WikiText-2: the method stays data-free.

The rotation reaches the quantizers through `torch.nn.utils.parametrize` on the student's weights
(readers ``W -> W R``, writers ``W -> Rᵀ W``), so every fake quantizer sees the rotated weight and the
straight-through gradient flows to R. The learned matrices are then absorbed into the FP model exactly as
QuaRot's are (`absorb.apply_r1_matrix`, `absorb.apply_r2_matrices`): the result is the same plain checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from qat_lightning.models.adapter import NORM_READERS, RESIDUAL_WRITERS, adapter_for
from qat_lightning.rotate.absorb import (
    CONFIG_KEY,
    apply_r1_matrix,
    apply_r2_matrices,
    attach_online_rotations,
    rotate_model,
)

__all__ = ["learn_rotations"]

log = logging.getLogger(__name__)


class _Rotation(nn.Module):
    """An orthogonal (n, n) matrix, the identity at the start (Cayley map of a learned skew matrix)."""

    def __init__(self, n: int, device: torch.device) -> None:
        super().__init__()
        self.holder = nn.Linear(n, n, bias=False, device=device)
        with torch.no_grad():
            self.holder.weight.copy_(torch.eye(n, device=device))
        orthogonal(self.holder, "weight", orthogonal_map="cayley")

    def matrix(self) -> torch.Tensor:
        return self.holder.weight  # (n, n), orthogonal


class _Reads(nn.Module):
    """W -> W R: a linear (or embedding) whose input (row) space is rotated by R."""

    def __init__(self, rot: _Rotation) -> None:
        super().__init__()
        self.rot = rot

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w @ self.rot.matrix().to(w.dtype)  # (out, h) @ (h, h)


class _Writes(nn.Module):
    """W -> Rᵀ W (and b -> b R): a linear whose output is rotated by R."""

    def __init__(self, rot: _Rotation, bias: bool = False) -> None:
        super().__init__()
        self.rot, self.bias = rot, bias

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        r = self.rot.matrix().to(w.dtype)
        return w @ r if self.bias else r.T @ w  # bias (h,) @ (h, h); weight (h, h) @ (h, in)


class _ValueHeads(nn.Module):
    """v_proj rows of every KV head: W_h -> R2ᵀ W_h (bias b_h -> b_h R2)."""

    def __init__(self, rot: _Rotation, n_kv: int, bias: bool = False) -> None:
        super().__init__()
        self.rot, self.n_kv, self.bias = rot, n_kv, bias

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        r = self.rot.matrix().to(w.dtype)  # (hd, hd)
        if self.bias:
            return (w.unflatten(0, (self.n_kv, -1)) @ r).flatten()  # (n_kv, hd) @ (hd, hd)
        return (r.T @ w.unflatten(0, (self.n_kv, -1))).flatten(0, 1)  # (hd, hd) @ (n_kv, hd, in)


class _OutputHeads(nn.Module):
    """o_proj columns of every query head: W[:, j] -> W[:, j] R2."""

    def __init__(self, rot: _Rotation, n_heads: int) -> None:
        super().__init__()
        self.rot, self.n_heads = rot, n_heads

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        r = self.rot.matrix().to(w.dtype)
        return (w.unflatten(1, (self.n_heads, -1)) @ r).flatten(1)  # (out, H, hd) @ (hd, hd)


def _parametrize_student(student: nn.Module, r1: _Rotation, r2s: list[_Rotation] | None) -> None:
    ad = adapter_for(student)
    parametrize.register_parametrization(ad.embed(student), "weight", _Reads(r1))
    parametrize.register_parametrization(ad.lm_head(student), "weight", _Reads(r1))
    for i, layer in enumerate(ad.layers(student)):
        for _, readers in NORM_READERS:
            for reader in readers:
                parametrize.register_parametrization(layer.get_submodule(reader), "weight", _Reads(r1))
        for writer in RESIDUAL_WRITERS:
            lin = layer.get_submodule(writer)
            parametrize.register_parametrization(lin, "weight", _Writes(r1))
            if lin.bias is not None:
                parametrize.register_parametrization(lin, "bias", _Writes(r1, bias=True))
        if r2s is not None:
            attn = ad.attention(layer)
            parametrize.register_parametrization(attn.v_proj, "weight", _ValueHeads(r2s[i], ad.num_kv_heads))
            if attn.v_proj.bias is not None:
                parametrize.register_parametrization(attn.v_proj, "bias", _ValueHeads(r2s[i], ad.num_kv_heads, True))
            parametrize.register_parametrization(attn.o_proj, "weight", _OutputHeads(r2s[i], ad.num_heads))


def _inputs(batch: dict, device: torch.device) -> tuple[dict, torch.Tensor | None]:
    ids = batch["input_ids"].to(device)  # (B, T)
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask.to(device)
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False}, mask


def learn_rotations(
    teacher: nn.Module,
    qcfg: Any,
    batches: list[dict],
    *,
    steps: int = 100,
    lr: float = 1e-3,
    learn_r2: bool = True,
    r3: bool = False,
    r4: bool = False,
    seed: int = 0,
    kind: str = "hadamard",
) -> tuple[nn.Module, list[float]]:
    """An FP copy of `teacher` rotated by R1·R1' (and R2·R2' per layer) with R1', R2' learned; and the KL log.

    Starts from `rotate_model(teacher, r1, r2, r3, r4, seed, kind)` (QuaRot); R3 / R4 stay fixed online
    Hadamards. Each step is one forward + backward of the fake-quantized student (`qcfg`) on one of `batches`
    (cycled), loss the soft cross-entropy to the teacher's logits; only the rotations are trained.

    Returns:
        (model, kl): the rotated FP model (teacher untouched; FP logits equal the teacher's), and the
        per-step KL(teacher || quantized student), the first entry being the Hadamard start.
    """
    from qat_lightning.distill.losses import soft_cross_entropy
    from qat_lightning.quant import as_quant_config, quantize_model

    if steps < 1 or lr <= 0:
        raise ValueError(f"learned rotations need steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    if not batches:
        raise ValueError("learned rotations need calibration batches (a list of dicts with 'input_ids')")
    qcfg = as_quant_config(qcfg)
    base = rotate_model(teacher, r1=True, r2=True, r3=r3, r4=r4, seed=seed, kind=kind)
    student = attach_online_rotations(quantize_model(base, qcfg))
    if any(getattr(m, "weight_scale", None) is not None for m in student.modules()):
        raise ValueError("learned rotations need MinMax weight scales: a learnable (LSQ) scale would go stale")
    student.requires_grad_(False)
    student.train()
    ad = adapter_for(student)
    device = ad.embed(student).weight.device
    r1 = _Rotation(ad.hidden_size, device)
    r2s = [_Rotation(ad.head_dim, device) for _ in ad.layers(student)] if learn_r2 else None
    _parametrize_student(student, r1, r2s)
    params = list(r1.parameters()) + [p for r in (r2s or []) for p in r.parameters()]
    opt = torch.optim.Adam(params, lr=lr)

    targets: dict[int, torch.Tensor] = {}  # teacher logits per batch, computed once
    kl_log: list[float] = []
    for step in range(steps):
        i = step % len(batches)
        inputs, mask = _inputs(batches[i], device)
        if i not in targets:
            with torch.no_grad():
                targets[i] = teacher(**inputs).logits.float()  # (B, T, V)
        with parametrize.cached():  # each rotation's Cayley map once per step, not once per reading weight
            loss, kl = soft_cross_entropy(student(**inputs).logits, targets[i], mask)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        kl_log.append(float(kl))
        if step % 10 == 0 or step == steps - 1:
            log.info("learned rotations: step %d/%d, KL(teacher || quantized student) %.4f", step, steps, kl_log[-1])

    with torch.no_grad():
        r1_learned = r1.matrix().detach().double()
        apply_r1_matrix(base, adapter_for(base), r1_learned)
        if r2s is not None:
            n_kv = ad.num_kv_heads
            per_layer = [r.matrix().detach().double().expand(n_kv, -1, -1) for r in r2s]  # (n_kv, hd, hd)
            apply_r2_matrices(base, adapter_for(base), per_layer)
    record = dict(getattr(base.config, CONFIG_KEY))
    record["learned"] = {"r1": True, "r2": learn_r2, "steps": steps, "lr": lr,
                         "kl_start": kl_log[0], "kl_end": kl_log[-1]}
    setattr(base.config, CONFIG_KEY, record)
    return base, kl_log
