"""Model loading: tiny Llama/Qwen2 with GQA, the byte tokenizer, config validation, missing models, SmolLM2."""

from __future__ import annotations

import time

import pytest
import torch

from qat_lightning.models import ByteTokenizer, ModelConfig, build_tiny_config, build_tiny_model, load_model


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
    with pytest.raises(FileNotFoundError, match="not found locally"):
        load_model({"source": "hub", "name_or_path": str(missing)})


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
def test_smollm2_tokenizer_round_trip_and_sensible_prediction(smollm2):
    model, tokenizer = smollm2
    text = "Hello, wörld! 世界 🙂\n  indented"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < 49152 and tokenizer.decode(ids) == text
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_id = model(**prompt).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]).strip() == "Paris"  # the converted weights are a trained model
