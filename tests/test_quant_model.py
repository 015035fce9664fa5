"""Model surgery on tiny random GQA models: which modules are quantized, identity at 16 bits, overrides, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qat_lightning.quant import (
    QuantConfig,
    QuantLinear,
    compute_scale_zero,
    fake_quantize,
    iter_quant_linears,
    quant_summary,
    quantization_enabled,
    quantize_model,
    set_quantization_enabled,
)
from qat_lightning.quant.kv import kv_quantizer_of

SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _tiny(arch: str, tie: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=tie))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=tie))  # q/k/v have biases
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return _tiny(request.param)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, SIZES["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_decoder_linears_replaced(model):
    student = quantize_model(model, QuantConfig())
    names = [n for n, _ in iter_quant_linears(student)]
    assert len(names) == 7 * SIZES["num_hidden_layers"]
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name, m in iter_quant_linears(student):
        assert m.weight_spec.bits == 4 and m.weight_spec.granularity == "channel"
        assert m.act_spec.bits == 8 and m.act_spec.granularity == "token"
        assert not m.out_spec.enabled  # the KV cache has its own owner, one per attention block
    for layer in student.model.layers:
        kvq = kv_quantizer_of(layer.self_attn)
        assert kvq.placement == "pre_rope" and kvq.k_spec.bits == kvq.v_spec.bits == 4
        assert kvq.k_spec.granularity == "token"
    assert type(student.lm_head) is nn.Linear and type(student.model.embed_tokens) is nn.Embedding
    summary = quant_summary(student)
    assert summary["num_quantized_linears"] == 14 and summary["w4_linears"] == 14 and summary["a8_linears"] == 14
    assert summary["kv_quantized"] == 4 and summary["lsq_params"] == 0
    assert student.quant_config.setting == "W4A8KV4"
    assert set(student.state_dict()) == set(model.state_dict())  # HF names kept


@pytest.mark.parametrize("bits", [16, 32])
def test_identity_at_16_bits(model, ids, bits):
    student = quantize_model(model, QuantConfig(w_bits=bits, a_bits=bits, kv_bits=bits, quantize_lm_head=True))
    assert quant_summary(student)["num_quant_linears"] == 15
    assert torch.equal(_logits(student, ids), _logits(model, ids))


def test_error_ordering(model, ids):
    ref = _logits(model, ids)
    err = {s: _rel_err(_logits(quantize_model(model, QuantConfig(*s)), ids), ref) for s in [(8, 8, 8), (4, 4, 4)]}
    assert 0 < err[(8, 8, 8)] < 0.05
    assert err[(4, 4, 4)] > 3 * err[(8, 8, 8)]


def test_kv_bits_alone_change_logits(model, ids):
    ref = _logits(model, ids)
    student = quantize_model(model, QuantConfig(w_bits=16, a_bits=16, kv_bits=4))
    out = _logits(student, ids)
    assert not torch.equal(out, ref) and _rel_err(out, ref) < 0.5
    summary = quant_summary(student)
    assert summary["num_quantized_linears"] == 0 and summary["kv_quantized"] == 4  # k and v of both layers


def test_kv_output_is_quantized_per_token_before_rope(model, ids):
    """The k_proj output (pre-RoPE by construction) has one 4-bit grid per token."""
    student = quantize_model(model, QuantConfig(w_bits=16, a_bits=16, kv_bits=4))
    seen = {}
    k_proj = student.model.layers[1].self_attn.k_proj
    k_proj.register_forward_hook(lambda mod, inp, out: seen.setdefault("k", out.detach()))
    _logits(student, ids)
    k = seen["k"]  # (B, T, n_kv * head_dim)
    assert k.shape[-1] == SIZES["num_key_value_heads"] * SIZES["hidden_size"] // SIZES["num_attention_heads"]
    levels = k / (k.abs().amax(-1, keepdim=True) / 7)
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert levels.round().unique().numel() <= 15


def test_kv_head_granularity(model, ids):
    head_dim = SIZES["hidden_size"] // SIZES["num_attention_heads"]
    student = quantize_model(model, QuantConfig(w_bits=16, a_bits=16, kv_bits=4, kv_granularity="head"))
    spec = kv_quantizer_of(student.model.layers[0].self_attn).v_spec
    assert spec.granularity == "head" and spec.head_dim == head_dim
    per_token = quantize_model(model, QuantConfig(w_bits=16, a_bits=16, kv_bits=4))
    assert not torch.equal(_logits(student, ids), _logits(per_token, ids))


def test_quant_linear_forward_composition(model):
    """k = fq_kv(fq_act(x) @ fq_w(W).T + b): checked against the primitives composed by hand."""
    student = quantize_model(model, QuantConfig(w_bits=4, a_bits=4, kv_bits=4))
    layer = student.model.layers[0].self_attn.k_proj
    kv_spec = kv_quantizer_of(student.model.layers[0].self_attn).k_spec
    x = torch.randn(2, 5, SIZES["hidden_size"])
    xq = fake_quantize(x, layer.act_spec)
    wq = fake_quantize(layer.weight, layer.weight_spec)
    expected = fake_quantize(torch.nn.functional.linear(xq, wq, layer.bias), kv_spec)
    assert torch.equal(layer(x), expected)  # the KV quantizer's hook on k_proj applies kv_spec
    # the weight grid: every row is a multiple of max|row| / 7
    w = layer.quantized_weight().detach()
    levels = w / (layer.weight.detach().abs().amax(-1, keepdim=True) / 7)
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)


def test_overrides(model):
    cfg = QuantConfig(
        overrides=[{"pattern": "down_proj", "w_bits": 8}, {"pattern": r"layers\.0\.", "skip": True}],
    )
    student = quantize_model(model, cfg)
    assert all(type(m) is nn.Linear for m in student.model.layers[0].modules() if isinstance(m, nn.Linear))
    quant = dict(iter_quant_linears(student))
    assert len(quant) == 7 and all(n.startswith("model.layers.1.") for n in quant)
    assert quant["model.layers.1.mlp.down_proj"].weight_spec.bits == 8
    assert quant["model.layers.1.mlp.down_proj"].act_spec.bits == 8
    assert quant["model.layers.1.mlp.up_proj"].weight_spec.bits == 4
    summary = quant_summary(student)
    assert summary["w8_linears"] == 1 and summary["w4_linears"] == 6 and summary["kv_quantized"] == 2


def test_original_untouched_and_inplace(model, ids):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _logits(model, ids)
    student = quantize_model(model, QuantConfig(lsq=True))
    student(ids).logits.sum().backward()
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(_logits(model, ids), ref)
    copy = _tiny("llama")
    assert quantize_model(copy, QuantConfig(), inplace=True) is copy
    assert len(list(iter_quant_linears(copy))) == 14


def test_lsq_scales(model, ids):
    student = quantize_model(model, QuantConfig(lsq=True))
    plain = quantize_model(model, QuantConfig())
    q = student.model.layers[0].self_attn.q_proj
    assert q.weight_scale.shape == (q.out_features, 1)
    expected = q.weight.detach().abs().amax(-1, keepdim=True) / 7  # MinMax init
    torch.testing.assert_close(q.weight_scale.detach(), expected, rtol=1e-6, atol=0)
    assert quant_summary(student)["lsq_params"] == sum(m.out_features for _, m in iter_quant_linears(student))
    torch.testing.assert_close(_logits(student, ids), _logits(plain, ids), rtol=1e-4, atol=1e-4)
    student(ids).logits.pow(2).mean().backward()
    assert q.weight_scale.grad is not None and q.weight_scale.grad.abs().sum() > 0
    assert "weight_scale" in "".join(student.state_dict())


def test_lm_head_and_embeddings():
    tied = _tiny("llama", tie=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    student = quantize_model(tied, QuantConfig(quantize_lm_head=True, quantize_embeddings=True))
    assert isinstance(student.lm_head, QuantLinear) and student.lm_head.weight_spec.bits == 4
    # quantized alike, the tied table stays one tensor (as llama.cpp stores it); quantized differently, the
    # student's head gets its own copy, and the teacher stays tied either way
    assert student.lm_head.weight is student.model.embed_tokens.weight
    other = quantize_model(tied, QuantConfig(quantize_lm_head=True, quantize_embeddings=True,
                                             overrides=[{"pattern": "^lm_head$", "w_bits": 8}]))
    assert other.lm_head.weight is not other.model.embed_tokens.weight
    assert torch.equal(other.lm_head.weight, other.model.embed_tokens.weight)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert quant_summary(student)["quantized_embeddings"] == 1
    ids = torch.randint(0, SIZES["vocab_size"], (1, 6))
    h = student.model.embed_tokens(ids)
    table = fake_quantize(student.model.embed_tokens.weight, QuantConfig().weight_spec("model.embed_tokens"))
    assert torch.equal(h, table[ids])


def test_set_quantization_enabled(model, ids):
    ref = _logits(model, ids)
    student = quantize_model(model, QuantConfig(w_bits=4, a_bits=8, kv_bits=4))
    quantized = _logits(student, ids)
    with quantization_enabled(student, False):
        assert torch.equal(_logits(student, ids), ref)
    assert torch.equal(_logits(student, ids), quantized)
    set_quantization_enabled(student, False)
    assert torch.equal(_logits(student, ids), ref)
    set_quantization_enabled(student, True)
    assert torch.equal(_logits(student, ids), quantized)


def test_bf16_student():
    model = _tiny("llama").to(torch.bfloat16)
    ids = torch.randint(0, SIZES["vocab_size"], (1, 8))
    student = quantize_model(model, QuantConfig(lsq=True))
    out = student(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert student.model.layers[0].mlp.up_proj.weight_scale.dtype == torch.bfloat16


def test_dict_and_structured_config(model, ids):
    omegaconf = pytest.importorskip("omegaconf")
    schema = omegaconf.OmegaConf.structured(QuantConfig)
    cfg = omegaconf.OmegaConf.merge(schema, {"w_bits": 8, "overrides": [{"pattern": "down_proj", "w_bits": 4}]})
    a = quantize_model(model, cfg)
    b = quantize_model(model, {"w_bits": 8, "overrides": [{"pattern": "down_proj", "w_bits": 4}]})
    assert a.quant_config == b.quant_config and a.quant_config.setting == "W8A8KV4"
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    assert a.model.layers[0].mlp.down_proj.weight_spec.bits == 4


def test_setting_names():
    assert QuantConfig().setting == "W4A8KV4"
    assert QuantConfig(w_bits=8, a_bits=32, kv_bits=16).setting == "W8A16KV16"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"w_bits": 0}, "w_bits"),
        ({"a_bits": 1}, "a_bits"),
        ({"kv_bits": 9}, "kv_bits"),
        ({"w_bits": 15}, "w_bits"),
        ({"w_granularity": "group"}, "group_size"),
        ({"w_granularity": "row"}, "w_granularity"),
        ({"a_granularity": "channel"}, "a_granularity"),
        ({"kv_granularity": "channel"}, "kv_granularity"),
        ({"estimator": "mse"}, "estimator"),
        ({"lsq": True, "w_symmetric": False}, "symmetric"),
        ({"overrides": [{"pattern": "q_proj", "bits": 4}]}, "unknown keys"),
        ({"overrides": [{"w_bits": 4}]}, "pattern"),
        ({"overrides": [{"pattern": "(", "w_bits": 4}]}, "regex"),
        ({"overrides": [{"pattern": "q_proj", "w_bits": 12}]}, "w_bits"),
        ({"w_estimator": "mse"}, "w_estimator"),
        ({"estimator": "seq", "w_bits": 2}, "w_estimator=seq"),
        ({"w_estimator": "seq", "w_bits": 2, "lsq": True}, "lsq"),
        ({"w_estimator": "seq", "w_bits": 2, "w_symmetric": False}, "seq"),
    ],
)
def test_bad_config_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_seq_weights_at_2_bits_only(model):
    """w_estimator=seq is the reference's 2-bit quantizer; other widths (overrides) and A/KV keep MinMax."""
    cfg = QuantConfig(w_bits=2, w_estimator="seq", overrides=[{"pattern": "down_proj", "w_bits": 4}])
    student = quantize_model(model, cfg)
    layer = student.model.layers[0]
    assert layer.self_attn.q_proj.weight_spec.estimator == "seq"
    assert layer.mlp.down_proj.weight_spec.estimator == "minmax" and layer.mlp.down_proj.weight_spec.bits == 4
    assert layer.self_attn.q_proj.act_spec.estimator == "minmax"
    w = layer.self_attn.q_proj.weight
    step = w.abs().mean(dim=-1, keepdim=True)  # (out, 1)
    levels = layer.self_attn.q_proj.quantized_weight() / step
    assert torch.allclose(levels, levels.floor() + 0.5, atol=1e-5)


def test_group_size_checked_at_quantize_model(model):
    with pytest.raises(ValueError, match="does not divide"):
        quantize_model(model, QuantConfig(w_granularity="group", w_group_size=48))  # 64 % 48 != 0
    student = quantize_model(model, QuantConfig(w_granularity="group", w_group_size=32))
    w = student.model.layers[0].mlp.down_proj.weight_spec
    assert w.group_size == 32 and w.granularity == "group"


def test_rejects_non_decoder_models_and_double_quantization(model):
    with pytest.raises(ValueError, match="model.model.layers"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), QuantConfig())
    student = quantize_model(model, QuantConfig())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(student, QuantConfig())
    with pytest.raises(ValueError, match="QuantConfig"):
        quantize_model(model, "W4A8KV4")


def test_compute_scale_zero_shapes():
    w = torch.randn(8, 64)
    spec = QuantConfig(w_granularity="group", w_group_size=16).weight_spec("x")
    scale, zp = compute_scale_zero(w, spec)
    assert scale.shape == (8, 4, 1) and zp.shape == (8, 4, 1)
