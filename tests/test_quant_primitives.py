"""Exact numerics of the fake quantizer: hand-computed cases, torchao's affine primitives, STE and LSQ gradients."""

from __future__ import annotations

import math

import pytest
import torch

from qat_lightning.quant.primitives import (
    compute_scale_zero,
    dequantize,
    fake_quantize,
    group_view,
    lsq_grad_scale,
    quantize_to_int,
)
from qat_lightning.quant.spec import QuantSpec

BITS = list(range(2, 9))
GRANULARITIES = ["tensor", "channel", "group", "token", "head"]


def spec_for(granularity: str, bits: int = 4, **kw) -> QuantSpec:
    if granularity == "group":
        kw.setdefault("group_size", 8)
    if granularity == "head":
        kw.setdefault("head_dim", 8)
    return QuantSpec(bits=bits, granularity=granularity, **kw)


def sample(granularity: str, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A weight (out, in) for weight granularities, an activation (B, T, H) for token/head."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, 32) if granularity in ("token", "head") else (6, 32)
    return (torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 3).to(dtype)


# --- hand-computed cases -------------------------------------------------------------------------


def test_symmetric_per_channel_by_hand():
    # 4-bit, row 0: max|x| = 3.5 -> scale 0.5; x/s = 7, -2.5, 1.5, 0.5 -> round half to even: 7, -2, 2, 0
    # row 1: max|x| = 0.7 -> scale 0.1; x/s = -7, 0, 2.3, 0.6 -> -7, 0, 2, 1
    x = torch.tensor([[3.5, -1.25, 0.75, 0.25], [-0.7, 0.0, 0.23, 0.06]])
    y = fake_quantize(x, QuantSpec(bits=4))
    assert torch.equal(y[0], torch.tensor([3.5, -1.0, 1.0, 0.0]))
    torch.testing.assert_close(y[1], torch.tensor([-0.7, 0.0, 0.2, 0.1]), rtol=1e-6, atol=1e-7)
    # 3-bit (qmax 3), row 0: s = 3.5/3; x/s = 3, -1.07, 0.64, 0.21 -> 3, -1, 1, 0
    s0 = 3.5 / 3
    y3 = fake_quantize(x[:1], QuantSpec(bits=3))
    torch.testing.assert_close(y3, torch.tensor([[3 * s0, -s0, s0, 0.0]]), rtol=1e-6, atol=0)


def test_asymmetric_by_hand():
    # 2-bit: lo=-1, hi=2 -> scale 1, zero point 1; q = round(x) + 1 = 0, 1, 1 (0.5 -> 0), 3
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    spec = QuantSpec(bits=2, symmetric=False)
    assert torch.equal(fake_quantize(x, spec), torch.tensor([[-1.0, 0.0, 0.0, 2.0]]))
    q, scale, zp = quantize_to_int(x, spec)
    assert torch.equal(q, torch.tensor([[0, 1, 1, 3]], dtype=torch.uint8))
    assert scale.item() == 1.0 and zp.item() == 1.0
    # all positive row: the range is widened to include 0 -> lo=0, hi=3.5, 3 bits: scale 0.5, zero point 0
    x = torch.tensor([[0.5, 1.0, 2.0, 3.5]])
    assert torch.equal(fake_quantize(x, QuantSpec(bits=3, symmetric=False)), x)


def test_group_head_token_tensor_by_hand():
    # group 0: max 7 -> scale 1: [0.7, -7] -> [1, -7]; group 1: max 1.75 -> scale 0.25: exact
    x = torch.tensor([[0.7, -7.0, 1.75, 0.5]])
    expected = torch.tensor([[1.0, -7.0, 1.75, 0.5]])
    assert torch.equal(fake_quantize(x, QuantSpec(bits=4, granularity="group", group_size=2)), expected)
    assert torch.equal(fake_quantize(x[None], QuantSpec(bits=4, granularity="head", head_dim=2)), expected[None])
    # per channel the whole row shares scale 1: 1.75 -> 2, 0.5 -> 0 (half-even)
    assert torch.equal(fake_quantize(x, QuantSpec(bits=4)), torch.tensor([[1.0, -7.0, 2.0, 0.0]]))
    # per token on (B, T, H): each token has its own scale
    a = torch.tensor([[[3.5, 1.0], [0.25, -1.75]]])  # token 0 scale 0.5, token 1 scale 0.25: exact
    y = fake_quantize(a, QuantSpec(bits=4, granularity="token"))
    assert torch.equal(y, a)
    # per tensor: max 3.5 -> scale 0.5: 0.25/s = 0.5 -> 0, -1.75/s = -3.5 -> -4 (half-even)
    assert torch.equal(
        fake_quantize(a, QuantSpec(bits=4, granularity="tensor")), torch.tensor([[[3.5, 1.0], [0, -2.0]]])
    )


def test_narrow_range_false_adds_the_negative_level():
    x = torch.tensor([[-5.0, 4.0, 1.0, 0.25]])
    scale = torch.tensor([[0.5]])
    narrow = fake_quantize(x, QuantSpec(bits=4), scale=scale)  # levels -7..7 -> -3.5 .. 3.5
    wide = fake_quantize(x, QuantSpec(bits=4, narrow_range=False), scale=scale)  # levels -8..7
    assert torch.equal(narrow, torch.tensor([[-3.5, 3.5, 1.0, 0.0]]))
    assert torch.equal(wide, torch.tensor([[-4.0, 3.5, 1.0, 0.0]]))
    assert QuantSpec(bits=4, narrow_range=False).qmin == -8 and QuantSpec(bits=4).qmin == -7


def test_clip_estimator_by_hand():
    # |x| = 1..10, p = 0.8 -> the 8th smallest |x| = 8 is the range; -9 and 10 saturate at +-8
    x = torch.tensor([[1.0, -2, 3, -4, 5, -6, 7, -8, -9, 10]], requires_grad=True)
    spec = QuantSpec(bits=4, estimator="clip", clip_percentile=0.8)
    y = fake_quantize(x, spec)
    expected = fake_quantize(x.detach().clamp(-8, 8), QuantSpec(bits=4))  # MinMax of the clipped row
    assert torch.equal(y, expected)
    assert y[0, -1].item() == pytest.approx(8.0) and y[0, -2].item() == pytest.approx(-8.0)
    y.sum().backward()  # clipped entries get no gradient
    assert torch.equal(x.grad, torch.tensor([[1.0] * 8 + [0.0, 0.0]]))
    full = QuantSpec(bits=4, estimator="clip", clip_percentile=1.0)
    assert torch.equal(fake_quantize(x.detach(), full), fake_quantize(x.detach(), QuantSpec(bits=4)))


# --- against torchao -----------------------------------------------------------------------------


def _block_size(x: torch.Tensor, spec: QuantSpec) -> tuple[int, ...]:
    if spec.granularity == "tensor":
        return tuple(x.shape)
    last = {"group": spec.group_size, "head": spec.head_dim}.get(spec.granularity, x.shape[-1])
    return (1,) * (x.dim() - 1) + (last,)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_matches_torchao_affine(granularity, symmetric, bits):
    """Ours == torchao's choose/quantize/dequantize_affine with quant range (-qmax, qmax) or (0, 2^b-1)."""
    qp = pytest.importorskip("torchao.quantization.quant_primitives")
    spec = spec_for(granularity, bits, symmetric=symmetric)
    x = sample(granularity, seed=bits)
    block = _block_size(x, spec)
    mapping = qp.MappingType.SYMMETRIC if symmetric else qp.MappingType.ASYMMETRIC
    dtype = torch.int8 if symmetric else torch.uint8
    scale, zp = qp.choose_qparams_affine(x, mapping, block, dtype, spec.qmin, spec.qmax)
    q_ref = qp.quantize_affine(x, block, scale, zp, dtype, spec.qmin, spec.qmax)
    y_ref = qp.dequantize_affine(q_ref, block, scale, zp, dtype, spec.qmin, spec.qmax, output_dtype=x.dtype)

    q, our_scale, our_zp = quantize_to_int(x, spec)
    assert torch.equal(our_scale.flatten(), scale.flatten())
    assert torch.equal(our_zp.flatten(), zp.flatten().float())
    assert torch.equal(q, q_ref)
    assert torch.equal(fake_quantize(x, spec), y_ref)


def test_narrow_range_false_matches_torchao_with_a_given_scale():
    qp = pytest.importorskip("torchao.quantization.quant_primitives")
    x = sample("channel")
    spec = QuantSpec(bits=4, narrow_range=False)
    scale, _ = compute_scale_zero(x, spec)
    scale = scale * 0.8  # a tighter range so the -8 level and clipping are used
    q, _, _ = quantize_to_int(x, spec, scale=scale)
    q_ref = qp.quantize_affine(x, (1, x.shape[-1]), scale, torch.zeros_like(scale), torch.int8, -8, 7)
    assert torch.equal(q, q_ref) and (q == -8).any()


# --- properties over every granularity, sym/asym, bits 2..8 --------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_error_bounded_by_half_step_and_levels(granularity, symmetric, bits):
    spec = spec_for(granularity, bits, symmetric=symmetric)
    x = sample(granularity, seed=10 + bits)
    y = fake_quantize(x, spec)
    scale, zp = compute_scale_zero(x, spec)
    xg, yg = group_view(x, spec), group_view(y, spec)
    if granularity == "tensor":
        scale = scale.reshape([1] * xg.dim())
    # MinMax never clips, so every element is within half a step of its input
    assert ((yg - xg).abs() <= scale / 2 * (1 + 1e-5)).all()
    levels = yg / scale + zp  # integer levels in [qmin, qmax]
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
    assert levels.round().min() >= spec.qmin and levels.round().max() <= spec.qmax
    q, s, z = quantize_to_int(x, spec)
    assert q.dtype == (torch.int8 if symmetric else torch.uint8)
    assert torch.equal(dequantize(q, s, z, spec), y)


@pytest.mark.parametrize("granularity", ["channel", "token", "group", "head"])
def test_outliers_kept_by_minmax(granularity):
    x = sample(granularity, seed=3)
    x.view(-1, x.shape[-1])[0, 5] = 100.0  # an outlier in the first row
    y = fake_quantize(x, spec_for(granularity, 4))
    torch.testing.assert_close(y.view(-1, x.shape[-1])[0, 5], torch.tensor(100.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(y.abs().amax(-1), x.abs().amax(-1), rtol=1e-6, atol=0)  # row max reproduced


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_and_constant_rows_are_finite(granularity, symmetric, dtype):
    x = sample(granularity).to(dtype)
    rows = x.view(-1, x.shape[-1])
    rows[0] = 0.0
    rows[1] = 3.0
    rows[2] = -2.0
    spec = spec_for(granularity, 4, symmetric=symmetric)
    y = fake_quantize(x, spec)
    out = y.view(-1, x.shape[-1])
    assert torch.isfinite(y).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    if granularity != "tensor":  # the row owns its scale, so a constant row comes back exactly (up to rounding)
        torch.testing.assert_close(out[1], rows[1], rtol=1e-2, atol=0)
        torch.testing.assert_close(out[2], rows[2], rtol=1e-2, atol=0)
    assert torch.isfinite(fake_quantize(torch.zeros_like(x), spec)).all()


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_and_shape_preserved(granularity, dtype):
    x = sample(granularity, dtype=dtype).requires_grad_()
    spec = spec_for(granularity, 4, ste_mask=2.0)
    y = fake_quantize(x, spec)
    assert y.dtype == dtype and y.shape == x.shape
    y.sum().backward()
    assert x.grad.dtype == dtype
    # computed in the input dtype: bf16 and fp32 agree up to one level (a value near a rounding boundary may flip)
    xf = x.detach().float()
    ref = fake_quantize(xf, spec)
    scale, _ = compute_scale_zero(xf, spec)
    diff = group_view(y.detach().float() - ref, spec).abs()
    step = scale.reshape([1] * diff.dim()) if granularity == "tensor" else scale
    assert (diff <= step * 1.05).all()
    assert (diff > step / 2).float().mean() < 0.1  # level flips are rare


def test_given_zero_scale_is_finite():
    x = torch.randn(3, 4)
    assert torch.isfinite(fake_quantize(x, QuantSpec(bits=4), scale=torch.zeros(3, 1))).all()


def test_disabled_spec_returns_input():
    x = torch.randn(3, 4)
    for bits in (16, 32):
        spec = QuantSpec(bits=bits)
        assert not spec.enabled and fake_quantize(x, spec) is x


# --- gradients -----------------------------------------------------------------------------------


def test_ste_is_identity_by_default():
    x = torch.randn(4, 16, requires_grad=True)
    g = torch.randn(4, 16)
    fake_quantize(x, QuantSpec(bits=4)).backward(g)
    assert torch.equal(x.grad, g)


def test_ste_mask_zeroes_large_inputs():
    x = torch.tensor([[-3.0, -2.0, -1.9, 0.0, 1.5, 2.0, 2.5]], requires_grad=True)
    fake_quantize(x, QuantSpec(bits=4, granularity="token", ste_mask=2.0)).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]]))


def _lsq_reference(x, s, qmin, qmax):
    """LSQ as written in the paper: gradient-scaled step, clamp, round with a pass-through gradient."""
    gs = 1.0 / math.sqrt(x.numel() * qmax)
    s = (s - s * gs).detach() + s * gs  # value s, gradient scaled by gs
    t = torch.clamp(x / s, qmin, qmax)
    t = (t.round() - t).detach() + t
    return t * s


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("ste_mask", [None, 1.5])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_lsq_gradient_matches_paper_formula(bits, ste_mask, granularity):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(8, 16, generator=g)
    spec = QuantSpec(bits=bits, granularity=granularity, learnable=True, ste_mask=ste_mask)
    s0, _ = compute_scale_zero(x, spec)
    s0 = s0 * (0.5 + 0.7 * torch.rand(s0.shape, generator=g))  # some rows clip, some do not
    upstream = torch.randn(8, 16, generator=g)

    xa, sa = x.clone().requires_grad_(), s0.clone().requires_grad_()
    ya = fake_quantize(xa, spec, scale=sa)
    ya.backward(upstream)
    xb, sb = x.clone().requires_grad_(), s0.clone().requires_grad_()
    yb = _lsq_reference(xb, sb, spec.qmin, spec.qmax)
    yb.backward(upstream)
    mask = 1.0 if ste_mask is None else (x.abs() < ste_mask).float()

    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad * mask, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sa.grad, sb.grad, rtol=1e-5, atol=1e-7)
    assert lsq_grad_scale(x.numel(), spec) == pytest.approx(1 / math.sqrt(128 * spec.qmax))


def test_lsq_gradient_by_hand():
    # one row, 4-bit (qmax 7), s = 0.5: t = x/s = 1.2, -3.6, 9 (clipped at 7), -8 (clipped at -7)
    x = torch.tensor([[0.6, -1.8, 4.5, -4.0]], requires_grad=True)
    s = torch.tensor([[0.5]], requires_grad=True)
    y = fake_quantize(x, QuantSpec(bits=4, learnable=True), scale=s)
    assert torch.equal(y.detach(), torch.tensor([[0.5, -2.0, 3.5, -3.5]]))
    y.sum().backward()
    # d/ds: (round(t) - t) inside, qmax above, qmin below: (1 - 1.2) + (-4 + 3.6) + 7 - 7 = -0.6
    assert s.grad.item() == pytest.approx(-0.6 / math.sqrt(4 * 7), rel=1e-5)
    assert torch.equal(x.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))


def test_lsq_at_minmax_init_matches_minmax():
    x = torch.randn(6, 32)
    spec = QuantSpec(bits=4, learnable=True)
    s, _ = compute_scale_zero(x, spec)
    torch.testing.assert_close(fake_quantize(x, spec, scale=s), fake_quantize(x, QuantSpec(bits=4)), rtol=0, atol=1e-6)


# --- bad specs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 1, 9, 12, 15, -4])
def test_bad_bits_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"granularity": "row"}, "unknown granularity"),
        ({"granularity": "group"}, "group_size"),
        ({"granularity": "head"}, "head_dim"),
        ({"estimator": "mse"}, "unknown estimator"),
        ({"clip_percentile": 0.0}, "clip_percentile"),
        ({"ste_mask": -1.0}, "ste_mask"),
        ({"learnable": True, "symmetric": False}, "symmetric"),
        ({"learnable": True, "granularity": "group", "group_size": 4}, "granularity"),
    ],
)
def test_bad_spec_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(bits=4, **kwargs)


def test_group_size_must_divide_last_dim():
    with pytest.raises(ValueError, match="does not divide"):
        fake_quantize(torch.randn(4, 30), QuantSpec(bits=4, granularity="group", group_size=8))
    with pytest.raises(ValueError, match="does not divide"):
        fake_quantize(torch.randn(2, 3, 30), QuantSpec(bits=4, granularity="head", head_dim=16))


# ---- the reference's 2-bit quantizer ("seq") ------------------------------------------------------------
SEQ2 = QuantSpec(bits=2, estimator="seq")


def test_seq_2bit_by_hand():
    x = torch.tensor([[0.1, -0.3, 0.6, -1.2]])  # mean|x| = 0.55; x / 0.55 = 0.18, -0.55, 1.09, -2.18
    expected = torch.tensor([[0.5, -0.5, 1.5, -1.5]]) * 0.55  # nearest of (k + 0.5) * 0.55, k = -2..1
    assert torch.allclose(fake_quantize(x, SEQ2), expected, atol=1e-7)
    q, scale, zero = quantize_to_int(x, SEQ2)
    assert q.tolist() == [[0, -1, 1, -2]] and q.dtype == torch.int8
    assert torch.allclose(scale, torch.tensor([[0.55]])) and zero.tolist() == [[-0.5]]


@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_seq_matches_the_reference_formula(granularity):
    """Independent: the reference's levels {±0.25, ±0.75}·α, α = 2·mean|w| per row, nearest level."""
    spec = QuantSpec(bits=2, estimator="seq", granularity=granularity, group_size=8)
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    rows = {"channel": w, "group": w.reshape(16, 4, 8), "tensor": w.reshape(1, -1)}[granularity]
    alpha = 2 * rows.abs().mean(dim=-1, keepdim=True)
    grid = torch.tensor([-0.75, -0.25, 0.25, 0.75])  # (4,)
    candidates = grid * alpha.unsqueeze(-1)  # (..., 1, 4)
    nearest = (rows.unsqueeze(-1) - candidates).abs().argmin(dim=-1, keepdim=True)
    reference = candidates.expand(*rows.shape, 4).gather(-1, nearest).squeeze(-1).reshape(w.shape)
    out = fake_quantize(w, spec)
    assert torch.allclose(out, reference, atol=1e-6)
    q, scale, zero = quantize_to_int(w, spec)
    assert q.min() >= -2 and q.max() <= 1
    assert torch.equal(dequantize(q, scale, zero, spec), out)
    assert torch.equal(dequantize(q, scale, None, spec), out)  # the exporter stores no zero points


def test_seq_straight_through_gradient_and_validation():
    w = torch.randn(4, 8, requires_grad=True)
    fake_quantize(w, SEQ2).backward(torch.ones(4, 8))
    assert torch.equal(w.grad, torch.ones(4, 8))
    for bad in ({"bits": 4}, {"symmetric": False}):
        with pytest.raises(ValueError, match="seq"):
            QuantSpec(**{"bits": 2, "estimator": "seq", **bad})
