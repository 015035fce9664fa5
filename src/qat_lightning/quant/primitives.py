"""Pure quantization functions: scales, fake quantization with a straight-through estimator, int codes.

Every function takes a tensor and a `QuantSpec`. Scales are computed on a view of `x` grouped for the
spec's granularity (see `group_view`): the scale tensor has the view's shape with the last dim reduced
to 1, so `scale` broadcasts against `group_view(x, spec)`.

Conventions (match torchao's `choose_qparams_affine` / `quantize_affine` / `dequantize_affine`):

* symmetric: ``scale = max|x| / qmax`` with ``qmax = 2^(b-1) - 1``, ``q = clamp(round(x / scale), qmin, qmax)``;
  ``qmin = -qmax`` (narrow range, the reference) or ``-2^(b-1)``. Zero point 0.
* asymmetric: the range is widened to contain 0 so that 0 is exact (as torchao and PyTorch observers do):
  ``lo = min(min x, 0)``, ``hi = max(max x, 0)``, ``scale = (hi - lo) / (2^b - 1)``,
  ``zero_point = round(-lo / scale)``, ``q = clamp(round(x / scale) + zero_point, 0, 2^b - 1)``.
* ``x / scale`` is computed as ``x * (1 / scale)`` (faster; what torchao does); rounding is half-to-even.
* "seq" (the reference's 2-bit quantizer): ``scale = mean|x|``, codes ``clamp(floor(x / scale), -2, 1)``
  stand for the levels ``code + 0.5`` (no zero level): a zero point of -0.5, so ``(q - zero_point) * scale``
  decodes it like any other grid.
* scales are clamped to ``torch.finfo(dtype).tiny`` so zero rows give zeros, never NaN/inf.
* everything runs in the input dtype; the output has the input's dtype and shape.
* "ggml" (llama.cpp's Q4_0 / Q8_0, `quant/ggml.py`): blocks of 32, codes from the float32 scale with
  ggml-quants.c's rounding, values ``fp16(d) * code``; computed in float32 whatever the input dtype. Scales
  returned here are the stored fp16 ones (as floats); Q4_0's is negative when the block's extreme is positive.
  With `rope_head_dim` (keys) the blocks run over llama.cpp's order of each head's dims, and with `hadamard`
  over Walsh-Hadamard rotated chunks (llama.cpp's quantized KV cache); rotated codes exist only in llama.cpp's
  layout, so `quantize_to_int` / `dequantize` refuse `hadamard` specs (the fake quantizer handles them).
"""

from __future__ import annotations

import math

import torch

from qat_lightning.quant import ggml
from qat_lightning.quant.spec import QuantSpec

__all__ = [
    "compute_scale_zero",
    "dequantize",
    "fake_quantize",
    "group_view",
    "lsq_grad_scale",
    "quantize_to_int",
    "round_to_grid",
]


def group_view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View `x` so that each scale covers the last dim (of the view) or, for "tensor", everything.

    channel/token: ``x`` itself (one scale per row of the last dim).
    group/head: ``(..., n_groups, size)``. tensor: ``x`` itself, reduced over all dims.
    """
    if spec.granularity in ("group", "head"):
        size = spec.group_size if spec.granularity == "group" else spec.head_dim
        last = x.shape[-1] if x.dim() else 1
        if x.dim() == 0 or last % size != 0:
            what = "group_size" if spec.granularity == "group" else "head_dim"
            raise ValueError(f"{what}={size} does not divide the last dim {last} of a tensor of shape {tuple(x.shape)}")
        return x.unflatten(-1, (last // size, size))  # (..., G, size)
    if spec.granularity in ("channel", "token") and x.dim() == 0:
        raise ValueError(f"granularity {spec.granularity!r} needs a tensor with at least one dim")
    return x


def _range(xg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of each scale group, keepdim; MinMax or percentile clipping."""
    per_tensor = spec.granularity == "tensor"
    flat = xg.reshape(1, -1) if per_tensor else xg  # reduce over the last dim only
    if spec.estimator == "minmax":
        lo, hi = torch.aminmax(flat, dim=-1, keepdim=True)
    else:  # "clip": k-th smallest value, k = ceil(p * n) (the inverted-CDF percentile)
        n = flat.shape[-1]
        k = min(n, max(1, math.ceil(spec.clip_percentile * n - 1e-9)))
        if spec.symmetric:
            hi = flat.abs().kthvalue(k, dim=-1, keepdim=True).values
            lo = -hi
        else:
            hi = flat.kthvalue(k, dim=-1, keepdim=True).values
            lo = flat.kthvalue(n - k + 1, dim=-1, keepdim=True).values
    if per_tensor:
        lo, hi = lo.reshape([1] * xg.dim()), hi.reshape([1] * xg.dim())
    return lo, hi


SEQ_ZERO_POINT = -0.5  # "seq" codes -2..1 stand for the levels code + 0.5


def _scale_zero(xg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point, None when symmetric) for an already grouped view."""
    eps = torch.finfo(xg.dtype).tiny
    if spec.estimator == "seq":
        flat = xg.reshape(1, -1) if spec.granularity == "tensor" else xg
        scale = flat.abs().mean(dim=-1, keepdim=True).clamp_(min=eps)
        if spec.granularity == "tensor":
            scale = scale.reshape([1] * xg.dim())
        return scale, None  # symmetric; its constant zero point SEQ_ZERO_POINT is applied where codes decode
    lo, hi = _range(xg, spec)
    if spec.symmetric:
        amax = torch.maximum(lo.neg(), hi)
        return amax.div_(spec.qmax).clamp_(min=eps), None
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # keep 0 exactly representable
    scale = (hi - lo).div_(spec.qmax).clamp_(min=eps)
    zero_point = torch.round(lo.neg() / scale).clamp_(0, spec.qmax)
    return scale, zero_point


def compute_scale_zero(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of `x`; both broadcast against `group_view(x, spec)`.

    The zero point is a float tensor of integers (zeros for symmetric specs).
    """
    if spec.ggml_type is not None:
        with torch.no_grad():
            d = ggml.ggml_scale(group_view(_to_ggml_order(x.detach(), spec).float(), spec), spec.ggml_type)
            d = d.to(torch.float16).float()
            d = torch.where(d == 0, torch.full_like(d, torch.finfo(torch.float32).tiny), d)  # no 1/0 downstream
            return d.to(x.dtype), torch.zeros_like(d, dtype=x.dtype)
    with torch.no_grad():
        scale, zero_point = _scale_zero(group_view(x, spec), spec)
    return scale, _full_zero_point(scale, zero_point, spec)


def _full_zero_point(scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """The zero point as a tensor like `scale`: zeros (symmetric), -0.5 ("seq") or the asymmetric one."""
    if zero_point is not None:
        return zero_point
    return torch.full_like(scale, SEQ_ZERO_POINT if spec.estimator == "seq" else 0.0)


def round_to_grid(t: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (as floats) of `t = x / scale`, clamped to the spec's levels; in place on `t`.

    Round-to-nearest plus the zero point, or for "seq" the floor (nearest of the levels code + 0.5).
    GPTQ rounds its columns with this, so its grid is the fake quantizer's grid.
    """
    if spec.ggml_type is not None:
        return t.copy_(ggml.round_ratio(t.float(), spec.ggml_type))
    return _round(t, zero_point, spec).clamp_(spec.qmin, spec.qmax)


def _round(t: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    if spec.estimator == "seq":
        return t.floor_()
    t.round_()
    return t if zero_point is None else t.add_(zero_point)


def _codes(
    xg: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec, with_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integer codes (as floats) and, optionally, the in-range mask (before clamping)."""
    q = _round(xg * scale.reciprocal(), zero_point, spec)
    mask = ((q >= spec.qmin) & (q <= spec.qmax)) if with_mask else None
    return q.clamp_(spec.qmin, spec.qmax), mask


def _to_ggml_order(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """K/V as llama.cpp's cache holds them: keys in its order of each head's dims, then Hadamard-rotated."""
    if spec.rope_head_dim:
        x = ggml.to_llama_rope_order(x, spec.rope_head_dim)
    return ggml.hadamard_rotate(x, spec.hadamard) if spec.hadamard else x


def _from_ggml_order(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Inverse of `_to_ggml_order` (the rotation is its own inverse)."""
    if spec.hadamard:
        x = ggml.hadamard_rotate(x, spec.hadamard)
    return ggml.from_llama_rope_order(x, spec.rope_head_dim) if spec.rope_head_dim else x


def _ggml_fake_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None) -> torch.Tensor:
    """llama.cpp's round trip of `x` (scale: an optional float32 d broadcasting against the group view)."""
    learn = spec.learnable and scale is not None
    y = ggml.fake_quantize_ggml(_to_ggml_order(x, spec), spec.ggml_type, spec.ste_mask, d=scale, learnable=learn,
                                scale_grad=spec.scale_grad and scale is None)
    return _from_ggml_order(y, spec)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Quantize-dequantize in one pass; backward is the straight-through estimator.

    The gradient is passed unchanged, except (a) zeroed where x fell outside the clipping range (only
    possible with the "clip" estimator or a given scale) and (b) zeroed where |x| >= spec.ste_mask.
    Plain MinMax without ste_mask saves nothing for backward.
    """

    @staticmethod
    def forward(ctx, x, spec, scale, zero_point):
        xg = group_view(x, spec)
        clipping = spec.estimator == "clip" or scale is not None
        if scale is None:
            scale, zero_point = _scale_zero(xg, spec)
        q, mask = _codes(xg, scale, zero_point, spec, with_mask=clipping)
        if zero_point is not None:
            q.sub_(zero_point)
        elif spec.estimator == "seq":
            q.sub_(SEQ_ZERO_POINT)
        y = q.mul_(scale).reshape(x.shape)
        if spec.ste_mask is not None:
            keep = x.abs() < spec.ste_mask
            mask = keep if mask is None else mask.reshape(x.shape) & keep
        if mask is not None:
            ctx.save_for_backward(mask.reshape(x.shape))
        ctx.has_mask = mask is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        if ctx.has_mask:
            (mask,) = ctx.saved_tensors
            grad = grad * mask
        return grad, None, None, None


def lsq_grad_scale(numel: int, spec: QuantSpec) -> float:
    """LSQ gradient scale 1 / sqrt(numel * Qp) (Esser et al. 2020) for a tensor of `numel` elements."""
    return 1.0 / math.sqrt(numel * spec.qmax)


class _LSQFakeQuantize(torch.autograd.Function):
    """Symmetric fake quantization with a learnable step (LSQ).

    Forward: ``s * clamp(round(x / s), qmin, qmax)``. Backward (Esser et al., ParetoQ convention), with
    ``t = x / s``: ``d/dx = 1`` for ``qmin <= t <= qmax`` else 0 (times the optional ste_mask) and
    ``d/ds = grad_scale * sum(round(t) - t  inside,  qmin below,  qmax above)`` over each scale group.
    Only ``x`` and ``s`` are saved (``x`` is the weight parameter, so no extra memory).
    """

    @staticmethod
    def forward(ctx, x, scale, spec, grad_scale):
        xg = group_view(x, spec)
        s = scale.clamp(min=torch.finfo(x.dtype).tiny)
        ctx.save_for_backward(x, s)
        ctx.spec, ctx.grad_scale = spec, grad_scale
        q, _ = _codes(xg, s, None, spec, with_mask=False)
        return q.mul_(s).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        spec = ctx.spec
        xg = group_view(x, spec)
        g = grad.reshape(xg.shape)
        t = xg * s.reciprocal()
        below, above = t < spec.qmin, t > spec.qmax
        inside = ~(below | above)
        ds = torch.where(inside, torch.round(t) - t, t.clamp(spec.qmin, spec.qmax))
        reduce_dims = tuple(i for i in range(xg.dim()) if s.shape[i] == 1 and xg.shape[i] != 1)
        grad_scale = ds * g
        if reduce_dims:
            grad_scale = grad_scale.sum(dim=reduce_dims, keepdim=True)
        grad_scale = grad_scale * ctx.grad_scale
        keep = inside
        if spec.ste_mask is not None:
            keep = keep & (xg.abs() < spec.ste_mask)
        grad_x = (g * keep).reshape(x.shape)
        return grad_x, grad_scale.reshape(s.shape), None, None


def fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize `x` with a straight-through estimator; returns `x` itself if not enabled.

    Args:
        x: any float tensor (fp32/bf16/fp16); the result has its dtype and shape.
        spec: how to quantize.
        scale: optional scale broadcasting against `group_view(x, spec)`. With ``spec.learnable`` it is
            the LSQ step and receives a gradient; otherwise it is a constant (e.g. from calibration) and
            values outside its range are clipped, with zero gradient there.
        zero_point: optional zero point for asymmetric specs with a given scale (default: from `x`).
    """
    if not spec.enabled:
        return x
    if spec.ggml_type is not None:
        return _ggml_fake_quantize(x, spec, scale)
    if scale is not None and spec.learnable:
        return _LSQFakeQuantize.apply(x, scale, spec, lsq_grad_scale(x.numel(), spec))
    if scale is not None:
        scale = scale.detach().to(x.dtype).clamp(min=torch.finfo(x.dtype).tiny)
        if not spec.symmetric and zero_point is None:  # zero point of x's own range under the given scale
            lo = _range(group_view(x.detach(), spec), spec)[0].clamp(max=0)
            zero_point = torch.round(lo.neg() / scale).clamp_(0, spec.qmax)
    return _FakeQuantizeSTE.apply(x, spec, scale, zero_point if not spec.symmetric else None)


def quantize_to_int(
    x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes of `x` (same shape as `x`) with the scale and zero point that decode them.

    Codes are int8 for symmetric specs and uint8 for asymmetric ones (levels 0..2^b-1 do not fit int8
    at 8 bits). Scale and zero point broadcast against `group_view(x, spec)`; `scale` may be given
    (e.g. a learned LSQ step). Exactly what `fake_quantize` rounds to: dequantize(codes) == fake_quantize(x).
    """
    if not spec.enabled:
        raise ValueError(f"quantize_to_int needs an enabled spec (bits <= 8), got bits={spec.bits}")
    if spec.ggml_type is not None:  # int8 codes; the stored fp16 scales, as floats of x's dtype
        if spec.hadamard:
            raise ValueError("quantize_to_int: codes of Hadamard-rotated K/V exist only in llama.cpp's rotated "
                             "layout (use quant.ggml.quantize_blocks on the rotated tensor)")
        codes, d16 = ggml.quantize_blocks(_to_ggml_order(x, spec), spec.ggml_type, d=scale)
        codes = _from_ggml_order(codes.flatten(-2), spec)  # a permutation: integers stay integers
        return codes, d16.to(x.dtype), torch.zeros_like(d16, dtype=x.dtype)
    with torch.no_grad():
        xg = group_view(x, spec)
        if scale is None:
            scale, zero_point = _scale_zero(xg, spec)
        else:
            scale = scale.detach().to(x.dtype).clamp(min=torch.finfo(x.dtype).tiny)
            zero_point = None
            if not spec.symmetric:
                zero_point = torch.round(_range(xg, spec)[0].clamp(max=0).neg() / scale).clamp_(0, spec.qmax)
        q, _ = _codes(xg, scale, zero_point, spec, with_mask=False)
        dtype = torch.int8 if spec.symmetric else torch.uint8
        zero_point = _full_zero_point(scale, zero_point, spec)
        return q.reshape(x.shape).to(dtype), scale, zero_point


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Float values ``(q - zero_point) * scale`` in the scale's dtype, shape of `q`."""
    if spec.hadamard:
        raise ValueError("dequantize: codes of Hadamard-rotated K/V exist only in llama.cpp's rotated layout")
    if spec.rope_head_dim:  # codes in x's order, scales per block of llama.cpp's order
        return _from_ggml_order(dequantize(_to_ggml_order(q, spec), scale, zero_point, spec.no_rope_order), spec)
    qg = group_view(q, spec).to(scale.dtype)
    if zero_point is not None:
        qg = qg - zero_point
    elif spec.estimator == "seq":  # symmetric codes stored without zero points (the exporter)
        qg = qg - SEQ_ZERO_POINT
    return (qg * scale).reshape(q.shape)
