"""llama.cpp's block formats Q4_0 and Q8_0 as pure PyTorch functions, bit for bit.

Why: a student trained for these exact grids can be written into a GGUF file code for code (no second
quantization), and its fake-quantized forward is what llama.cpp computes. The arithmetic is the reference
of ggml-quants.c as the `gguf` package writes it (`gguf.quants.Q4_0/Q8_0.quantize_blocks`), float32
throughout, so `tests/test_ggml.py` compares bytes:

* blocks of ``QK = 32`` consecutive values of the last dim (a weight's input dim, an activation's hidden
  dim, a K/V row's head dim), one scale ``d`` per block, stored as fp16;
* Q4_0: ``m`` = the value of largest magnitude (signed, first one on ties), ``d = m / -8``,
  codes ``clamp(trunc(x * (1/d) + 8.5), 0, 15) - 8`` in -8..7 (the -8 level holds ``m`` itself);
* Q8_0: ``d = max|x| / 127``, codes ``roundf(x * (1/d))`` (half away from zero) in -127..127;
* codes use the float32 ``d``, values decode as ``fp16(d) * code`` (what llama.cpp dequantizes);
  a block of zeros has ``d = 0`` and codes 0 (Q4_0 stores 8, i.e. 0).

Also the row permutation llama.cpp's converter applies to q_proj/k_proj (`permute_rope_rows`): it
interleaves the two RoPE halves of every head, so a key's blocks of 32 along the head dim in llama.cpp's
cache are not contiguous in HF's layout (`to_llama_rope_order` maps one to the other).

And the rotation llama.cpp applies to a quantized KV cache (llama-kv-cache.cpp `attn_rot_k/v`, on unless
LLAMA_ATTN_ROT_DISABLE=1, for head dims divisible by 64): keys (after RoPE, with the queries) and values
are multiplied by an orthonormal Walsh-Hadamard matrix in chunks of `kv_rotation_size` along the head dim
before they are stored, and the attention output is rotated back. The cache holds blocks of the rotated
vectors, so what the attention effectively reads is ``H · fq(H · k)`` (`hadamard_rotate`; H = H^T = H^-1).
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "BLOCK_BYTES",
    "GGML_TYPES",
    "QK",
    "QRANGE",
    "TYPE_OF_BITS",
    "dequantize_blocks",
    "fake_quantize_ggml",
    "hadamard",
    "hadamard_rotate",
    "kv_rotation_size",
    "from_llama_rope_order",
    "ggml_codes",
    "ggml_scale",
    "pack_blocks",
    "permute_rope_rows",
    "quantize_blocks",
    "round_ratio",
    "to_llama_rope_order",
    "unpack_blocks",
    "unpermute_rope_rows",
]

QK = 32  # QK4_0 == QK8_0: values per block
GGML_TYPES = ("q4_0", "q8_0")
TYPE_OF_BITS = {4: "q4_0", 8: "q8_0"}
QRANGE = {"q4_0": (-8, 7), "q8_0": (-127, 127)}  # the integer codes each type can hold
BLOCK_BYTES = {"q4_0": 2 + QK // 2, "q8_0": 2 + QK}  # fp16 d, then the codes (two per byte for Q4_0)


def _check_type(qtype: str) -> None:
    if qtype not in GGML_TYPES:
        raise ValueError(f"unknown ggml type {qtype!r}; expected one of {GGML_TYPES}")


def blocks_of(x: torch.Tensor) -> torch.Tensor:
    """View (..., n) as (..., n // 32, 32); the last dim must be a multiple of 32."""
    if x.dim() == 0 or x.shape[-1] % QK:
        raise ValueError(f"ggml blocks need a last dim divisible by {QK}, got a tensor of shape {tuple(x.shape)}")
    return x.unflatten(-1, (x.shape[-1] // QK, QK))


def ggml_scale(xb: torch.Tensor, qtype: str) -> torch.Tensor:
    """float32 scale ``d`` (..., nb, 1) of float32 blocks `xb` (..., nb, 32): the one the codes are made with."""
    _check_type(qtype)
    if qtype == "q8_0":
        return xb.abs().amax(dim=-1, keepdim=True) / 127
    imax = xb.abs().argmax(dim=-1, keepdim=True)  # first index of the largest magnitude (numpy's argmax too)
    return xb.gather(-1, imax) / -8


def _roundf(t: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), exactly as `gguf.quants.np_roundf` computes it in float32."""
    a = t.abs()
    f = a.floor()
    return torch.sign(t) * (f + (2 * (a - f)).floor())


def round_ratio(t: torch.Tensor, qtype: str) -> torch.Tensor:
    """Codes (float32, signed) of ``t = x * (1/d)``: Q4_0 ``clamp(trunc(t + 8.5), 0, 15) - 8``, Q8_0 ``roundf(t)``."""
    _check_type(qtype)
    if qtype == "q4_0":
        return (t + 8.5).trunc().clamp_(0, 15).sub_(8)  # a separate add after the multiply (no FMA), as numpy
    return _roundf(t).clamp_(-127, 127)  # the clamp only bites under a given (calibrated) scale


def ggml_codes(xb: torch.Tensor, d: torch.Tensor, qtype: str) -> torch.Tensor:
    """Integer codes (float32, signed) of blocks `xb` (..., nb, 32) under float32 scales `d` (..., nb, 1)."""
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return round_ratio(xb * inv, qtype)


def quantize_blocks(x: torch.Tensor, qtype: str, d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int8 (..., nb, 32) and fp16 scales (..., nb, 1) of `x` (..., n): what a GGUF stores.

    `d` (float32, (..., nb, 1)) replaces the format's own scale, e.g. a learned or calibrated one.
    """
    with torch.no_grad():
        xb = blocks_of(x.detach().float())
        d = ggml_scale(xb, qtype) if d is None else d.detach().float()
        return ggml_codes(xb, d, qtype).to(torch.int8), d.to(torch.float16)


def dequantize_blocks(codes: torch.Tensor, d16: torch.Tensor) -> torch.Tensor:
    """float32 values (..., n) of codes (..., nb, 32) and fp16 scales (..., nb, 1): ``fp16(d) * code``."""
    return (d16.float() * codes.float()).flatten(-2)


class _GGMLFakeQuantizeSTE(torch.autograd.Function):
    """Quantize-dequantize in llama.cpp's grid; backward is the straight-through estimator.

    The gradient passes unchanged (the Q4_0/Q8_0 ranges cover every value of the block, so nothing is
    clipped except under a given scale), and is zeroed where |x| >= ste_mask when that is set.
    """

    @staticmethod
    def forward(ctx, x, qtype, ste_mask, d):
        xb = blocks_of(x.float())  # (..., nb, 32)
        d = ggml_scale(xb, qtype) if d is None else d.detach().float()
        q = ggml_codes(xb, d, qtype)
        y = (d.to(torch.float16).float() * q).reshape(x.shape).to(x.dtype)
        ctx.has_mask = ste_mask is not None
        if ctx.has_mask:
            ctx.save_for_backward(x.abs() < ste_mask)
        return y

    @staticmethod
    def backward(ctx, grad):
        if ctx.has_mask:
            (keep,) = ctx.saved_tensors
            grad = grad * keep
        return grad, None, None, None


class _GGMLFakeQuantizeScaleGrad(torch.autograd.Function):
    """llama.cpp's round trip under its own scale, with the gradient also flowing through that scale.

    Why: the plain STE treats ``d`` as a constant, so a student never learns that one large value spoils the
    other 31 of its block (``d`` is set by the block's largest value). Here, with ``t = x / d``, ``q`` the
    code and ``g`` the incoming gradient: ``d/dx = g`` straight through the rounding (as the STE), plus, at
    the block's largest value ``x_m``, ``dd/dx_m * sum(g * (q - t))`` over the block (LSQ's gradient on the
    step, chained to the value that sets it): ``dd/dx_m = -1/8`` (Q4_0, ``d = m / -8``) and
    ``sign(x_m) / 127`` (Q8_0, ``d = max|x| / 127``). The fp16 rounding of ``d`` passes straight through.
    Forward is bit for bit `_GGMLFakeQuantizeSTE`'s.
    """

    @staticmethod
    def forward(ctx, x, qtype, ste_mask):
        xb = blocks_of(x.float())  # (..., nb, 32)
        imax = xb.abs().argmax(dim=-1, keepdim=True)  # (..., nb, 1), the index ggml_scale reads
        d = ggml_scale(xb, qtype)
        q = ggml_codes(xb, d, qtype)
        ctx.save_for_backward(x, imax, d)  # d: one float per block, kept rather than searched for again
        ctx.qtype, ctx.ste_mask = qtype, ste_mask
        return (d.to(torch.float16).float() * q).reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, imax, d = ctx.saved_tensors
        xb = blocks_of(x.float())
        t = xb * torch.where(d == 0, torch.zeros_like(d), 1 / d)  # a zero block stays zero
        q = round_ratio(t, ctx.qtype)
        g = blocks_of(grad.float())
        grad_d = ((q - t) * g).sum(dim=-1, keepdim=True)  # (..., nb, 1)
        x_m = xb.gather(-1, imax)
        dd_dxm = torch.full_like(x_m, -1 / 8) if ctx.qtype == "q4_0" else torch.sign(x_m) / 127
        gx = g if ctx.ste_mask is None else g * (xb.abs() < ctx.ste_mask)
        gx = gx.scatter_add(-1, imax, grad_d * dd_dxm)
        return gx.reshape(x.shape).to(x.dtype), None, None


class _GGMLLearnedScale(torch.autograd.Function):
    """llama.cpp's round trip under a learned block scale `d` (LSQ, Esser et al. 2020), in the same grid.

    Why: the file stores any fp16 ``d`` with any codes in the type's range, and llama.cpp decodes
    ``fp16(d) * code`` whatever chose them, so ``d = m / -8`` is only the quantizer's default. Forward is
    exactly `_GGMLFakeQuantizeSTE` with a given ``d``; backward, with ``t = x / d`` and ``q`` the code:
    ``d/dx = 1`` where ``qmin <= t <= qmax`` (else 0, clipped), ``d/dd = grad_scale * sum(q - t)`` over
    the block inside the range and ``sum(q)`` outside (the fp16 rounding of ``d`` passes straight through).
    """

    @staticmethod
    def forward(ctx, x, d, qtype, ste_mask, grad_scale):
        xb = blocks_of(x.float())  # (..., nb, 32)
        d32 = d.float()  # (..., nb, 1), a parameter
        q = ggml_codes(xb, d32, qtype)
        ctx.save_for_backward(x, d)
        ctx.qtype, ctx.ste_mask, ctx.grad_scale = qtype, ste_mask, grad_scale
        return (d32.to(torch.float16).float() * q).reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, d = ctx.saved_tensors
        qmin, qmax = QRANGE[ctx.qtype]
        xb, d32 = blocks_of(x.float()), d.float()
        t = xb * torch.where(d32 == 0, torch.zeros_like(d32), 1 / d32)  # a zero block stays zero
        q = round_ratio(t, ctx.qtype)
        g = blocks_of(grad.float())
        inside = (t >= qmin) & (t <= qmax)
        grad_d = (torch.where(inside, q - t, q) * g).sum(dim=-1, keepdim=True) * ctx.grad_scale
        keep = inside if ctx.ste_mask is None else inside & (xb.abs() < ctx.ste_mask)
        grad_x = (g * keep).reshape(x.shape).to(x.dtype)
        return grad_x, grad_d.to(d.dtype), None, None, None


def fake_quantize_ggml(
    x: torch.Tensor,
    qtype: str,
    ste_mask: float | None = None,
    d: torch.Tensor | None = None,
    learnable: bool = False,
    scale_grad: bool = False,
) -> torch.Tensor:
    """`x` (..., n) through llama.cpp's `qtype` round trip, in x's dtype and shape (computed in float32).

    `d` (float32 (..., nb, 1)) replaces the format's scale: a constant (calibrated, gradient STE), or with
    `learnable` a learned step that receives the LSQ gradient (grad scale ``1/sqrt(32 * qmax)``, per block).
    `scale_grad` (format's own scale only) also sends the gradient through ``d`` to the block's largest value
    (`_GGMLFakeQuantizeScaleGrad`).
    """
    _check_type(qtype)
    if scale_grad:
        if d is not None or learnable:
            raise ValueError("fake_quantize_ggml: scale_grad is for the format's own scale (no d, not learnable)")
        return _GGMLFakeQuantizeScaleGrad.apply(x, qtype, ste_mask)
    if learnable:
        if d is None:
            raise ValueError("fake_quantize_ggml: learnable=True needs the learned scale d")
        grad_scale = 1.0 / math.sqrt(QK * QRANGE[qtype][1])
        return _GGMLLearnedScale.apply(x, d, qtype, ste_mask, grad_scale)
    return _GGMLFakeQuantizeSTE.apply(x, qtype, ste_mask, d)


def pack_blocks(codes: torch.Tensor, d16: torch.Tensor, qtype: str) -> torch.Tensor:
    """GGUF bytes uint8 (..., nb * block_bytes) of codes int8 (..., nb, 32) and fp16 scales (..., nb, 1).

    Q4_0 block: fp16 d, then 16 bytes whose low nibbles are codes 0..15 (+8) and high nibbles codes 16..31.
    Q8_0 block: fp16 d, then the 32 codes as int8.
    """
    _check_type(qtype)
    d_bytes = d16.to(torch.float16).contiguous().view(torch.uint8)  # (..., nb, 2), little-endian like numpy
    if qtype == "q8_0":
        q_bytes = codes.to(torch.int8).contiguous().view(torch.uint8)  # (..., nb, 32)
    else:
        u = (codes.to(torch.int16) + 8).to(torch.uint8)  # (..., nb, 32) in 0..15
        q_bytes = u[..., : QK // 2] | (u[..., QK // 2 :] << 4)  # (..., nb, 16)
    return torch.cat([d_bytes, q_bytes], dim=-1).flatten(-2)


def unpack_blocks(data: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_blocks`: uint8 (..., nb * block_bytes) -> codes int8 (..., nb, 32), fp16 d (..., nb, 1)."""
    _check_type(qtype)
    size = BLOCK_BYTES[qtype]
    if data.shape[-1] % size:
        raise ValueError(f"{qtype} rows hold a multiple of {size} bytes, got {data.shape[-1]}")
    b = data.to(torch.uint8).unflatten(-1, (data.shape[-1] // size, size))  # (..., nb, size)
    d16 = b[..., :2].contiguous().view(torch.float16)  # (..., nb, 1)
    q = b[..., 2:]
    if qtype == "q8_0":
        return q.contiguous().view(torch.int8), d16
    codes = torch.cat([q & 0x0F, q >> 4], dim=-1).to(torch.int8) - 8  # (..., nb, 32)
    return codes, d16


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter permutation of q_proj/k_proj rows (convert_hf_to_gguf `LlamaModel.permute`).

    w (n_head * head_dim, ...): within each head, rows (first half, second half) become interleaved pairs,
    row ``2j + s`` of the result is row ``s * head_dim/2 + j`` of `w`, so llama.cpp's RoPE on adjacent
    pairs equals HF's rotate-half. Blocks run along the other dim, so quantized rows move whole.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `permute_rope_rows` (what transformers applies when it reads a GGUF)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_llama_rope_order(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x (..., n_heads * head_dim) in HF's order -> llama.cpp's order of each head's dims (the permuted rows)."""
    return x.unflatten(-1, (-1, 2, head_dim // 2)).transpose(-1, -2).flatten(-3)


def from_llama_rope_order(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of `to_llama_rope_order`."""
    return x.unflatten(-1, (-1, head_dim // 2, 2)).transpose(-1, -2).flatten(-3)


def kv_rotation_size(head_dim: int, which: str) -> int | None:
    """Chunk size of llama.cpp's Hadamard rotation of a quantized K or V cache, None when it applies none.

    Keys: the largest power of two >= 64 dividing the head dim; values: 64 (llama.cpp build_input_k/v_rot).
    """
    if head_dim % 64:
        return None
    if which == "v":
        return 64
    n = 64
    while head_dim % (2 * n) == 0:
        n *= 2
    return n


@functools.lru_cache(maxsize=8)
@torch.inference_mode(False)  # a cached tensor first built while scoring must still serve a later training step
def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:  # Sylvester: [[H, H], [H, -H]], as ggml_gen_hadamard builds it
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).float()


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal, symmetric Walsh-Hadamard matrix (n, n) of llama.cpp's KV rotation (n a power of 2)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Walsh-Hadamard matrix needs a power-of-two size, got {n}")
    return _hadamard(n)


def hadamard_rotate(x: torch.Tensor, n: int) -> torch.Tensor:
    """x (..., m * n) with each chunk of n along the last dim multiplied by H (its own inverse), in x's dtype."""
    h = hadamard(n).to(device=x.device)
    y = x.float().unflatten(-1, (-1, n)) @ h  # H symmetric: row-vector form of H · chunk
    return y.flatten(-2).to(x.dtype)
