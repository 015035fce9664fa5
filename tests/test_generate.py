"""Data-free corpus generation on a tiny random Llama: the sampling rules, determinism, resume, ranks."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers
from omegaconf import OmegaConf
from torch import nn

from qat_lightning.data.config import GenerationConfig
from qat_lightning.data.generate import generate_batch, generate_corpus, start_candidates, start_tokens
from qat_lightning.data.shards import corpus_is_complete, load_generated, read_meta, shard_name

VOCAB, BOS, EOS, PAD = 64, 1, 2, 0


def tiny_llama(seed: int = 0, logit_scale: float = 1.0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)  # a peakier softmax than the near-uniform random init
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_llama(0, logit_scale=8.0)


def gen_cfg(**kw) -> GenerationConfig:
    base = dict(num_sequences=12, max_length=10, batch_size=4, shard_size=4, seed=0)
    return GenerationConfig(**(base | kw))


def full_forward_logits(model, seq: list[int]) -> torch.Tensor:
    """Logits of every position from one forward of the whole prefix (no KV cache)."""
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].float()  # (T, V)


def random_firsts(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


# ---- the sampling rules --------------------------------------------------------------------------
def test_hybrid_first_k_tokens_are_the_teachers_argmax(model):
    cfg = gen_cfg(max_length=14, stop_at_eos=False)
    firsts = random_firsts(16, 1)
    ks = torch.tensor([3, 4, 5, 3] * 4)
    seqs = generate_batch(model, firsts, ks, cfg, torch.Generator().manual_seed(0), EOS)
    sampled_differs = 0
    for seq, k, first in zip(seqs, ks.tolist(), firsts.tolist()):
        assert len(seq) == cfg.max_length and seq[0] == first
        argmax = full_forward_logits(model, seq).argmax(-1).tolist()  # argmax[t] predicts seq[t + 1]
        assert seq[1 : k + 1] == argmax[:k], f"greedy prefix of k={k} differs from the full-forward argmax"
        sampled_differs += sum(seq[t + 1] != argmax[t] for t in range(k, len(seq) - 1))
    assert sampled_differs > 0, "after the first k tokens nothing was sampled"


def test_top1_is_fully_greedy_and_eos_compaction_keeps_rows_right(model):
    firsts = random_firsts(16, 2)
    ks = torch.zeros(16, dtype=torch.long)
    free = generate_batch(model, firsts, ks, gen_cfg(strategy="top1", stop_at_eos=False), torch.Generator(), EOS)
    for seq in free:
        argmax = full_forward_logits(model, seq).argmax(-1).tolist()
        assert seq[1:] == argmax[:-1]
    # Call a token that ends some greedy rows (but not all) "EOS": rows must stop there, the others must be
    # unchanged although finished rows leave the batch and the KV cache mid-way.
    counts = {t: sum(t in s[1:] for s in free) for t in range(VOCAB)}
    stop_id = max((t for t in counts if 0 < counts[t] < len(free)), key=lambda t: counts[t])
    stopped = generate_batch(model, firsts, ks, gen_cfg(strategy="top1"), torch.Generator(), stop_id)
    lengths = set()
    for full, seq in zip(free, stopped):
        cut = full.index(stop_id, 1) + 1 if stop_id in full[1:] else len(full)
        assert seq == full[:cut]
        lengths.add(len(seq))
    assert len(lengths) > 1


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of observed counts to probs, pooling cells with expected count < 5."""
    probs = probs.double() / probs.double().sum()
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    try:
        from scipy.stats import chisquare

        return float(chisquare(obs.numpy(), exp.numpy()).pvalue)
    except ImportError:  # Wilson-Hilferty approximation of the chi-square tail
        stat, dof = float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1
        z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
        return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_tokens_follow_the_softmax(model, temperature):
    rows, first, k = 4000, 17, 2
    cfg = gen_cfg(max_length=k + 2, k_choices=[k], temperature=temperature, stop_at_eos=False)
    seqs = generate_batch(
        model, torch.full((rows,), first), torch.full((rows,), k), cfg, torch.Generator().manual_seed(3), EOS
    )
    prefix = seqs[0][: k + 1]
    assert all(s[: k + 1] == prefix for s in seqs)  # a fixed greedy prefix, then one sampled token
    logits = full_forward_logits(model, prefix)[-1]  # (V,)
    counts = torch.bincount(torch.tensor([s[k + 1] for s in seqs]), minlength=VOCAB)
    assert chi_square_pvalue(counts, (logits / temperature).softmax(-1)) > 1e-3
    wrong = 2.0 * temperature  # the test has power: the wrong temperature is rejected
    assert chi_square_pvalue(counts, (logits / wrong).softmax(-1)) < 1e-6


def test_top_k_and_top_p_restrict_the_support(model):
    rows, first, k = 400, 9, 1
    logits = None
    for kw in ({"top_k": 3}, {"top_p": 0.5}):
        cfg = gen_cfg(max_length=k + 2, k_choices=[k], stop_at_eos=False, **kw)
        seqs = generate_batch(model, torch.full((rows,), first), torch.full((rows,), k), cfg, torch.Generator(), EOS)
        if logits is None:
            logits = full_forward_logits(model, seqs[0][: k + 1])[-1]
        probs, order = logits.softmax(-1).sort(descending=True)
        if "top_k" in kw:
            allowed = set(order[:3].tolist())
        else:
            n_keep = int(((probs.cumsum(0) - probs) < 0.5).sum())
            allowed = set(order[:n_keep].tolist())
        seen = {s[k + 1] for s in seqs}
        assert seen <= allowed and len(seen) >= 1


def test_eos_stops_a_row(model):
    eos_model = tiny_llama(0)
    head = nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(eos_model.lm_head.weight)
        head.bias.zero_()
        head.bias[EOS] = 100.0  # EOS dominates every position
    eos_model.lm_head = head
    firsts = random_firsts(8, 4)
    ks = torch.full((8,), 3)
    seqs = generate_batch(eos_model, firsts, ks, gen_cfg(), torch.Generator(), EOS)
    assert seqs == [[f, EOS] for f in firsts.tolist()]
    seqs = generate_batch(eos_model, firsts, ks, gen_cfg(stop_at_eos=False), torch.Generator(), EOS)
    assert all(len(s) == 10 for s in seqs)


# ---- the corpus ----------------------------------------------------------------------------------
def test_start_tokens_skip_special_ids(model, tmp_path):
    candidates = start_candidates(model)
    assert set(candidates.tolist()) == set(range(VOCAB)) - {BOS, EOS, PAD}
    cfg = gen_cfg(num_sequences=40, max_length=3, k_choices=[1], shard_size=40)
    generate_corpus(model, None, cfg, tmp_path, progress=False)
    firsts = [s[0] for s in load_generated(tmp_path)]
    assert not {BOS, EOS, PAD} & set(firsts) and len(set(firsts)) > 20


def test_same_seed_same_corpus_other_seed_differs(model, tmp_path):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        stats = generate_corpus(model, None, gen_cfg(seed=seed), tmp_path / name, progress=False)
        assert stats["num_sequences"] == 12 and stats["tokens_per_s"] > 0
        runs.append(load_generated(tmp_path / name))
        assert stats["num_tokens"] == sum(map(len, runs[-1]))
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert len(runs[0]) == 12
    # a complete corpus is recognised, and a rerun generates nothing
    assert corpus_is_complete(tmp_path / "a", gen_cfg())
    assert generate_corpus(model, None, gen_cfg(), tmp_path / "a", progress=False)["generated_sequences"] == 0


def test_exhaustive_walks_start_ids_times_k(model, tmp_path):
    cfg = gen_cfg(start_mode="exhaustive", k_choices=[1, 2], num_sequences=2 * 61, max_length=3, shard_size=50)
    candidates = start_candidates(model)
    firsts, ks = start_tokens(cfg, candidates, 0, cfg.num_sequences, torch.Generator())
    assert sorted(zip(firsts.tolist(), ks.tolist())) == sorted((c, k) for c in candidates.tolist() for k in (1, 2))
    generate_corpus(model, None, cfg, tmp_path, progress=False)
    assert [s[0] for s in load_generated(tmp_path)] == firsts.tolist()
    with pytest.raises(ValueError, match="exhaustive"):
        generate_corpus(model, None, gen_cfg(start_mode="exhaustive", num_sequences=1000), tmp_path / "x")


def test_mismatched_folder_is_refused(model, tmp_path):
    generate_corpus(model, None, gen_cfg(), tmp_path, model_name="tiny", progress=False)
    with pytest.raises(ValueError, match=r"different settings.*seed: 0 -> 1"):
        generate_corpus(model, None, gen_cfg(seed=1), tmp_path, model_name="tiny", progress=False)
    with pytest.raises(ValueError, match=r"model_name: 'tiny' -> 'other'"):
        generate_corpus(model, None, gen_cfg(), tmp_path, model_name="other", progress=False)
    assert not corpus_is_complete(tmp_path, gen_cfg(k_choices=[3]))


def test_growing_a_corpus_equals_generating_it_at_once(model, tmp_path):
    generate_corpus(model, None, gen_cfg(num_sequences=10), tmp_path / "grown", progress=False)
    generate_corpus(model, None, gen_cfg(num_sequences=14), tmp_path / "grown", progress=False)
    generate_corpus(model, None, gen_cfg(num_sequences=14), tmp_path / "once", progress=False)
    assert read_meta(tmp_path / "grown")["num_sequences"] == 14
    assert load_generated(tmp_path / "grown") == load_generated(tmp_path / "once")


def test_two_ranks_make_the_single_process_corpus(model, tmp_path):
    cfg = gen_cfg(num_sequences=14)
    generate_corpus(model, None, cfg, tmp_path / "single", progress=False)
    assert not corpus_is_complete(tmp_path / "split", cfg)
    generate_corpus(model, None, cfg, tmp_path / "split", rank=0, world_size=2, progress=False)
    assert not corpus_is_complete(tmp_path / "split", cfg)  # rank 1's shards are still missing
    assert sorted(p.name for p in (tmp_path / "split").glob("shard-*")) == [shard_name(0), shard_name(2)]
    generate_corpus(model, None, cfg, tmp_path / "split", rank=1, world_size=2, progress=False)
    assert load_generated(tmp_path / "split") == load_generated(tmp_path / "single")


_CHILD = """
import sys, time, torch, transformers
from qat_lightning.data.config import GenerationConfig
from qat_lightning.data.generate import generate_corpus
torch.set_num_threads(1)
model = transformers.LlamaForCausalLM.from_pretrained(sys.argv[1]).eval()
model.register_forward_pre_hook(lambda *args: time.sleep(0.03))  # slow enough to be killed mid-run
cfg = GenerationConfig(num_sequences=24, max_length=10, batch_size=2, shard_size=4, seed=0)
generate_corpus(model, None, cfg, sys.argv[2], progress=False)
"""


def test_sigkill_mid_shard_then_resume_gives_the_uninterrupted_corpus(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "model"), str(killed)])
    try:
        deadline = time.monotonic() + 90
        while not (killed / shard_name(0)).exists():
            assert proc.poll() is None, f"generator exited early with code {proc.returncode}"
            assert time.monotonic() < deadline, "no shard written in 90 s"
            time.sleep(0.05)
        assert proc.poll() is None, "the generator finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = sorted(p.name for p in killed.glob("shard-*.safetensors"))
    assert 1 <= len(left) < 6, left
    cfg = GenerationConfig(num_sequences=24, max_length=10, batch_size=2, shard_size=4, seed=0)
    assert not corpus_is_complete(killed, cfg)
    with pytest.raises(ValueError, match="incomplete"):
        load_generated(killed)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "model").eval()
    stats = generate_corpus(reloaded, None, cfg, killed, progress=False)
    assert stats["generated_sequences"] == 24 - 4 * len(left)
    generate_corpus(reloaded, None, cfg, tmp_path / "uninterrupted", progress=False)
    resumed = load_generated(killed)
    assert len(resumed) == 24
    assert resumed == load_generated(tmp_path / "uninterrupted")


# ---- config validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"strategy": "beam"}, "strategy"),
        ({"start_mode": "sorted"}, "start_mode"),
        ({"k_choices": [3, 10], "max_length": 10}, "k_choices"),
        ({"k_choices": [-1]}, "k_choices"),
        ({"k_choices": []}, "k_choices"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_sequences": 0}, "num_sequences"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"shard_size": 0}, "shard_size"),
    ],
)
def test_bad_generation_config_fails_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kw)
    with pytest.raises(ValueError, match=match):  # also through Hydra/OmegaConf structured configs
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(GenerationConfig), kw))
