"""llama.cpp's formats: our Q4_0 / Q8_0 against `gguf.quants` bit for bit, and student -> GGUF exactly.

The engine's own arithmetic is the reference: `gguf.quants` is ggml-quants.c's reference quantizer in numpy
(and tests/test_gguf_llamacpp.py checks llama.cpp's own quantizer writes the same bytes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from conftest import CONF_DIR
from qat_lightning.export.gguf import GGUFError, check_gguf, export_gguf, gguf_tensor_types, read_gguf_tensors
from qat_lightning.models import build_tiny_config, build_tiny_model
from qat_lightning.models.smollm2 import smollm2_gguf_path
from qat_lightning.quant import (
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    QuantSpec,
    as_quant_config,
    compute_scale_zero,
    dequantize,
    fake_quantize,
    ggml,
    iter_quant_linears,
    quantize_model,
    quantize_to_int,
    round_to_grid,
)

GT = {"q4_0": GGMLQuantizationType.Q4_0, "q8_0": GGMLQuantizationType.Q8_0}
BITS = {"q4_0": 4, "q8_0": 8}
_PROJ = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _spec(qtype: str, **kw) -> QuantSpec:
    return QuantSpec(bits=BITS[qtype], granularity="group", group_size=32, estimator="ggml", **kw)


def _hard_blocks(seed: int = 0) -> torch.Tensor:
    """Random rows of several magnitudes plus the edge cases of the rounding rules, (48, 128) float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 128, generator=g) * torch.logspace(-6, 3, 48)[:, None]
    x[0, :32] = 0  # all-zero block: d = 0, codes 0
    x[1, :32] = 0.5  # constant block: every value is the extreme
    x[2, :32] = torch.randint(-4, 5, (32,), generator=g).float()  # exact multiples: ties of x/d + 8.5
    x[3, :32] = -x[3, :32].abs()  # negative extreme: Q4_0's d > 0
    x[4, 5], x[4, 7] = 3.0, -3.0  # equal magnitudes: the first one sets Q4_0's sign
    x[5, 32:64] = torch.arange(32).float() * 127 / 31 - 63.5  # Q8_0 halfway points
    x[6, :32] = 7e4  # fp16 overflow of d stays consistent (inf scales, like numpy)
    return x


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_quantizer_is_bit_exact_with_gguf_quants(qtype):
    x = _hard_blocks()
    ref = quants.quantize(x.numpy(), GT[qtype])  # (48, 4 * block bytes) uint8
    codes, d16 = ggml.quantize_blocks(x, qtype)
    assert codes.dtype == torch.int8 and d16.dtype == torch.float16 and codes.shape == (48, 4, 32)
    np.testing.assert_array_equal(ggml.pack_blocks(codes, d16, qtype).numpy(), ref)
    back_codes, back_d = ggml.unpack_blocks(torch.from_numpy(ref), qtype)
    assert torch.equal(back_codes, codes) and torch.equal(back_d.view(torch.int16), d16.view(torch.int16))
    lo, hi = ggml.QRANGE[qtype]
    assert codes.min() >= lo and codes.max() <= hi
    # the fake quantizer's values are llama.cpp's dequantized values, bit for bit
    deq = quants.dequantize(ref, GT[qtype])
    finite = np.isfinite(deq)
    fq = fake_quantize(x, _spec(qtype)).numpy()
    np.testing.assert_array_equal(fq[finite], deq[finite])
    assert np.array_equal(np.isnan(fq), np.isnan(deq))


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_low_precision_inputs_quantize_their_float32_values(qtype):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = quants.dequantize(quants.quantize(x.float().numpy(), GT[qtype]), GT[qtype])
    y = fake_quantize(x, _spec(qtype))
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, torch.from_numpy(ref).to(torch.bfloat16))


def test_q4_0_keeps_the_extreme_and_uses_the_minus_8_level():
    x = torch.tensor([[2.0] + [0.1] * 31, [-2.0] + [0.1] * 31])
    codes, d16 = ggml.quantize_blocks(x, "q4_0")
    assert codes[0, 0, 0] == -8 and d16[0, 0, 0] == -0.25  # d = m / -8: negative for a positive extreme
    assert codes[1, 0, 0] == -8 and d16[1, 0, 0] == 0.25
    assert torch.equal(fake_quantize(x, _spec("q4_0"))[:, 0], x[:, 0])  # the extreme is exact


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_ste_gradient_and_mask(qtype):
    x = torch.randn(3, 64, requires_grad=True)
    fake_quantize(x, _spec(qtype)).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight through: nothing is clipped
    x.grad = None
    fake_quantize(x, _spec(qtype, ste_mask=1.0)).sum().backward()
    assert torch.equal(x.grad, (x.abs() < 1.0).float())


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_int_codes_scales_and_gptq_grid_agree_with_the_fake_quantizer(qtype):
    x = _hard_blocks()[24:]  # magnitudes >= 0.05: fp16 keeps d to 11 bits (tiny blocks get subnormal scales)
    spec = _spec(qtype)
    q, scale, zero = quantize_to_int(x, spec)
    assert q.dtype == torch.int8 and scale.shape == (24, 4, 1)
    assert torch.equal(dequantize(q, scale, zero, spec), fake_quantize(x, spec))
    s, _ = compute_scale_zero(x, spec)  # the stored fp16 scale, as a float
    assert torch.equal(s, scale)
    # GPTQ's column rounding on the same grid: x / fp16(d) rounds to the format's codes (up to d's rounding)
    t = (ggml.blocks_of(x) / s).flatten(-2)
    codes = round_to_grid(t.clone(), None, spec)
    assert (codes - q.float()).abs().max() <= 1 and codes.min() >= spec.qmin and codes.max() <= spec.qmax


def test_rope_order_matches_the_converters_permutation():
    """A key computed with llama.cpp's permuted k rows is the HF key in `to_llama_rope_order`."""
    n_kv, hd = 3, 64
    w = torch.randn(n_kv * hd, 40)
    x = torch.randn(5, 40)
    k_hf = x @ w.T  # (5, n_kv * hd)
    k_llama = x @ ggml.permute_rope_rows(w, n_kv).T
    assert torch.equal(ggml.to_llama_rope_order(k_hf, hd), k_llama)
    assert torch.equal(ggml.from_llama_rope_order(k_llama, hd), k_hf)
    assert torch.equal(ggml.unpermute_rope_rows(ggml.permute_rope_rows(w, n_kv), n_kv), w)
    # blocks of 32 of llama.cpp's key row are HF dims {0..15, 32..47} and {16..31, 48..63} of each head
    spec = _spec("q4_0", rope_head_dim=hd)
    y = fake_quantize(k_hf, spec)
    ref = ggml.from_llama_rope_order(fake_quantize(k_llama, _spec("q4_0")), hd)
    assert torch.equal(y, ref) and not torch.equal(y, fake_quantize(k_hf, _spec("q4_0")))
    q, s, z = quantize_to_int(k_hf, spec)
    assert torch.equal(dequantize(q, s, z, spec), y)


def test_kv_rotation_is_llama_cpps_walsh_hadamard():
    """llama.cpp rotates a quantized KV cache (keys with the queries, values and the attention output back)."""
    h = ggml.hadamard(64)
    assert torch.allclose(h @ h, torch.eye(64), atol=1e-6) and torch.equal(h, h.T)
    assert h[0, 0] == h[0, 1] == 0.125 and h[1, 1] == -0.125  # Sylvester order, 1/sqrt(64)
    assert [ggml.kv_rotation_size(d, "k") for d in (64, 128, 192, 96, 80)] == [64, 128, 64, None, None]
    assert [ggml.kv_rotation_size(d, "v") for d in (64, 128, 80)] == [64, 64, None]
    k = torch.randn(2, 7, 3 * 64)
    spec = _spec("q4_0", rope_head_dim=64, hadamard=64)
    stored = fake_quantize(ggml.hadamard_rotate(ggml.to_llama_rope_order(k, 64), 64), _spec("q4_0"))  # the cache
    read = ggml.from_llama_rope_order(ggml.hadamard_rotate(stored, 64), 64)  # what the attention effectively reads
    torch.testing.assert_close(fake_quantize(k, spec), read, rtol=0, atol=1e-6)
    # rotating spreads outliers over the block: q4_0 of a spiky key loses much less
    k[..., 5] *= 30
    err = {h: (fake_quantize(k, _spec("q4_0", rope_head_dim=64, hadamard=h)) - k).norm() for h in (None, 64)}
    assert err[64] < 0.7 * err[None]
    with pytest.raises(ValueError, match="rotated layout"):
        quantize_to_int(k, spec)


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(bits=6, granularity="group", group_size=32), "Q4_0 \\(bits=4\\) or Q8_0"),
        (dict(bits=4, granularity="channel"), "group_size=32"),
        (dict(bits=4, granularity="group", group_size=64), "group_size=32"),
        (dict(bits=4, granularity="group", group_size=32, symmetric=False), "symmetric=True"),
    ],
)
def test_bad_ggml_specs_fail_at_construction(kw, needle):
    with pytest.raises(ValueError, match=needle):
        QuantSpec(estimator="ggml", **kw)
    with pytest.raises(ValueError, match="needs estimator 'ggml'"):
        QuantSpec(bits=4, granularity="group", group_size=32, rope_head_dim=64)


def _preset(name: str) -> QuantConfig:
    """conf/quant/<name>.yaml with its defaults chain (composed alone, as the `quant` group)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return as_quant_config(compose(config_name=f"quant/{name}").quant)


def test_q4_0_preset_is_llama_cpps_file_type():
    cfg = _preset("q4_0")
    w, a = cfg.weight_spec("model.layers.0.mlp.down_proj"), cfg.act_spec("model.layers.0.mlp.down_proj")
    assert (w.ggml_type, a.ggml_type) == ("q4_0", "q8_0") and a.group_size == 32
    assert cfg.weight_spec("lm_head").ggml_type == "q8_0" == cfg.weight_spec("model.embed_tokens").ggml_type
    k = cfg.kv_spec("model.layers.0.self_attn.k_proj", head_dim=64)
    v = cfg.kv_spec("model.layers.0.self_attn.v_proj", head_dim=64)
    assert (k.ggml_type, v.ggml_type, k.rope_head_dim, v.rope_head_dim) == ("q8_0", "q8_0", 64, None)
    assert (k.hadamard, v.hadamard) == (64, 64)  # llama.cpp's rotation of a quantized cache
    assert cfg.kv_spec("x.k_proj", head_dim=128).hadamard == 128
    assert cfg.kv_spec("x.k_proj", head_dim=80).hadamard is None  # llama.cpp rotates head dims divisible by 64
    assert cfg.kv_placement == "post_rope" and cfg.ggml
    assert _preset("q4_0_kv4").kv_spec("x.k_proj", 64).ggml_type == "q4_0"
    q8 = _preset("q8_0")
    assert {q8.weight_spec(n).ggml_type for n in ("model.layers.0.self_attn.q_proj", "lm_head")} == {"q8_0"}
    assert not QuantConfig().ggml


def _tiny(tie: bool, seed: int = 0):
    """A tiny Llama with head_dim 64 (blocks of 32 fit) and SmolLM2's vocab, so llama.cpp takes its tokenizer."""
    config = build_tiny_config(vocab_size=49152, hidden_size=128, intermediate_size=256, num_heads=2, num_kv_heads=1,
                               tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return build_tiny_model(config, seed=seed)


@pytest.fixture(scope="module")
def tied_export(tmp_path_factory):
    """The q4_0 student of a tied tiny model and its GGUF (written once: copying the tokenizer takes seconds)."""
    model = _tiny(tie=True)
    student = quantize_model(model, _preset("q4_0"))
    path = tmp_path_factory.mktemp("gguf") / "student.gguf"
    stats = export_gguf(student, None, path, source_gguf=smollm2_gguf_path())
    return model, student, path, stats


def _gguf_name(module_name: str) -> str:
    if module_name in ("lm_head", "model.embed_tokens"):
        return "token_embd.weight"
    layer = module_name.split(".")[2]
    return f"blk.{layer}.{_PROJ[module_name.split('.')[-1]]}.weight"


def test_student_gguf_holds_the_students_own_codes_and_metadata(tied_export):
    model, student, path, stats = tied_export
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tied in the student too
    assert isinstance(student.model.embed_tokens, QuantEmbedding)
    assert stats["tensor_types"] == {"f32": 5, "q4_0": 14, "q8_0": 1} and stats["tied"]
    reader = GGUFReader(path)
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    assert "output.weight" not in types and types["token_embd.weight"] == "q8_0"  # tied: llama.cpp reads token_embd
    assert {t for n, t in types.items() if n.startswith("blk.") and not n.endswith("norm.weight")} == {"q4_0"}
    tensors = read_gguf_tensors(path)  # llama.cpp's dequantized values, q/k rows un-permuted
    for name, module in [*iter_quant_linears(student), ("model.embed_tokens", student.model.embed_tokens)]:
        if isinstance(module, QuantLinear):
            w = module.quantized_weight()
        else:
            w = fake_quantize(module.weight, module.weight_spec)
        assert torch.equal(tensors[_gguf_name(name)], w.detach()), name  # exact
    assert torch.equal(tensors["blk.1.attn_norm.weight"], model.model.layers[1].input_layernorm.weight)
    # the raw bytes are gguf's own quantization of the weight: the student's codes, no second rounding
    raw = {t.name: t for t in reader.tensors}
    wq = ggml.permute_rope_rows(student.model.layers[0].self_attn.q_proj.weight.detach(), 2)
    np.testing.assert_array_equal(np.asarray(raw["blk.0.attn_q.weight"].data),
                                  quants.quantize(wq.numpy(), GGMLQuantizationType.Q4_0))
    # metadata: llama's hyperparameters and the tokenizer of the GGUF the model came from
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.ggml.") or k.endswith("_id")}
    assert f["general.architecture"] == "llama" and f["general.file_type"] == 2  # MOSTLY_Q4_0
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 128, 256)
    heads = (f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.rope.dimension_count"])
    assert heads == (2, 1, 64)
    source = GGUFReader(smollm2_gguf_path()).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        assert reader.fields[key].contents() == source[key].contents(), key
    assert stats["file_size_bytes"] == path.stat().st_size


def test_untied_student_and_float_teacher(tmp_path):
    model = _tiny(tie=False, seed=1)
    cfg = _preset("q4_0")
    student = quantize_model(model, cfg)
    types = gguf_tensor_types(export_gguf(student, None, tmp_path / "s.gguf", source_gguf=smollm2_gguf_path())["path"])
    assert types["output.weight"] == "q8_0" and types["token_embd.weight"] == "q8_0"
    out = read_gguf_tensors(tmp_path / "s.gguf", ["output.weight"])["output.weight"]
    assert torch.equal(out, student.lm_head.quantized_weight().detach())
    stats = export_gguf(model, None, tmp_path / "t.gguf", source_gguf=smollm2_gguf_path(), dtype="f16")
    assert stats["tensor_types"] == {"f16": 16, "f32": 5} and stats["file_type"] == 1
    q = model.model.layers[0].self_attn.q_proj.weight
    q_file = read_gguf_tensors(tmp_path / "t.gguf", ["blk.0.attn_q.weight"])["blk.0.attn_q.weight"]
    assert torch.equal(q_file, q.detach().half().float())
    assert not list(tmp_path.glob(".*tmp*"))  # temp files were renamed, none left


def test_non_ggml_student_and_other_architectures_are_refused(tmp_path):
    with pytest.raises(GGUFError, match="not a llama.cpp format"):
        export_gguf(quantize_model(_tiny(tie=False), QuantConfig()), None, tmp_path / "x.gguf",
                    source_gguf=smollm2_gguf_path())
    qwen = build_tiny_model(build_tiny_config(arch="qwen2"))
    with pytest.raises(GGUFError, match="qwen2"):
        export_gguf(qwen, None, tmp_path / "q.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("online", ["r3", "r4"])
def test_online_rotations_are_refused_and_r1_r2_export(tmp_path, online):
    """R3/R4 are Hadamards in our forward that llama.cpp's graph lacks: a GGUF of such a student would
    compute another function, so it is refused; R1+R2 (absorbed) exports as a plain, untied Llama."""
    from qat_lightning.rotate import rotate_model

    model = _tiny(tie=True)
    bad = quantize_model(rotate_model(model, **{online: True}), _preset("q4_0"))
    with pytest.raises(GGUFError, match="online rotations"):
        export_gguf(bad, None, tmp_path / "bad.gguf", source_gguf=smollm2_gguf_path())
    assert not list(tmp_path.iterdir())
    good = quantize_model(rotate_model(model), _preset("q4_0"))
    export_gguf(good, None, tmp_path / "good.gguf", source_gguf=smollm2_gguf_path())
    assert "output.weight" in {t.name for t in GGUFReader(tmp_path / "good.gguf").tensors}


def test_truncated_or_mismatched_gguf_is_refused(tied_export, tmp_path):
    model, _, path, _ = tied_export
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFError, match="truncated"):
        check_gguf(cut)
    cut.write_bytes(data[:5000])  # inside the metadata
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        check_gguf(cut)
    other = build_tiny_model(build_tiny_config(vocab_size=49152, hidden_size=128, intermediate_size=256, num_heads=2,
                                               num_kv_heads=2, num_layers=3))
    with pytest.raises(GGUFError, match="n_layer: file 2, model 3; n_head_kv: file 1, model 2"):
        check_gguf(path, other)
    check_gguf(path, model)


def test_hf_tokenizer_is_written_like_the_source_gguf(tmp_path):
    """Without a source GGUF the vocabulary comes from the HF tokenizer: SmolLM2's equals its GGUF's."""
    from qat_lightning.models import load_model

    model, tokenizer = load_model({"source": "tiny", "tokenizer": "smollm2", "hidden_size": 128, "num_heads": 2,
                                   "num_kv_heads": 1, "intermediate_size": 256})
    path = export_gguf(model, tokenizer, tmp_path / "t.gguf", dtype="f16", tokenizer_pre="smollm")["path"]
    ours, source = GGUFReader(path).fields, GGUFReader(smollm2_gguf_path()).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert ours[key].contents() == source[key].contents(), key


def test_the_cached_hadamard_matrix_built_under_inference_mode_still_trains():
    """First use while scoring (inference mode), then a training step: the cached matrix must not be an
    inference tensor (autograd refuses to save those for backward)."""
    from qat_lightning.quant import ggml

    ggml._hadamard.cache_clear()
    with torch.inference_mode():
        ggml.hadamard_rotate(torch.randn(2, 64), 64)
    x = torch.randn(2, 64, requires_grad=True)
    (ggml.hadamard_rotate(x, 64) * torch.randn(2, 64)).sum().backward()
    assert x.grad is not None and not ggml.hadamard(64).is_inference()


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_learned_block_scales_start_at_the_formats_own_and_lower_the_block_error(qtype):
    """LSQ on llama.cpp's blocks: the file stores any fp16 d, llama.cpp decodes fp16(d) * code, so a learned d
    is still the format. It starts bit for bit at d = m / -8 (Q4_0) or max|x| / 127 (Q8_0), its gradient
    lowers Q4_0's round-trip error, and gguf's own dequantizer reads the learned blocks as the forward computed."""
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    spec = _spec(qtype, learnable=True)
    d = torch.nn.Parameter(ggml.ggml_scale(ggml.blocks_of(x), qtype))
    assert torch.equal(fake_quantize(x, spec, scale=d), fake_quantize(x, _spec(qtype)))
    err0 = (fake_quantize(x, _spec(qtype)) - x).pow(2).sum().item()
    opt = torch.optim.Adam([d], lr=1e-3 * d.detach().abs().mean().item())  # Adam moves d by ~lr a step
    for _ in range(200):
        opt.zero_grad()
        (fake_quantize(x, spec, scale=d) - x).pow(2).sum().backward()
        opt.step()
    y = fake_quantize(x, spec, scale=d).detach()
    if qtype == "q4_0":  # the format's own d is not the error-optimal one (at 8 bits LSQ's gradient is noise)
        assert (y - x).pow(2).sum().item() < 0.97 * err0
    assert not torch.equal(y, fake_quantize(x, _spec(qtype)))
    codes, d16 = ggml.quantize_blocks(x, qtype, d=d)
    lo, hi = ggml.QRANGE[qtype]
    assert codes.min() >= lo and codes.max() <= hi
    raw = ggml.pack_blocks(codes, d16, qtype).numpy()
    assert torch.equal(torch.from_numpy(quants.dequantize(raw, GT[qtype])).reshape(x.shape), y)


def test_learned_scale_gradient_is_lsqs():
    """d/dd of the sum of outputs is sum(q - x/d) inside the range and sum(q) where clipped, times 1/sqrt(32*qmax);
    clipped values get no gradient."""
    x = torch.linspace(-1, 1.2, 32)[None].requires_grad_()  # the extreme 1.2 sets d = -0.15; x/d reaches ~6.7
    d = torch.nn.Parameter(torch.full((1, 1, 1), 0.1))  # a smaller |d| clips: x/d spans -10..12
    fake_quantize(x, _spec("q4_0", learnable=True), scale=d).sum().backward()
    t = x.detach() / 0.1
    q = ggml.round_ratio(t.clone(), "q4_0")
    inside = (t >= -8) & (t <= 7)
    expect = torch.where(inside, q - t, q).sum() / (32 * 7) ** 0.5
    torch.testing.assert_close(d.grad.reshape(()), expect)
    assert torch.equal(x.grad, inside.float())


def test_lsq_q4_0_preset_learns_the_decoder_scales_only_and_exports_them(tmp_path):
    """quant=q4_0_kv4_lsq: decoder linears learn one d per block; the Q8_0 tied head/embedding keeps the
    format's scale (llama.cpp holds it as one tensor). The GGUF holds the learned scales with the codes the
    student rounded to: llama.cpp's dequantized tensors equal the student's weights exactly."""
    cfg = _preset("q4_0_kv4_lsq")
    assert cfg.lsq and cfg.weight_spec("model.layers.0.mlp.up_proj").learnable
    assert not cfg.weight_spec("lm_head").learnable and not cfg.weight_spec("model.embed_tokens").learnable
    student = quantize_model(_tiny(tie=True), cfg)
    assert student.lm_head.weight is student.model.embed_tokens.weight and student.lm_head.weight_scale is None
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in iter_quant_linears(student):
            if m.weight_scale is not None:
                assert m.weight_scale.shape == (m.out_features, m.in_features // 32, 1)
                m.weight_scale.mul_(0.7 + 0.4 * torch.rand(m.weight_scale.shape, generator=g))  # "learned"
    stats = export_gguf(student, None, tmp_path / "lsq.gguf", source_gguf=smollm2_gguf_path())
    assert stats["tensor_types"] == {"f32": 5, "q4_0": 14, "q8_0": 1}  # llama.cpp's Q4_0 file, as before
    tensors = read_gguf_tensors(tmp_path / "lsq.gguf")
    n_learned = 0
    for name, module in iter_quant_linears(student):
        if name == "lm_head":
            continue
        n_learned += module.weight_scale is not None
        assert torch.equal(tensors[_gguf_name(name)], module.quantized_weight().detach()), name
    assert n_learned == 14
    fixed = quantize_model(_tiny(tie=True), _preset("q4_0_kv4"))
    w = fixed.model.layers[0].mlp.up_proj.quantized_weight().detach()
    assert not torch.equal(tensors["blk.0.ffn_up.weight"], w)  # the learned scales, not the format's own


def test_scale_lr_gives_the_learned_scales_their_own_param_group():
    from qat_lightning.distill.config import LossConfig, OptimConfig
    from qat_lightning.distill.module import DistillationModule

    model = _tiny(tie=True)
    student = quantize_model(_tiny(tie=True), _preset("q4_0_kv4_lsq"))
    module = DistillationModule(model, student, LossConfig(), OptimConfig(lr=2e-4, scale_lr=2e-5, scheduler="constant",
                                                                      warmup_steps=0, implementation="loop"))
    opt = module.configure_optimizers()
    main, scales = opt.param_groups
    assert (main["lr"], scales["lr"], scales["weight_decay"]) == (2e-4, 2e-5, 0.0)
    assert len(scales["params"]) == 14 and all(p.dim() == 3 for p in scales["params"])
    with pytest.raises(ValueError, match="scale_lr"):
        OptimConfig(scale_lr=0.0)


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_scale_gradient_reaches_the_value_that_sets_the_block_scale(qtype):
    """`scale_grad`: forward bit for bit the STE quantizer's; backward autograd's of ``fp16(d) * q`` with the
    rounding straight through and ``d`` the format's function of the block (m / -8, max|x| / 127), in float64."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 96, generator=g) * torch.tensor([0.01, 1.0, 30.0, 1.0])[:, None]
    x[3, :32] = 0  # a zero block: d = 0, the gradient stays straight through
    x[1, 40] = 9.0  # an outlier sets its block's scale
    w = torch.randn(4, 96, generator=g)
    xs = x.clone().requires_grad_()
    y = fake_quantize(xs, _spec(qtype, scale_grad=True))
    assert torch.equal(y, fake_quantize(x, _spec(qtype)))
    (y * w).sum().backward()

    xr = ggml.blocks_of(x.double()).requires_grad_()
    imax = xr.detach().abs().argmax(-1, keepdim=True)
    d = xr.gather(-1, imax) / -8 if qtype == "q4_0" else xr.abs().amax(-1, keepdim=True) / 127
    t = xr / torch.where(d == 0, torch.ones_like(d), d)
    q = ggml.blocks_of(ggml.quantize_blocks(x, qtype)[0].double().flatten(-2))
    ((d * (t + (q - t).detach())).flatten(-2) * w.double()).sum().backward()
    nonzero = x.view(4, 3, 32).abs().amax(-1, keepdim=True).expand(4, 3, 32).reshape(4, 96) > 0
    torch.testing.assert_close(xs.grad.double()[nonzero], xr.grad.flatten(-2)[nonzero], rtol=1e-5, atol=1e-6)
    assert torch.equal(xs.grad[3, :32], w[3, :32])  # (the reference's guarded d = 0 is no reference there)
    others = torch.ones_like(x, dtype=torch.bool)
    others.view(4, 3, 32).scatter_(-1, imax, False)
    assert torch.equal(xs.grad[others], w[others])  # only the block extremes get more than the STE
    assert not torch.equal(xs.grad, w)


def test_kv_scale_grad_changes_the_students_gradient_not_its_logits():
    """quant.kv_scale_grad on the q4_0-KV preset: the same logits, another gradient (through the KV scales);
    refused where the KV quantizer is not llama.cpp's."""
    from dataclasses import replace

    model = _tiny(tie=True)
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    base = _preset("q4_0_kv4")
    assert base.kv_spec("x.k_proj", 64).scale_grad is False
    grads, logits = [], []
    for cfg in (base, replace(base, kv_scale_grad=True)):
        student = quantize_model(model, cfg)
        out = student(ids).logits
        out.logsumexp(-1).sum().backward()
        logits.append(out.detach())
        grads.append(student.model.layers[0].self_attn.k_proj.weight.grad.clone())
    assert replace(base, kv_scale_grad=True).kv_spec("x.v_proj", 64).scale_grad
    assert torch.equal(logits[0], logits[1])
    assert not torch.allclose(grads[0], grads[1])
    with pytest.raises(ValueError, match="kv_scale_grad needs estimator 'ggml'"):
        QuantConfig(kv_scale_grad=True)
    with pytest.raises(ValueError, match="scale_grad"):
        QuantSpec(bits=4, granularity="group", group_size=32, scale_grad=True)
