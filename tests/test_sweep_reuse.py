"""What lets ablation sweeps share work: the run memo (`memo=true`) and the baseline score cache
(`evaluate.cache=true`), and the guard against training on the evaluated WikiText-2 text."""

from __future__ import annotations

import json

import pytest

from conftest import compose, shared_data_or_skip, tiny_overrides
from qat_lightning import run_memo
from qat_lightning.config import ConfigError, validate_config
from qat_lightning.results import load_results
from qat_lightning.stages import RunContext, run_stages
from test_train import run_cli

FAST = ["generation.num_sequences=16", "generation.max_length=40", "generation.batch_size=8",
        "generation.shard_size=8", "data.block_size=32", "data.batch_size=2", "evaluate.kl_batches=1",
        "logger=none"]


# ---- run memo ------------------------------------------------------------------------------------
def test_memo_key_ignores_what_does_not_change_results():
    cfg = {"quant": {"w_bits": 4}, "optim": {"lr": 3e-4}, "logger": {"group": "a"}, "paths": {"x": 1}, "name": "a"}
    same = {**cfg, "logger": {"group": "b"}, "paths": {"x": 2}, "name": "b", "memo": True}
    other = {**cfg, "quant": {"w_bits": 8}}
    assert run_memo.memo_key(cfg) == run_memo.memo_key(same)
    assert run_memo.memo_key(cfg) != run_memo.memo_key(other)


def test_memo_stores_finished_runs_only(tmp_path):
    run_memo.store(tmp_path, "k1", tmp_path / "run1", {"evaluate/qat/kl": 0.5})
    run_memo.store(tmp_path, "k2", tmp_path / "run2", {"evaluate/qat/kl": 0.5, "run/job/failed": 1.0})
    assert run_memo.lookup(tmp_path, "k1")["results"] == {"evaluate/qat/kl": 0.5}
    assert run_memo.lookup(tmp_path, "k2") is None
    out = run_memo.replay(run_memo.lookup(tmp_path, "k1"), tmp_path / "run3")
    assert json.loads(out.read_text()) == {"evaluate/qat/kl": 0.5}
    assert json.loads((tmp_path / "run3" / "memo.json").read_text())["copied_from"] == str(tmp_path / "run1")


def test_an_identical_run_is_replayed_and_a_different_one_is_not(tmp_path):
    common = ["+exp=tiny_w4a8kv4", *FAST, "memo=true", f"paths.data_dir={tmp_path}/data",
              f"paths.cache_dir={tmp_path}/cache"]
    run_cli([*common, f"hydra.run.dir={tmp_path}/a", "logger.group=first"], cwd=tmp_path)
    first = load_results(tmp_path / "a")
    # same numbers-deciding config, other logger group and name: replayed, no training
    proc = run_cli([*common, f"hydra.run.dir={tmp_path}/b", "logger=wandb", "logger.group=second", "name=other"],
                   cwd=tmp_path)
    assert load_results(tmp_path / "b") == first
    # the replayed results are on the sweep's dashboard too
    (record,) = (tmp_path / "b" / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"evaluate/qat/kl" in record.read_bytes()
    assert json.loads((tmp_path / "b" / "memo.json").read_text())["copied_from"] == str(tmp_path / "a")
    assert not (tmp_path / "b" / "student").exists() and "memo: identical" in proc.stdout + proc.stderr
    # a different lr is a different run
    run_cli([*common, f"hydra.run.dir={tmp_path}/c", "optim.lr=3e-3"], cwd=tmp_path)
    assert not (tmp_path / "c" / "memo.json").exists()
    assert load_results(tmp_path / "c")["evaluate/qat/kl"] != first["evaluate/qat/kl"]


# ---- baseline score cache ------------------------------------------------------------------------
def _evaluate(tmp_path, run: str, *extra: str) -> dict:
    cfg = validate_config(compose(["+exp=tiny_w4a8kv4", *tiny_overrides(tmp_path), "stages=[generate,evaluate]",
                                   "evaluate.methods=[fp,rtn,smoothquant]", "calib_batches=1", *extra]))
    run_stages(RunContext(cfg, tmp_path / run))
    return {k: v for k, v in load_results(tmp_path / run).items() if k.startswith("evaluate/")}


def test_cached_baseline_scores_equal_recomputed_ones(tmp_path):
    fresh = _evaluate(tmp_path, "fresh")  # cache off
    cache_dir = tmp_path / "data" / "eval_cache"
    assert not cache_dir.exists()
    first = _evaluate(tmp_path, "first", "evaluate.cache=true")
    n_entries = len(list(cache_dir.glob("*.json")))
    assert n_entries == 3  # fp, rtn, smoothquant x the one task (kl)
    second = _evaluate(tmp_path, "second", "evaluate.cache=true")
    assert first == fresh and second == fresh
    # another quantizer is another score: new entries for rtn and smoothquant, fp is shared
    _evaluate(tmp_path, "w8", "evaluate.cache=true", "quant=w8a8kv8")
    assert len(list(cache_dir.glob("*.json"))) == n_entries + 2


def test_a_cached_score_changes_with_the_held_out_data(tmp_path):
    _evaluate(tmp_path, "a", "evaluate.cache=true", "evaluate.methods=[rtn]")
    _evaluate(tmp_path, "b", "evaluate.cache=true", "evaluate.methods=[rtn]", "data.seed=5")  # other split
    assert len(list((tmp_path / "data" / "eval_cache").glob("*.json"))) == 2


def test_kl_on_the_fixed_hybrid_corpus_is_the_same_for_any_training_data(tmp_path):
    a = _evaluate(tmp_path, "a", "evaluate.methods=[rtn]", "evaluate.kl_data=hybrid")
    b = _evaluate(tmp_path, "b", "evaluate.methods=[rtn]", "evaluate.kl_data=hybrid", "generation=top1")
    own = _evaluate(tmp_path, "c", "evaluate.methods=[rtn]", "generation=top1")
    assert a["evaluate/rtn/kl"] == b["evaluate/rtn/kl"] != own["evaluate/rtn/kl"]


# ---- no training on the evaluated text -----------------------------------------------------------
def test_training_on_the_evaluated_wikitext_windows_is_refused(tmp_path, monkeypatch):
    data = shared_data_or_skip()
    monkeypatch.setenv("QAT_DATA_DIR", str(data))
    wiki = data / "wikitext2" / "wiki.test.raw"
    base = ["+exp=tiny_w4a8kv4", *tiny_overrides(tmp_path), "data=text", f"data.text_path={wiki}",
            "evaluate.tasks=[wikitext2]", "evaluate.seq_len=512", "evaluate.max_windows=16"]
    with pytest.raises(ConfigError, match="text_offset_tokens >= 8192"):
        validate_config(compose([*base, "data.text_offset_tokens=100"]))
    with pytest.raises(ConfigError, match="all of it is evaluated"):
        validate_config(compose([*base, "evaluate.max_windows=null"]))
    validate_config(compose([*base, "data.text_offset_tokens=8192"]))
    validate_config(compose(base))  # the text data config skips 32,768 tokens by default
    validate_config(compose([*base, "data.text_offset_tokens=0", "stages=[generate,train]"]))  # nothing evaluated
