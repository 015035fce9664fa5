"""Online rotations (R3, R4): applied to activations at run time, because they cannot be folded into weights.

- R4: ``x -> x Q4`` on the input of every ``down_proj`` (its weight holds ``W Q4``, see `absorb`), so the
  activation quantizer of ``down_proj`` sees the rotated, outlier-free input. A forward pre-hook does it.
- R3: ``q -> q Q3`` and ``k -> k Q3`` per head after RoPE (``q Q3 (k Q3)ᵀ = q kᵀ``), so a post-RoPE KV
  quantizer sees rotated keys. It runs inside a registered transformers attention function
  (``qat_r3_<inner>``) that wraps the model's attention implementation; no model file is forked.

Both are parameter-free modules holding non-persistent buffers, so the state dict stays the HF one; the
checkpoint records them in ``config.qat_rotation`` and `attach_online_rotations` rebuilds them after loading.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qat_lightning.rotate.hadamard import (
    _factor_matrices,
    hadamard_factors,
    random_orthogonal,
    random_signs,
    rotation_matrix,
)

__all__ = [
    "R3_ATTR",
    "R4_ATTR",
    "OnlineHadamard",
    "attach_r3",
    "attach_r4",
    "r3_attention_name",
    "r3_join",
    "r3_split",
]

R4_ATTR = "online_r4"  # the MLP's attribute holding its OnlineHadamard
R3_ATTR = "online_r3"  # the attention block's attribute holding its OnlineHadamard
_R3_PREFIX = "qat_r3_"


class OnlineHadamard(nn.Module):
    """``x -> x Q`` on the last dim, Q = diag(s) (H_k ⊗ H_p) / sqrt(n) applied as two small matmuls.

    With no Hadamard construction for n (or ``kind="random"``) Q is a dense random orthogonal matrix. The
    product runs in float32 (float64 inputs stay float64) and the result has the input's dtype.
    """

    def __init__(self, n: int, kind: str = "hadamard", seed: int = 0) -> None:
        super().__init__()
        self.n, self.kind, self.seed = n, kind, seed
        f = hadamard_factors(n) if kind == "hadamard" else None
        self.factored = f is not None
        if f is not None:
            a, b = _factor_matrices(f.k, f.p)
            self.k, self.p = f.k, f.p
            self.register_buffer("left", a.T.float(), persistent=False)  # (k, k): Aᵀ, ±1
            self.register_buffer("right", b.float(), persistent=False)  # (p, p): B, ±1
            self.register_buffer("signs", random_signs(n, seed).float(), persistent=False)  # (n,): ±1
        else:  # float64, so float64 inputs get the exact matrix the weights absorbed
            self.register_buffer("matrix", random_orthogonal(n, seed), persistent=False)  # (n, n)
        self.norm = 1.0 / math.sqrt(n)

    def dense(self) -> torch.Tensor:
        """Q as a float64 (n, n) matrix: exactly what the weights absorb (`rotation_matrix(n, kind, seed)`)."""
        return rotation_matrix(self.n, self.kind, self.seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = x if dtype == torch.float64 else x.float()
        if not self.factored:
            return (y @ self.matrix.to(y.dtype)).to(dtype)  # (..., n)
        xm = (y * self.signs.to(y.dtype)).unflatten(-1, (self.k, self.p))  # (..., k, p): x ⊙ s, index i*p + j
        xm = xm @ self.right.to(y.dtype)  # (..., k, p): X B
        xm = self.left.to(y.dtype) @ xm  # (..., k, p): Aᵀ X B  ==  (x ⊙ s)(A ⊗ B) viewed (k, p)
        return xm.flatten(-2).mul_(self.norm).to(dtype)  # (..., n): / sqrt(n)

    # -- R4: forward pre-hook on down_proj, kept attached by a pre-hook on the MLP ----------------------
    def _rotate_input(self, module: nn.Module, args: tuple) -> tuple:
        return (self(args[0]), *args[1:])

    def _ensure_down_hook(self, mlp: nn.Module, args: tuple) -> None:
        """Re-attach the down_proj hook when down_proj was replaced (e.g. by a QuantLinear in quantize_model).

        Why: quantize_model swaps the Linear for a new module, which would silently drop the rotation and
        leave W·Q4 multiplying an unrotated input. Bound methods, so deepcopy rebinds them to the copy.
        """
        down = mlp.down_proj
        if not any(h == self._rotate_input for h in down._forward_pre_hooks.values()):
            down.register_forward_pre_hook(self._rotate_input, prepend=True)

    def extra_repr(self) -> str:
        if not self.factored:
            how = "random orthogonal"
        else:
            how = " ⊗ ".join(f"H_{d}" for d in (self.k, self.p) if d > 1) or "H_1"
        return f"n={self.n}, {how}, seed={self.seed}"


def attach_r4(model: nn.Module, kind: str, seed: int) -> None:
    """Give every MLP an `OnlineHadamard` on its down_proj input (in place; the weights must hold W Q4)."""
    from qat_lightning.models.adapter import adapter_for

    ad = adapter_for(model)
    for layer in ad.layers(model):
        mlp = ad.mlp(layer)
        if isinstance(getattr(mlp, R4_ATTR, None), OnlineHadamard):
            getattr(mlp, R4_ATTR)._ensure_down_hook(mlp, ())  # down_proj may have been replaced since
            continue
        rot = OnlineHadamard(ad.intermediate_size, kind, seed)
        rot.to(device=mlp.down_proj.weight.device)
        mlp.add_module(R4_ATTR, rot)
        mlp.register_forward_pre_hook(rot._ensure_down_hook)
        rot._ensure_down_hook(mlp, ())


# -- R3: a registered attention function rotating q and k, then calling the wrapped implementation --------
def r3_attention_name(inner: str) -> str:
    return f"{_R3_PREFIX}{inner}"


def _r3_attention(inner: str):
    """An attention function: ``q, k -> q Q3, k Q3`` per head (B, H, T, hd), then the `inner` implementation."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward

        rot = getattr(module, R3_ATTR, None)
        if rot is not None:
            query, key = rot(query), rot(key)  # (B, H, T, hd), (B, n_kv, T, hd)
        fn = eager_attention_forward if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]
        return fn(module, query, key, value, attention_mask, **kwargs)

    return attention


def _mask_root(impl: str) -> str:
    """The mask implementation an attention name uses: that of the innermost sdpa / eager."""
    for root in ("sdpa", "eager"):
        if impl == root or impl.endswith(f"_{root}"):
            return root
    raise ValueError(f"R3 wraps sdpa or eager attention (or a wrapper of them), not {impl!r}")


def _register_r3(inner: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = r3_attention_name(inner)
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _r3_attention(inner))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[_mask_root(inner)])
    return name


def r3_split(impl: str) -> tuple[bool, str]:
    """("qat_r3_<inner>") -> (True, inner); any other name -> (False, name). For quant/kv.py's re-wrapping."""
    return (True, impl[len(_R3_PREFIX):]) if impl.startswith(_R3_PREFIX) else (False, impl)


def r3_join(r3: bool, inner: str) -> str:
    """The attention name running `inner` behind R3 when `r3` (registered on first use), else `inner`."""
    return _register_r3(inner) if r3 else inner


def attach_r3(model: nn.Module, kind: str, seed: int) -> None:
    """Give every attention block an `OnlineHadamard` (head_dim) on q and k after RoPE (in place).

    Wraps the current attention implementation (``sdpa``, ``eager`` or quant/kv.py's ``qat_kv_*``) as
    ``qat_r3_<impl>``, so the rotation runs before a post-RoPE KV quantizer. Idempotent.
    """
    from qat_lightning.models.adapter import adapter_for

    ad = adapter_for(model)
    for layer in ad.layers(model):
        attn = ad.attention(layer)
        if not isinstance(getattr(attn, R3_ATTR, None), OnlineHadamard):
            rot = OnlineHadamard(ad.head_dim, kind, seed)
            attn.add_module(R3_ATTR, rot.to(device=attn.q_proj.weight.device))
    impl = model.config._attn_implementation or "sdpa"
    if not impl.startswith(_R3_PREFIX):
        _mask_root(impl)  # clear error for flash / flex attention
        model.config._attn_implementation = _register_r3(impl)
