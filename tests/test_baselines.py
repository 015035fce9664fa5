"""Post-training baselines (RTN, SmoothQuant, GPTQ, AWQ) on a tiny random Llama with GQA, on CPU in seconds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from qat_lightning.baselines import (
    Method,
    available_methods,
    awq,
    awq_search_scale,
    build_method,
    collect_input_absmax,
    gptq,
    gptq_weight,
    input_hessian,
    rtn,
    smooth_model,
    smoothquant,
)
from qat_lightning.baselines.awq import awq_scaled_model
from qat_lightning.quant import QuantConfig, QuantSpec, compute_scale_zero, fake_quantize, iter_quant_linears
from qat_lightning.quant.kv import kv_quantizer_of

VOCAB = 64


def tiny_llama(seed: int = 0, outlier: float | None = None) -> nn.Module:
    """Random Llama with GQA (4 heads, 2 kv heads); `outlier` scales one input_layernorm entry per layer."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    if outlier is not None:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[5] *= outlier
    return model


def calib(seed: int = 1, n: int = 2, batch: int = 4, seq: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)} for _ in range(n)]


@torch.no_grad()
def logits_mse(model: nn.Module, ref: nn.Module, batches: list[dict]) -> float:
    errs = [(model(b["input_ids"]).logits - ref(b["input_ids"]).logits).pow(2).mean() for b in batches]
    return torch.stack(errs).mean().item()


def q_inputs_absmax(model: nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    mods = {f"{i}": layer.self_attn.q_proj for i, layer in enumerate(model.model.layers)}
    return collect_input_absmax(model, batches, mods)


# ---- SmoothQuant ---------------------------------------------------------------------------------
@pytest.mark.parametrize("smooth_vo", [False, True])
def test_smoothing_keeps_fp_logits_and_changes_weights(smooth_vo):
    teacher, batches = tiny_llama(outlier=20.0), calib()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    smoothed = smooth_model(teacher, batches, alpha=0.5, smooth_vo=smooth_vo)
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(
                smoothed(b["input_ids"]).logits, teacher(b["input_ids"]).logits, atol=1e-4, rtol=0
            )
    for k, v in teacher.state_dict().items():  # teacher untouched
        assert torch.equal(v, before[k]), k
    sd, prefix = smoothed.state_dict(), "model.layers.0."
    changed = ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj"]
    changed += ["mlp.gate_proj", "mlp.up_proj"] + (["self_attn.v_proj", "self_attn.o_proj"] if smooth_vo else [])
    for name in changed:
        key = f"{prefix}{name}.weight"
        assert not torch.allclose(sd[key], before[key]), f"{key} was not smoothed"
    if not smooth_vo:
        key = f"{prefix}self_attn.o_proj.weight"
        assert torch.equal(sd[key], before[key])


def test_smoothing_flattens_activation_channels():
    teacher, batches = tiny_llama(outlier=20.0), calib()
    smoothed = smooth_model(teacher, batches, alpha=0.5)
    a_fp, a_sm = q_inputs_absmax(teacher, batches), q_inputs_absmax(smoothed, batches)
    for layer in a_fp:
        spread_fp = (a_fp[layer].max() / a_fp[layer].min()).item()
        spread_sm = (a_sm[layer].max() / a_sm[layer].min()).item()
        assert spread_sm < 0.5 * spread_fp, (layer, spread_fp, spread_sm)
        assert a_sm[layer][5] < 0.5 * a_fp[layer][5]  # the planted outlier channel shrank


def test_smoothquant_beats_rtn_on_outlier_channel_w8a8():
    teacher, batches = tiny_llama(outlier=20.0), calib()
    qcfg = QuantConfig(w_bits=8, a_bits=8, kv_bits=16)
    err_rtn = logits_mse(rtn(teacher, qcfg), teacher, batches)
    err_sq = logits_mse(smoothquant(teacher, qcfg, batches, alpha=0.5), teacher, batches)
    assert err_sq < 0.5 * err_rtn, (err_sq, err_rtn)


def test_smooth_model_rejects_bad_alpha_and_batches():
    teacher = tiny_llama()
    with pytest.raises(ValueError, match="alpha"):
        smooth_model(teacher, calib(), alpha=1.5)
    with pytest.raises(ValueError, match="calib_batches"):
        smooth_model(teacher, [], alpha=0.5)
    with pytest.raises(ValueError, match="input_ids"):
        smooth_model(teacher, [{"input_ids": torch.rand(2, 8)}], alpha=0.5)


def test_padded_tokens_do_not_enter_statistics():
    teacher, ids = tiny_llama(), calib(n=1, seq=16)[0]["input_ids"]
    mask = torch.ones_like(ids)
    mask[:, 8:] = 0  # right padding: with causal attention the real tokens see the same context as a cut batch
    padded = q_inputs_absmax(teacher, [{"input_ids": ids, "attention_mask": mask}])
    cut = q_inputs_absmax(teacher, [{"input_ids": ids[:, :8]}])
    for k in cut:
        torch.testing.assert_close(padded[k], cut[k], atol=1e-5, rtol=1e-5)
    full = q_inputs_absmax(teacher, [{"input_ids": ids}])
    assert any(not torch.allclose(full[k], cut[k]) for k in cut)  # the padded tail would have counted


# ---- GPTQ ----------------------------------------------------------------------------------------
def correlated_inputs(n: int = 512, d: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.linspace(0.1, 2.0, d)  # unequal, correlated channels
    return torch.randn(n, d, generator=g) @ mix  # (n, d)


SPECS = [
    QuantSpec(bits=4),
    QuantSpec(bits=3),
    QuantSpec(bits=4, granularity="group", group_size=16),
]


SEQ2 = QuantSpec(bits=2, estimator="seq")  # the reference's 2-bit grid: levels (code + 0.5) * mean|row|


@pytest.mark.parametrize("spec", [*SPECS, SEQ2], ids=["w4-channel", "w3-channel", "w4-group16", "w2-seq"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_layer_error_not_worse_than_rtn(spec, act_order):
    x = correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    q_gptq = gptq_weight(w, input_hessian(x), spec, block_size=16, act_order=act_order)
    q_rtn = fake_quantize(w, spec)
    err_gptq = torch.linalg.norm(x @ w.T - x @ q_gptq.T).item()
    err_rtn = torch.linalg.norm(x @ w.T - x @ q_rtn.T).item()
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)


@pytest.mark.parametrize("spec", SPECS, ids=["w4-channel", "w3-channel", "w4-group16"])
def test_gptq_weights_lie_on_the_rtn_grid(spec):
    x, w = correlated_inputs(), torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    q = gptq_weight(w, input_hessian(x), spec, block_size=16, act_order=True)
    scale, _ = compute_scale_zero(w, spec)  # the grid of the original weight
    qg = q.unflatten(-1, (-1, spec.group_size)) if spec.granularity == "group" else q
    codes = qg / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4), "not integer multiples of the row scale"
    assert codes.round().abs().max() <= spec.qmax
    assert torch.equal(fake_quantize(q, spec, scale=scale), q)  # the fixed-scale quantizer leaves it alone
    assert not torch.equal(q, fake_quantize(w, spec))  # GPTQ did not just round to nearest


def test_gptq_on_the_seq_grid_uses_half_integer_levels():
    x, w = correlated_inputs(), torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    q = gptq_weight(w, input_hessian(x), SEQ2, block_size=16)
    scale = w.abs().mean(dim=-1, keepdim=True)  # (32, 1): the seq step of the original rows
    levels = q / scale
    assert torch.allclose(levels, levels.floor() + 0.5, atol=1e-4), "not on the levels (k + 0.5) * scale"
    assert levels.abs().max() <= 1.5 + 1e-4
    assert torch.equal(fake_quantize(q, SEQ2, scale=scale), q)  # already on the grid


def test_gptq_block_size_does_not_change_result():
    x, w = correlated_inputs(), torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    h, spec = input_hessian(x), QuantSpec(bits=4)
    q_a, q_b = gptq_weight(w, h, spec, block_size=8), gptq_weight(w, h, spec, block_size=64)
    assert (q_a != q_b).float().mean() < 0.01  # same algorithm; only float summation order differs


def test_gptq_student_beats_rtn_and_keeps_the_grid():
    teacher, batches = tiny_llama(), calib()
    qcfg = QuantConfig(w_bits=4, a_bits=8, kv_bits=8)
    student = gptq(teacher, qcfg, batches)
    err_gptq = logits_mse(student, teacher, batches)
    err_rtn = logits_mse(rtn(teacher, qcfg), teacher, batches)
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    fp = dict(teacher.named_modules())
    names = []
    for name, lin in iter_quant_linears(student):
        names.append(name)
        assert not lin.weight_spec.enabled and lin.act_spec.enabled  # weights pre-quantized, inputs RTN
        assert not lin.out_spec.enabled  # KV is quantized by each attention block's KV quantizer
        spec = qcfg.weight_spec(name)
        scale, _ = compute_scale_zero(fp[name].weight, spec)
        codes = lin.weight / scale
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.round().abs().max() <= spec.qmax, name
        assert torch.equal(lin.quantized_weight(), lin.weight)  # no re-quantization with new MinMax scales
    assert len(names) == 14
    for layer in student.model.layers:
        assert kv_quantizer_of(layer.self_attn).k_spec.enabled  # KV cache RTN


def test_gptq_respects_group_size_and_skip_overrides():
    teacher, batches = tiny_llama(), calib(n=1)
    qcfg = QuantConfig(
        w_bits=4, w_granularity="group", w_group_size=32, overrides=[{"pattern": "down_proj", "skip": True}]
    )
    student = gptq(teacher, qcfg, batches, act_order=True)
    fp = dict(teacher.named_modules())
    for name, lin in iter_quant_linears(student):
        scale, _ = compute_scale_zero(fp[name].weight, qcfg.weight_spec(name))
        codes = lin.weight.unflatten(-1, (-1, 32)) / scale  # (out, G, 32) / (out, G, 1)
        assert torch.allclose(codes, codes.round(), atol=1e-4), name
    down = dict(student.named_modules())["model.layers.1.mlp.down_proj"]
    assert type(down) is nn.Linear and torch.equal(down.weight, fp["model.layers.1.mlp.down_proj"].weight)


def test_gptq_rejects_bad_arguments():
    teacher, spec = tiny_llama(), QuantSpec(bits=4)
    with pytest.raises(ValueError, match="block_size"):
        gptq(teacher, QuantConfig(), calib(n=1), block_size=0)
    with pytest.raises(ValueError, match="hessian shape"):
        gptq_weight(torch.randn(4, 8), torch.eye(4), spec)
    with pytest.raises(ValueError, match="enabled"):
        gptq_weight(torch.randn(4, 8), torch.eye(8), QuantSpec(bits=16))


# ---- RTN -----------------------------------------------------------------------------------------
def test_rtn_weights_are_the_quantizer_applied_to_the_teacher():
    teacher = tiny_llama()
    qcfg = QuantConfig(w_bits=4, a_bits=8, kv_bits=4, overrides=[{"pattern": "down_proj", "w_bits": 8}])
    student = rtn(teacher, qcfg)
    fp = dict(teacher.named_modules())
    n = 0
    for name, lin in iter_quant_linears(student):
        expected = fake_quantize(fp[name].weight, qcfg.weight_spec(name))
        assert torch.equal(lin.quantized_weight(), expected), name
        assert not torch.equal(expected, fp[name].weight)
        n += 1
    assert n == 14 and student is not teacher and not list(iter_quant_linears(teacher))


# ---- AWQ -----------------------------------------------------------------------------------------
def test_awq_search_never_worse_than_rtn():
    torch.manual_seed(0)  # the linears' init: the result must not depend on which tests ran before
    x = correlated_inputs(d=64) * torch.linspace(0.2, 5.0, 64)  # salient channels
    lins = [nn.Linear(64, 32), nn.Linear(64, 16, bias=False)]
    off = QuantSpec(bits=16)
    specs = [(QuantSpec(bits=3), QuantSpec(bits=8, granularity="token"), off)] * 2
    s, best, rtn_err = awq_search_scale(x, lins, specs, grid=10)
    assert best <= rtn_err and best < 0.95 * rtn_err, (best, rtn_err)
    assert s.shape == (64,) and not torch.allclose(s, torch.ones_like(s))


@torch.no_grad()
def test_awq_block_output_error_not_worse_than_rtn():
    teacher, batches = tiny_llama(outlier=5.0), calib()
    qcfg = QuantConfig(w_bits=3, a_bits=8, kv_bits=8)
    students = {"rtn": rtn(teacher, qcfg), "awq": awq(teacher, qcfg, batches, grid=10)}
    proj = ("q_proj", "k_proj", "v_proj")

    def layer0_qkv(model: nn.Module) -> torch.Tensor:  # layer 0's inputs are the embeddings for every model
        outs = []
        hooks = [
            getattr(model.model.layers[0].self_attn, p).register_forward_hook(lambda m, a, o: outs.append(o))
            for p in proj
        ]
        for b in batches:
            model(b["input_ids"])
        for h in hooks:
            h.remove()
        return torch.cat([o.flatten() for o in outs])

    ref = layer0_qkv(teacher)
    err = {k: (layer0_qkv(m) - ref).pow(2).mean().item() for k, m in students.items()}
    assert err["awq"] <= err["rtn"] * (1 + 1e-4), err
    with torch.no_grad():  # the folded scales keep the FP function
        fp_awq = dataclasses.replace(qcfg, w_bits=16, a_bits=16, kv_bits=16)
        torch.testing.assert_close(
            awq(teacher, fp_awq, batches, grid=4)(batches[0]["input_ids"]).logits,
            teacher(batches[0]["input_ids"]).logits,
            atol=1e-4,
            rtol=0,
        )


@torch.no_grad()
def test_awq_down_group_scales_up_rows_and_down_columns_and_keeps_the_fp_function():
    """`down=True` (the reference's up→down group): down_proj's columns * s, up_proj's rows / s with one searched
    s per layer; the q/k/v and gate/up scales are those of `down=False`; the FP logits do not move."""
    teacher, batches = tiny_llama(outlier=5.0), calib()
    qcfg = QuantConfig(w_bits=3, a_bits=8, kv_bits=8)
    plain, with_down = awq_scaled_model(teacher, qcfg, batches, grid=10), awq_scaled_model(
        teacher, qcfg, batches, grid=10, down=True)
    moved = 0
    for a, b in zip(plain.model.layers, with_down.model.layers):
        s = b.mlp.down_proj.weight[0] / a.mlp.down_proj.weight[0]  # (intermediate,)
        torch.testing.assert_close(b.mlp.down_proj.weight, a.mlp.down_proj.weight * s, rtol=1e-5, atol=0)
        torch.testing.assert_close(b.mlp.up_proj.weight, a.mlp.up_proj.weight / s[:, None], rtol=1e-5, atol=0)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj"):
            assert torch.equal(b.get_submodule(name).weight, a.get_submodule(name).weight), name
        moved += not torch.allclose(s, torch.ones_like(s))
    assert moved > 0  # the outlier model's search leaves RTN (a = 0) somewhere
    ids = batches[0]["input_ids"]
    torch.testing.assert_close(with_down(ids).logits, teacher(ids).logits, atol=1e-4, rtol=0)
    assert build_method("awq", {"down": True}).down
    with pytest.raises(ValueError, match="down must be true or false"):
        build_method("awq", {"down": "yes"})


# ---- method objects ------------------------------------------------------------------------------
def test_every_method_builds_a_student_and_bad_input_is_refused():
    teacher, batches = tiny_llama(), calib(n=1)
    from omegaconf import OmegaConf

    qcfg = OmegaConf.create({"w_bits": 4, "a_bits": 8, "kv_bits": 8})  # a DictConfig works as well as a QuantConfig
    ids = batches[0]["input_ids"]
    methods = available_methods()
    assert {"fp", "rtn", "smoothquant", "gptq", "awq", "kvsmooth"} <= set(methods)
    for name in methods:
        method = build_method(name)
        assert isinstance(method, Method) and method.name == name
        model = method.build(teacher, qcfg, batches if method.needs_calibration else None)
        assert (model is teacher) == (name == "fp")
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all(), name
    with pytest.raises(ValueError, match="unknown method 'omniquant'"):
        build_method("omniquant")
    with pytest.raises(ValueError, match="needs calib_batches"):
        build_method("gptq").build(teacher, qcfg)
    with pytest.raises(ValueError, match="no parameter"):
        build_method("smoothquant", {"alhpa": 0.5})
    with pytest.raises(ValueError, match="percdamp"):
        build_method("gptq", {"percdamp": 1.5})


def test_method_build_is_transform_then_the_students_quantizers():
    """The one interface: evaluate's student is `quantize_model(transform(teacher))` (GPTQ: weight quantizer
    off, its weights are on the grid); `init=<method>` starts QAT from that same `transform`."""
    from qat_lightning.quant import quantize_model

    teacher, batches = tiny_llama(), calib(n=1)
    qcfg = QuantConfig(w_bits=4, a_bits=8, kv_bits=8)
    ids = batches[0]["input_ids"]
    for name in ("rtn", "smoothquant", "kvsmooth", "awq"):
        method = build_method(name)
        by_hand = quantize_model(method.transform(teacher, qcfg, batches), qcfg)
        with torch.no_grad():
            torch.testing.assert_close(method.build(teacher, qcfg, batches)(ids).logits, by_hand(ids).logits,
                                       rtol=0, atol=0)


def test_gptq_with_padding_mask_matches_cut_batch():
    teacher = tiny_llama()
    ids = calib(n=1, seq=16)[0]["input_ids"]
    mask = torch.ones_like(ids)
    mask[:, 10:] = 0
    qcfg = QuantConfig(w_bits=4, a_bits=16, kv_bits=16)
    padded = gptq(teacher, qcfg, [{"input_ids": ids, "attention_mask": mask}])
    cut = gptq(teacher, qcfg, [{"input_ids": ids[:, :10]}])
    w_p = torch.cat([m.weight.flatten() for _, m in iter_quant_linears(padded)])
    w_c = torch.cat([m.weight.flatten() for _, m in iter_quant_linears(cut)])
    assert (w_p != w_c).float().mean() < 0.01  # same Hessians up to float noise
    assert F.mse_loss(w_p, w_c) < 1e-6


def test_gptq_weights_as_qat_init_reproduce_the_gptq_student():
    """`init=gptq`: MinMax fake quantization of GPTQ's weights is GPTQ's grid again wherever a row's largest
    code is +-qmax, so QAT's step 0 is (nearly) the GPTQ baseline, far closer to the teacher than RTN."""
    from qat_lightning.baselines.gptq import gptq_weights
    from qat_lightning.quant import quantize_model

    teacher, batches = tiny_llama(), calib()
    qcfg = QuantConfig(w_bits=4, a_bits=8, kv_bits=8)
    base = gptq_weights(teacher, qcfg, batches)
    assert not any(True for _ in iter_quant_linears(base))  # plain weights, no quantizers attached
    student, ref = quantize_model(base, qcfg), gptq(teacher, qcfg, batches)
    ref_weights = {name: lin.weight for name, lin in iter_quant_linears(ref)}
    same_rows = total_rows = 0
    for name, lin in iter_quant_linears(student):
        same = (lin.quantized_weight() - ref_weights[name]).abs().amax(-1) < 1e-6  # (out,)
        same_rows, total_rows = same_rows + int(same.sum()), total_rows + same.numel()
    assert same_rows / total_rows > 0.9, (same_rows, total_rows)
    err_init = logits_mse(student, teacher, batches)
    assert err_init < 1.25 * logits_mse(ref, teacher, batches)  # the few rescaled rows cost a little
    assert err_init < 0.8 * logits_mse(rtn(teacher, qcfg), teacher, batches)


# ---- KV smoothing (flattened key channels) -------------------------------------------------------
def key_outlier_llama(factor: float = 20.0) -> nn.Module:
    """tiny_llama whose key channel pair (3, 3 + hd/2) of kv head 1 is `factor` x larger, queries compensating:
    the same FP function, but keys with an outlier channel (what real models have before RoPE). q and k are
    first scaled 10x so attention is peaked, as in trained models (at random init it is ~uniform and key
    errors do not matter)."""
    model = tiny_llama()
    hd = model.config.hidden_size // model.config.num_attention_heads  # 16
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10.0)
            layer.self_attn.k_proj.weight.mul_(10.0)
            rows = [hd + 3, hd + 3 + hd // 2]  # kv head 1; read by query heads 2 and 3
            layer.self_attn.k_proj.weight[rows] *= factor
            for h in (2, 3):
                layer.self_attn.q_proj.weight[[h * hd + 3, h * hd + 3 + hd // 2]] /= factor
    return model


@pytest.mark.parametrize("v_alpha", [None, 0.5])
def test_kv_smoothing_keeps_fp_logits_and_flattens_key_pairs(v_alpha):
    from qat_lightning.baselines import kv_smooth_model
    from qat_lightning.baselines.kv_smooth import collect_output_absmax

    teacher, batches = key_outlier_llama(), calib()
    smoothed = kv_smooth_model(teacher, batches, v_alpha=v_alpha)
    v_new, v_old = smoothed.model.layers[1].self_attn.v_proj.weight, teacher.model.layers[1].self_attn.v_proj.weight
    assert torch.equal(v_new, v_old) == (v_alpha is None)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(smoothed(ids).logits, teacher(ids).logits, rtol=1e-4, atol=1e-4)
    k_new, k_old = smoothed.model.layers[0].self_attn.k_proj.weight, teacher.model.layers[0].self_attn.k_proj.weight
    assert not torch.equal(k_new, k_old)
    hd = 16
    before, after = collect_output_absmax(teacher, batches), collect_output_absmax(smoothed, batches)
    for m0, m1 in zip(before, after):
        pair = m1.view(-1, 2, hd // 2).amax(dim=1)  # (n_kv, hd/2) pair ranges after smoothing
        assert torch.allclose(pair, pair.mean().expand_as(pair), rtol=1e-4)  # all equal
        assert m0.max() / m0.min() > 10 and m1.max() / m1.min() < m0.max() / m0.min()


def test_kv_smoothing_cuts_kv4_error_and_strength_0_is_rtn():
    from qat_lightning.baselines import kv_smooth

    teacher, batches = key_outlier_llama(), calib()
    qcfg = QuantConfig(w_bits=16, a_bits=16, kv_bits=4)
    err_rtn = logits_mse(rtn(teacher, qcfg), teacher, batches)
    err_smooth = logits_mse(kv_smooth(teacher, qcfg, batches), teacher, batches)
    assert err_smooth < 0.5 * err_rtn, (err_smooth, err_rtn)
    err_identity = logits_mse(kv_smooth(teacher, qcfg, batches, strength=0.0), teacher, batches)
    assert err_identity == pytest.approx(err_rtn, rel=1e-4)
    with pytest.raises(ValueError, match="strength"):
        kv_smooth(teacher, qcfg, batches, strength=1.5)


def test_quarot_kvsmooth_is_the_rotated_teacher_with_kvsmooths_keys():
    """R1+R2 leave k_proj's outputs unchanged, so `quarot_kvsmooth` = QuaRot's rotation + kvsmooth's key
    scales: FP logits kept, the rotation recorded, and its KV4 error kvsmooth's, well under QuaRot's."""
    from qat_lightning.rotate import rotation_of

    teacher, batches = key_outlier_llama(), calib()
    both = build_method("quarot_kvsmooth").transform(teacher, None, batches)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(both(ids).logits, teacher(ids).logits, rtol=1e-4, atol=1e-4)
    assert rotation_of(both)["r1"] and rotation_of(both)["r2"]
    kv4 = QuantConfig(w_bits=16, a_bits=16, kv_bits=4)
    err = {name: logits_mse(build_method(name).build(teacher, kv4, batches), teacher, batches)
           for name in ("quarot", "kvsmooth", "quarot_kvsmooth")}
    assert err["quarot_kvsmooth"] < 0.5 * err["quarot"], err
    assert err["quarot_kvsmooth"] == pytest.approx(err["kvsmooth"], rel=0.2), err
    with pytest.raises(ValueError, match="strength"):
        build_method("quarot_kvsmooth", {"strength": 2.0})


def test_a_new_method_is_one_registered_class(tmp_path):
    """Adding a post-training method: one dataclass registered in its module. It is then a config node
    (`methods.<name>.<param>` on the command line), an `evaluate.methods` entry and an `init=` choice."""
    from conftest import compose
    from qat_lightning.baselines.method import _REGISTRY, register
    from qat_lightning.config import register_configs, validate_config

    @register
    @dataclass
    class HalfRTN(Method):  # RTN of the teacher with every weight scaled by `factor` (a toy rewrite)
        name: ClassVar[str] = "halfrtn"
        factor: float = 0.5

        def transform(self, model, qcfg, calib_batches):
            import copy

            out = copy.deepcopy(model)
            with torch.no_grad():
                for p in out.parameters():
                    p.mul_(self.factor)
            return out

    try:
        register_configs()
        cfg = validate_config(compose(["+exp=tiny_w4a8kv4", "paths.output_dir=/tmp/x", "methods.halfrtn.factor=0.25",
                                       "evaluate.methods=[fp,halfrtn]", "init=halfrtn"]))
        assert cfg.method("halfrtn").factor == 0.25 and cfg.init == "halfrtn"
        teacher = tiny_llama()
        w = cfg.method("halfrtn").transform(teacher, cfg.quant, None).lm_head.weight
        assert torch.allclose(w, 0.25 * teacher.lm_head.weight)
    finally:
        _REGISTRY.pop("halfrtn", None)
        register_configs()
