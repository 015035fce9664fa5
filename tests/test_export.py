"""Export: int4 packing, exported model == fake-quant student, integer KV cache == student generation, integrity."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from qat_lightning.export import (
    ExportConfig,
    QuantizedEmbedding,
    QuantizedKVCache,
    QuantizedLinear,
    export_student,
    kv_cache_bytes,
    load_exported,
    pack_int4,
    theoretical_kv_bytes,
    unpack_int4,
)
from qat_lightning.export.exporter import sha256_file
from qat_lightning.quant import (
    QuantConfig,
    QuantSpec,
    fake_quantize,
    iter_quant_linears,
    quantize_model,
    quantize_to_int,
)
from qat_lightning.quant.kv import kv_quantizer_of

EXACT = {"scale_dtype": "float32", "fp_dtype": "float32"}  # nothing rounded: the export must be bit-faithful


def tiny_llama(seed: int = 0, hidden: int = 64, tie: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so logits and argmaxes are well separated
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


CONFIGS = {
    "w4a8kv4_sym": dict(w_bits=4, a_bits=8, kv_bits=4),
    "w8a8kv8_asym": dict(w_bits=8, a_bits=8, kv_bits=8, symmetric=False),
    "w4a8kv4_asym_overrides": dict(
        w_bits=4,
        a_bits=8,
        kv_bits=4,
        symmetric=False,
        overrides=[
            {"pattern": r"layers\.0\.mlp\.down_proj", "w_bits": 8},
            {"pattern": r"layers\.1\.self_attn\.o_proj", "skip": True},
        ],
    ),
    "w4a8kv4_head_group": dict(
        w_bits=4, a_bits=8, kv_bits=4, kv_granularity="head", w_granularity="group", w_group_size=32
    ),
    "w3a16kv16": dict(w_bits=3, a_bits=16, kv_bits=16),
    # the reference's 2-bit quantizer (levels ±0.5, ±1.5 times mean|row|), down_proj kept at 4 bits MinMax
    "w2seq_a8kv4": dict(
        w_bits=2, a_bits=8, kv_bits=4, w_estimator="seq", overrides=[{"pattern": "down_proj", "w_bits": 4}]
    ),
}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ---- packing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 15, 16, 17])
def test_pack_int4_roundtrips_every_code(n):
    signed = torch.arange(-8, 8).repeat(n, 3)[:, : 16 + n]  # (n, 16 + n): every code, odd and even lengths
    packed = pack_int4(signed)
    assert packed.dtype == torch.uint8 and packed.shape == (n, (16 + n + 1) // 2)
    assert torch.equal(unpack_int4(packed, signed.shape), signed.to(torch.int8))
    unsigned = torch.arange(0, 16).repeat(n, 3)[:, : 16 + n]
    assert torch.equal(unpack_int4(pack_int4(unsigned), unsigned.shape, signed=False), unsigned.to(torch.int8))


def test_pack_int4_layout_low_nibble_first():
    assert pack_int4(torch.tensor([1, 2, -1])).tolist() == [0x21, 0x0F]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="-8..7 or 0..15"):
        pack_int4(torch.tensor([16]))
    with pytest.raises(ValueError, match="integer"):
        pack_int4(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), (8,))


def test_export_config_validates():
    assert ExportConfig().scale_dtype == "float16"
    with pytest.raises(ValueError, match="scale_dtype"):
        ExportConfig(scale_dtype="int8")
    with pytest.raises(ValueError, match="format"):
        ExportConfig(format="v0")


# ---- export == student -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_exported_logits_equal_student(tmp_path, name):
    student = quantize_model(tiny_llama(), QuantConfig(**CONFIGS[name]))
    stats = export_student(student, tmp_path / "exp", **EXACT)
    model = load_exported(tmp_path / "exp")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    ref, out = _logits(student, ids), _logits(model, ids)
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()

    bits = {n: m.weight_spec.bits for n, m in iter_quant_linears(student) if m.weight_spec.enabled}
    assert stats["num_packed_linears"] == sum(b <= 4 for b in bits.values())
    assert stats["size_bytes"] == (tmp_path / "exp" / "model.safetensors").stat().st_size
    tensors = load_file(str(tmp_path / "exp" / "model.safetensors"))
    for n, b in bits.items():
        assert isinstance(model.get_submodule(n), QuantizedLinear)
        assert tensors[f"{n}.qweight"].dtype in (torch.uint8, torch.int8)
        assert (f"{n}.zeros" in tensors) == (not student.quant_config.symmetric)
        if b <= 4:
            assert tensors[f"{n}.qweight"].shape[-1] == (student.get_submodule(n).in_features + 1) // 2
    if "overrides" in name:
        assert model.get_submodule("model.layers.0.mlp.down_proj").weight_spec.bits == 8
        assert type(model.get_submodule("model.layers.1.self_attn.o_proj")) is nn.Linear
        assert tensors["model.layers.1.self_attn.o_proj.weight"].dtype == torch.float32


def test_default_fp16_export_is_smaller_and_close(tmp_path):
    student = quantize_model(tiny_llama(), QuantConfig(w_bits=4, a_bits=8, kv_bits=4))
    with torch.no_grad():  # FP params rounded to fp16 beforehand: only the fp16 scales differ from the student
        for p in student.parameters():
            p.copy_(p.half().float())
    exact = export_student(student, tmp_path / "exact", **EXACT)
    stats = export_student(student, tmp_path / "fp16")
    assert stats["size_bytes"] < exact["size_bytes"] and stats["ratio"] < 0.4
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    ref, out = _logits(student, ids), _logits(load_exported(tmp_path / "fp16"), ids)
    # fp16 scales move each weight by <= 2^-11 of its row step; with A8 that flips some per-token activation
    # roundings, so the match is statistical: measured mean |diff| 3% of the logit std, max 8% of max |logit|
    assert (out - ref).abs().mean().item() <= 0.05 * ref.std().item()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


def test_lsq_student_exports_learned_scales(tmp_path):
    student = quantize_model(tiny_llama(), QuantConfig(w_bits=4, a_bits=8, kv_bits=4, lsq=True))
    name, mod = next(iter_quant_linears(student))
    with torch.no_grad():  # pretend training moved the steps away from MinMax
        for _, m in iter_quant_linears(student):
            m.weight_scale.mul_(torch.linspace(0.7, 1.3, m.weight_scale.numel()).reshape_as(m.weight_scale))
    export_student(student, tmp_path / "exp", **EXACT)
    scales = load_file(str(tmp_path / "exp" / "model.safetensors"))[f"{name}.scales"]
    assert torch.equal(scales, mod.weight_scale.detach())
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    ref, out = _logits(student, ids), _logits(load_exported(tmp_path / "exp"), ids)
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("quantize_lm_head", [False, True])
def test_quantized_tied_embeddings(tmp_path, quantize_lm_head):
    model = tiny_llama(tie=True)
    qc = QuantConfig(w_bits=4, a_bits=8, kv_bits=4, quantize_embeddings=True, quantize_lm_head=quantize_lm_head)
    student = quantize_model(model, qc)
    stats = export_student(student, tmp_path / "exp", **EXACT)
    tensors = load_file(str(tmp_path / "exp" / "model.safetensors"))
    assert "model.embed_tokens.qweight" in tensors and "model.embed_tokens.weight" not in tensors
    # identical quantized copies are stored once; an FP lm_head next to a quantized embedding is kept
    assert ("lm_head.weight" in tensors) == (not quantize_lm_head)
    assert "lm_head.qweight" not in tensors
    assert stats["fp16_size_bytes"] == 2 * sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    ref, out = _logits(student, ids), _logits(load_exported(tmp_path / "exp"), ids)
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_source_quantization_config_not_exported(tmp_path):
    """A model converted from GGUF keeps HF's gguf quantization_config; the export must not claim it."""
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    export_student(quantize_model(model, QuantConfig()), tmp_path / "exp")
    assert "quantization_config" not in json.loads((tmp_path / "exp" / "config.json").read_text())
    assert "quantization_config" in model.config.to_dict()  # the source model is left alone
    load_exported(tmp_path / "exp")


def test_int8_kernel_fast_path_matches(tmp_path):
    student = quantize_model(tiny_llama(), QuantConfig(w_bits=8, a_bits=8, kv_bits=8))
    export_student(student, tmp_path / "exp", **EXACT)
    fast = load_exported(tmp_path / "exp", int8_kernel=True)
    assert all(m.use_int8_kernel for m in fast.modules() if isinstance(m, QuantizedLinear))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    ref, out = _logits(student, ids), _logits(fast, ids)
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


DEQUANT_CONFIGS = {
    **{k: CONFIGS[k] for k in ("w4a8kv4_sym", "w8a8kv8_asym", "w4a8kv4_asym_overrides", "w4a8kv4_head_group")},
    "w4a8kv4_emb4_tied": dict(w_bits=4, a_bits=8, kv_bits=4, quantize_embeddings=True, quantize_lm_head=True),
}


@pytest.mark.parametrize("name", list(DEQUANT_CONFIGS))
def test_dequantized_weights_equal_packed(tmp_path, name):
    """weights="dequantized" caches the same weights: logits and generation equal the packed (on-the-fly) path."""
    tied = "tied" in name
    student = quantize_model(tiny_llama(tie=tied), QuantConfig(**DEQUANT_CONFIGS[name]))
    export_student(student, tmp_path / "exp")  # default fp16 scales: what a deployment loads
    packed = load_exported(tmp_path / "exp")
    cached = load_exported(tmp_path / "exp", weights="dequantized")
    mods = {n: m for n, m in cached.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    assert mods and all(m.cached_weight is not None for m in mods.values())
    assert all(
        m.cached_weight is None for m in packed.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))
    )
    assert cached.state_dict().keys() == packed.state_dict().keys()  # the cache is not persistent
    if tied:  # lm_head shares the embedding's codes, so it shares the dequantized table too
        assert isinstance(mods["model.embed_tokens"], QuantizedEmbedding)
        assert mods["lm_head"].cached_weight is mods["model.embed_tokens"].cached_weight

    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(9))
    ref, out = _logits(packed, ids), _logits(cached, ids)
    assert (out - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()

    # activations and KV are still quantized per token: k_proj outputs lie on the KV grid, inputs on the A grid
    k_proj = cached.model.layers[0].self_attn.k_proj
    kv_spec = kv_quantizer_of(cached.model.layers[0].self_attn).k_spec  # the export keeps the KV owner
    seen = []
    handle = k_proj.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o.detach())))
    _logits(cached, ids)
    handle.remove()
    x, y = seen[0]
    assert (fake_quantize(y, kv_spec) - y).abs().max().item() <= 1e-6 * y.abs().max().item()
    raw = torch.nn.functional.linear(fake_quantize(x, k_proj.act_spec), k_proj.cached_weight)
    assert (fake_quantize(raw, kv_spec) - raw).abs().max().item() > 1e-4 * raw.abs().max().item()
    assert not torch.allclose(k_proj(x), torch.nn.functional.linear(x, k_proj.cached_weight))  # input quantized

    kw = dict(do_sample=False, max_new_tokens=10, pad_token_id=0)
    gen_ref = packed.generate(ids[:, :5], cache=QuantizedKVCache(packed), **kw)
    assert torch.equal(cached.generate(ids[:, :5], cache=QuantizedKVCache(cached), **kw), gen_ref)

    for m in mods.values():  # back to packed mode
        m.drop_cache()
    assert torch.equal(_logits(cached, ids), ref)


def test_dequantized_weights_other_dtype_and_bad_mode(tmp_path, exported):
    half = load_exported(exported, dtype=torch.bfloat16, weights="dequantized")
    lin = next(m for m in half.modules() if isinstance(m, QuantizedLinear))
    assert lin.cached_weight.dtype == torch.bfloat16
    assert torch.equal(lin.cached_weight, lin.dequantized(torch.bfloat16))
    with pytest.raises(ValueError, match="weights must be one of"):
        load_exported(exported, weights="int4")


# ---- integrity ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "exp"
    export_student(quantize_model(tiny_llama(), QuantConfig()), path)
    return path


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_export_is_atomic_and_replaces(tmp_path, exported):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    student = quantize_model(tiny_llama(), QuantConfig())
    with pytest.raises(RuntimeError, match="disk full"):
        export_student(student, tmp_path / "half", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp folder is left behind
    target = _copy(exported, tmp_path / "exp")
    export_student(student, target, **EXACT)
    assert json.loads((target / "quant_config.json").read_text())["scale_dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_flipped_bytes_refused(tmp_path, exported):
    path = _copy(exported, tmp_path / "exp")
    st = path / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[len(data) // 2] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_exported(path)


def test_truncated_file_refused(tmp_path, exported):
    path = _copy(exported, tmp_path / "exp")
    st = path / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupted"):
        load_exported(path)


def _edit_meta(path, **changes):
    meta = json.loads((path / "quant_config.json").read_text())
    meta.update(changes)
    (path / "quant_config.json").write_text(json.dumps(meta))


def test_wrong_version_and_bad_json_refused(tmp_path, exported):
    path = _copy(exported, tmp_path / "exp")
    _edit_meta(path, format="qat-lightning-v0")
    with pytest.raises(ValueError, match="format 'qat-lightning-v0' is not supported"):
        load_exported(path)
    (path / "quant_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_exported(path)


def test_config_shape_mismatch_refused(tmp_path, exported):
    path = _copy(exported, tmp_path / "exp")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_exported(path)


def test_missing_tensor_refused(tmp_path, exported):
    path = _copy(exported, tmp_path / "exp")
    st = path / "model.safetensors"
    tensors = load_file(str(st))
    del tensors["model.layers.1.mlp.up_proj.scales"]
    save_file(tensors, str(st))
    _edit_meta(path, sha256=sha256_file(st))  # a consistent but incomplete export
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.scales'"):
        load_exported(path)


# ---- integer KV cache --------------------------------------------------------------------------------
KV_CONFIGS = ["w4a8kv4_sym", "w8a8kv8_asym", "w4a8kv4_head_group", "w4a8kv4_asym_overrides"]


@pytest.mark.parametrize("name", KV_CONFIGS)
def test_kv_cache_generation_equals_student(tmp_path, name):
    student = quantize_model(tiny_llama(), QuantConfig(**CONFIGS[name]))
    export_student(student, tmp_path / "exp", **EXACT)
    model = load_exported(tmp_path / "exp")
    ids = torch.randint(1, 64, (3, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row: positions differ per row
    kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=16, pad_token_id=0)
    ref = student.generate(ids, **kw)  # fake-quant student, ordinary FP cache of its quantized K/V
    cache = QuantizedKVCache(model)
    out = model.generate(ids, cache=cache, **kw)
    assert torch.equal(out, ref)
    layer = cache.layers[0]
    assert layer.k_codes.dtype in (torch.uint8, torch.int8) and layer.v_codes.dtype in (torch.uint8, torch.int8)
    assert cache.get_seq_length() == ids.shape[1] + 16 - 1


def test_kv_cache_stores_the_pre_rope_training_codes():
    student = quantize_model(tiny_llama(), QuantConfig(w_bits=4, a_bits=8, kv_bits=4))
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(7))
    k_proj = student.model.layers[1].self_attn.k_proj
    seen = []
    handle = k_proj.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    cache = QuantizedKVCache(student)
    with torch.no_grad():
        logits = student(ids, cache=cache, use_cache=True).logits
        step = student(ids[:, :1], cache=cache, use_cache=True).logits  # one decode step at position 10
    handle.remove()
    k_spec = kv_quantizer_of(student.model.layers[1].self_attn).k_spec
    codes, _, _ = quantize_to_int(torch.cat(seen, dim=1), k_spec)  # (B, 11, n_kv * head_dim)
    stored = unpack_int4(cache.layers[1].k_codes, codes.shape)
    assert torch.equal(stored, codes)
    full = _logits(student, torch.cat([ids, ids[:, :1]], dim=1))
    assert torch.allclose(logits, full[:, :10], atol=1e-5) and torch.allclose(step[:, -1], full[:, -1], atol=1e-5)
    # the cache really feeds attention: a coarser cache spec changes the logits
    coarse = QuantizedKVCache(student, spec=QuantSpec(bits=2, granularity="token"))
    with torch.no_grad():
        other = student(ids, cache=coarse, use_cache=True).logits
    assert (other - logits).abs().max() > 1e-3


def test_kv_cache_bytes_at_kv4_and_kv8():
    model = tiny_llama(hidden=128)  # GQA, head_dim 32, 2 KV heads: 64 K values per token per layer
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(8))
    for bits, limit in ((4, 0.30), (8, 0.55)):
        student = quantize_model(model, QuantConfig(w_bits=16, a_bits=16, kv_bits=bits))
        cache = QuantizedKVCache(student)
        with torch.no_grad():
            student(ids, cache=cache, use_cache=True)
        theory = theoretical_kv_bytes(student.config, 24, bits, batch=2)
        assert kv_cache_bytes(cache) == theory["quantized_bytes"]
        assert theory["fp16_bytes"] == 2 * 2 * 24 * 2 * 64 * 2  # layers * batch * T * (K, V) * width * 2 bytes
        assert theory["ratio"] <= limit


def test_a_llamacpp_format_student_round_trips_through_the_native_export(tmp_path):
    """quant=q4_0 (Q4_0 blocks, Q8_0 tied embedding, post-RoPE q8_0 KV) reloads to the same logits."""
    import dataclasses

    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR
    from qat_lightning.models import build_tiny_config, build_tiny_model
    from qat_lightning.quant import as_quant_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        q4_0 = as_quant_config(compose(config_name="quant/q4_0").quant)
    config = build_tiny_config(vocab_size=512, hidden_size=128, intermediate_size=256, num_heads=2, num_kv_heads=1,
                               tie_word_embeddings=True)
    for kv_bits in (8, 4):
        student = quantize_model(build_tiny_model(config, seed=0), dataclasses.replace(q4_0, kv_bits=kv_bits))
        stats = export_student(student, tmp_path / f"kv{kv_bits}")
        assert stats["num_packed_linears"] == 14  # 2 layers x 7 (the tied Q8_0 table is stored as int8)
        loaded = load_exported(tmp_path / f"kv{kv_bits}", weights="dequantized")
        ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
        assert torch.equal(_logits(loaded, ids), _logits(student, ids))
