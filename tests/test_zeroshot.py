"""The paper's eight zero-shot tasks: local releases mapped onto lm-eval's own task definitions, scored fast.

Checked against independent readings of the release files (item and label counts, each task's first item
rendered with the harness's documented prompt) and against lm-eval's own `HFLM` on the same requests
(log-likelihoods, and whole task metrics through `lm_eval.evaluator.evaluate`), on a tiny random Llama.
"""

from __future__ import annotations

import collections
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'qat-lightning[eval]'")

from conftest import CONF_DIR, SHARED_DATA  # noqa: E402
from qat_lightning.eval import EvalConfig, check_eval_data, evaluate_model  # noqa: E402
from qat_lightning.eval.cache import task_parts  # noqa: E402
from qat_lightning.eval.lm_eval_adapter import QATLM  # noqa: E402
from qat_lightning.eval.zeroshot import (  # noqa: E402
    PAPER_METRIC,
    SIZES,
    ZEROSHOT_TASKS,
    build_tasks,
    hellaswag_doc,
    load_docs,
    task_files,
    zeroshot_average,
)
from qat_lightning.models import load_model  # noqa: E402
from test_lm_eval_adapter import byte_level_hf_tokenizer  # noqa: E402

# the item counts the data README documents for each split
README_COUNTS = {"boolq": 3270, "piqa": 1838, "siqa": 1954, "hellaswag": 10042, "winogrande": 1267,
                 "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}
HARNESS_REPORTS_ACC_NORM = {"piqa", "hellaswag", "arc_easy", "arc_challenge", "openbookqa"}


def data_or_skip() -> Path:
    if not all((SHARED_DATA / name).is_dir() for name in ("boolq", "piqa", "siqa", "winogrande", "arc_easy",
                                                           "arc_challenge", "openbookqa", "hellaswag")):
        pytest.skip(f"zero-shot releases not found under {SHARED_DATA} (needs ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture
def data(monkeypatch) -> Path:
    root = data_or_skip()
    monkeypatch.setenv("QAT_DATA_DIR", str(root))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return root


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def raw_release(task: str, root: Path) -> tuple[list[int], dict]:
    """Gold choice index of every item and the first item, read from the release with plain Python."""
    if task == "boolq":
        rows = jsonl(root / "boolq/dev.jsonl")
        return [int(r["answer"]) for r in rows], rows[0]  # choices ["no", "yes"]
    if task in ("piqa", "siqa", "winogrande"):
        stem = {"piqa": "piqa/valid", "siqa": "siqa/dev", "winogrande": "winogrande/dev"}[task]
        labels = lines(root / f"{stem}-labels.lst")
        offset = 0 if task == "piqa" else 1  # SIQA 1..3, WinoGrande 1..2
        return [int(x) - offset for x in labels], jsonl(root / f"{stem}.jsonl")[0]
    if task == "hellaswag":
        import bz2

        with bz2.open(root / "hellaswag/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
            text = f.read().splitlines()
        return [int(text[i + 1]) for i in range(0, len(text) - 5, 6)], {"context": text[0], "endings": text[2:6]}
    path = {"arc_easy": "arc_easy/ARC-Easy-Test.jsonl", "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl",
            "openbookqa": "openbookqa/test.jsonl"}[task]
    rows = jsonl(root / path)
    return [[c["label"] for c in r["question"]["choices"]].index(r["answerKey"]) for r in rows], rows[0]


def expected_first(task: str, first: dict) -> tuple[str, list[str]]:
    """The harness's documented prompt and choices of a release's first item (YAML templates, by hand)."""
    if task == "boolq":
        return f"{first['passage']}\nQuestion: {first['question']}?\nAnswer:", ["no", "yes"]
    if task == "piqa":
        return f"Question: {first['goal']}\nAnswer:", [first["sol1"], first["sol2"]]
    if task == "siqa":
        return f"Q: {first['context']} {first['question']}\nA:", [first[f"answer{k}"] for k in "ABC"]
    if task == "winogrande":  # the choices are the contexts; the shared continuation is the target
        cut = first["sentence"].index("_")
        return first["sentence"][cut + 1 :].strip(), [first["sentence"][:cut] + first[f"option{k}"] for k in "12"]
    if task == "hellaswag":  # the hub's item 0: ctx_a "A man is sitting on a roof.", ctx_b "he" (capitalised)
        assert first["context"] == "Roof shingle removal: A man is sitting on a roof. he"
        return "Roof shingle removal: A man is sitting on a roof. He", first["endings"]
    stem = first["question"]["stem"]
    choices = [c["text"] for c in first["question"]["choices"]]
    return (stem if task == "openbookqa" else f"Question: {stem}\nAnswer:"), choices


# ---- the releases through the harness's tasks --------------------------------------------------------------
@pytest.mark.parametrize("task", ZEROSHOT_TASKS)
def test_loader_yields_the_documented_items_labels_and_first_prompt(task, data):
    docs = load_docs(task)
    assert len(docs) == README_COUNTS[task] == SIZES[task]
    (harness_task,) = build_tasks({task: docs})["tasks"].values()
    eval_docs = list(harness_task.task_docs)  # the processed split the harness scores
    assert len(eval_docs) == len(docs)
    gold, first = raw_release(task, data)
    if task == "winogrande":  # multiple inputs: the target is the index of the right context
        got = [harness_task.doc_to_text(d) for d in eval_docs]
    else:
        got = [harness_task.doc_to_target(d) for d in eval_docs]
        got = [int(g) if not isinstance(g, str) or g.isdigit() else harness_task.doc_to_choice(d).index(g)
               for g, d in zip(got, eval_docs)]
    assert collections.Counter(got) == collections.Counter(gold)  # the label distribution
    assert got == gold  # and item by item, in file order
    text, choices = expected_first(task, first)
    doc = eval_docs[0]
    if task == "winogrande":
        assert harness_task.doc_to_target(doc) == text and harness_task.doc_to_choice(doc) == choices
    else:
        assert harness_task.doc_to_text(doc) == text
        assert harness_task.doc_to_choice(doc) == choices
    assert load_docs(task, limit=7) == docs[:7]  # a limit keeps the first items, in file order


def test_hellaswag_context_split():
    doc = hellaswag_doc("Clean and jerk: A lady walks to a barbell. She bends down. the lady", 3, ["a", "b"])
    assert (doc["activity_label"], doc["ctx_a"], doc["ctx_b"]) == ("Clean and jerk", "A lady walks to a barbell. "
                                                                    "She bends down.", "the lady")
    assert doc["label"] == "3" and doc["endings"] == ["a", "b"]
    wikihow = hellaswag_doc("Health: How to rest. Lie down. Close your eyes.", 0, ["x"])
    assert (wikihow["ctx_a"], wikihow["ctx_b"]) == ("How to rest. Lie down. Close your eyes.", "")


# ---- our scorer vs lm-eval's own HFLM ----------------------------------------------------------------------
def harness_requests(data: Path, items: int) -> list:
    loaded = build_tasks({t: load_docs(t, limit=items) for t in ZEROSHOT_TASKS})
    requests = []
    for task in loaded["tasks"].values():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        requests += task.instances
    return requests


def test_scorer_equals_hflm_loglikelihoods_on_every_task(data):
    from lm_eval.models.huggingface import HFLM

    model, tok = load_model({"source": "tiny", "max_position_embeddings": 256})  # BoolQ passages are cut
    requests = harness_requests(data, items=3)
    assert len({r.task_name for r in requests}) == 8
    hflm = HFLM(pretrained=model, tokenizer=byte_level_hf_tokenizer(), batch_size=4, device="cpu")
    want = hflm.loglikelihood(requests, disable_tqdm=True)
    shared = QATLM(model, tok, batch_size=5)
    got = shared.loglikelihood(requests)
    rows = QATLM(model, tok, batch_size=3, share_context=False)
    got_rows = rows.loglikelihood(requests)
    assert shared.tokens_forwarded < rows.tokens_forwarded  # contexts ran once, not once per choice
    for (a, ga), (b, gb), (c, gc), req in zip(got, got_rows, want, requests):
        assert a == pytest.approx(c, abs=1e-4) and b == pytest.approx(c, abs=1e-4), req.args
        assert ga == gb == gc
    assert len({round(ll, 3) for ll, _ in want}) > len(want) // 2  # real, varied numbers


@pytest.mark.parametrize("placement", ["pre_rope", "post_rope"])
def test_shared_contexts_score_a_quantized_student_as_whole_rows(placement, data):
    """The KV cache the shared path reuses holds the same fake-quantized K/V as a whole-row forward."""
    from qat_lightning.quant import quantize_model

    model, tok = load_model({"source": "tiny"})
    student = quantize_model(model, {"w_bits": 4, "a_bits": 8, "kv_bits": 4, "kv_placement": placement})
    requests = [r for r in harness_requests(data, items=2) if r.task_name in ("arc_easy", "hellaswag", "piqa")]
    fast = QATLM(student, tok, batch_size=6).loglikelihood(requests)
    slow = QATLM(student, tok, batch_size=1, share_context=False).loglikelihood(requests)
    plain = QATLM(model, tok, batch_size=6).loglikelihood(requests)
    assert [a for a, _ in fast] == pytest.approx([b for b, _ in slow], rel=1e-5, abs=1e-4)  # fp32 noise only
    assert [a for a, _ in fast] != pytest.approx([b for b, _ in plain], abs=1e-2)  # quantization is on


# ---- end to end --------------------------------------------------------------------------------------------
def test_evaluate_model_scores_all_eight_tasks_as_the_harness_does(data):
    """`tasks=[zeroshot]` through `evaluate_model` = lm-eval's `evaluate` with HFLM on the same items."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    model, tok = load_model({"source": "tiny", "max_position_embeddings": 256})
    cfg = EvalConfig(tasks=["zeroshot", "piqa"], zeroshot_limit=4, zeroshot_batch_size=7)
    metrics = evaluate_model(model, tok, cfg)
    hflm = HFLM(pretrained=model, tokenizer=byte_level_hf_tokenizer(), batch_size=8, device="cpu")
    ref = evaluate(lm=hflm, task_dict=build_tasks({t: load_docs(t, limit=4) for t in ZEROSHOT_TASKS}),
                   bootstrap_iters=1000, log_samples=False)["results"]
    for task in ZEROSHOT_TASKS:
        harness = ref["social_iqa" if task == "siqa" else task]
        names = ["acc", "acc_norm"] if task in HARNESS_REPORTS_ACC_NORM else ["acc"]
        for name in names:
            assert metrics[f"{task}_{name}"] == pytest.approx(harness[f"{name},none"]), (task, name)
            assert metrics[f"{task}_{name}_stderr"] == pytest.approx(harness[f"{name}_stderr,none"])
        assert (f"{task}_acc_norm" in metrics) == (task in HARNESS_REPORTS_ACC_NORM)
        assert metrics[f"{task}_n"] == 4 and metrics[f"{task}_n_total"] == SIZES[task]
    want_avg = sum(metrics[f"{t}_{PAPER_METRIC[t]}"] for t in ZEROSHOT_TASKS) / 8
    assert metrics["zeroshot_avg"] == pytest.approx(want_avg)
    se = math.sqrt(sum(metrics[f"{t}_{PAPER_METRIC[t]}_stderr"] ** 2 for t in ZEROSHOT_TASKS)) / 8
    assert metrics["zeroshot_avg_stderr"] == pytest.approx(se)
    assert all(type(v) is float for v in metrics.values())
    one = evaluate_model(model, tok, EvalConfig(tasks=["arc_easy"], zeroshot_limit=4))
    assert one == {k: v for k, v in metrics.items() if k.startswith("arc_easy_")}  # by name; no average


def test_zeroshot_average_needs_all_eight_and_uses_the_papers_metrics():
    metrics = {f"{t}_{m}": 0.5 for t in ZEROSHOT_TASKS for m in ("acc", "acc_norm")}
    metrics["piqa_acc_norm"] = 0.9  # the paper's PIQA metric
    metrics["boolq_acc_norm"] = 0.0  # not the paper's BoolQ metric: ignored
    assert zeroshot_average(metrics) == {"zeroshot_avg": pytest.approx((7 * 0.5 + 0.9) / 8)}
    del metrics["openbookqa_acc_norm"]
    assert zeroshot_average(metrics) == {}


# ---- missing data, config, cache ---------------------------------------------------------------------------
def test_missing_data_folder_is_one_clear_line_per_task(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # no HF fallback for HellaSwag
    monkeypatch.delenv("QAT_DATA_DIR", raising=False)
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        task_files("piqa", empty)
    message = str(err.value)
    assert "\n" not in message and "piqa" in message and str(empty) in message
    model, tok = load_model({"source": "tiny"})
    with pytest.raises(FileNotFoundError, match=f"zero-shot task arc_easy: .*{empty.name}"):
        evaluate_model(model, tok, EvalConfig(tasks=["arc_easy"], zeroshot_data_dir=str(empty)))
    ev = EvalConfig(tasks=["zeroshot"], zeroshot_data_dir=str(empty))
    with pytest.raises(FileNotFoundError) as err:
        check_eval_data(ev)
    found = str(err.value).splitlines()
    assert len(found) == 8  # every task, one line each (HellaSwag: no file, no datasets)
    for task, line in zip(ZEROSHOT_TASKS, found):
        assert task in line
    with pytest.raises(FileNotFoundError, match=r"\$QAT_DATA_DIR unset"):
        task_files("boolq")
    check_eval_data(EvalConfig(tasks=["kl"]))  # nothing to read: no error


def test_dataclass_and_yaml_defaults_are_identical():
    from dataclasses import fields

    yaml_defaults = yaml.safe_load((CONF_DIR / "evaluate" / "default.yaml").read_text())
    ev = EvalConfig()
    for f in fields(EvalConfig):
        if f.name in yaml_defaults:
            assert yaml_defaults[f.name] == getattr(ev, f.name), f.name
    for name in ("zeroshot_limit", "zeroshot_batch_size", "zeroshot_data_dir", "hellaswag_limit"):
        assert name in yaml_defaults
    with pytest.raises(ValueError, match="zeroshot_limit"):
        EvalConfig(zeroshot_limit=0)
    with pytest.raises(ValueError, match="unknown evaluate task"):
        EvalConfig(tasks=["zero_shot"])


def test_cache_key_of_a_zeroshot_task_follows_its_limit_and_files(data):
    ev = EvalConfig(tasks=["zeroshot"], zeroshot_limit=10)
    parts = task_parts(ev, "zeroshot", None)
    assert parts != task_parts(EvalConfig(tasks=["zeroshot"], zeroshot_limit=11), "zeroshot", None)
    assert parts["limits"] == {t: 10 for t in ZEROSHOT_TASKS} and parts["lm_eval"] == lm_eval.__version__
    assert all(parts["files"][t] for t in ZEROSHOT_TASKS)
    # without a zero-shot limit HellaSwag keeps evaluate.hellaswag_limit
    assert task_parts(EvalConfig(), "hellaswag", None)["limits"] == {"hellaswag": 200}


def test_paper_table_puts_the_eight_task_average_beside_wikitext2(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import collect

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- quant=w4a8kv4\n")
    results = {"evaluate/fp/wikitext2_ppl": 36.1, "evaluate/rtn/wikitext2_ppl": 130.5}
    for method, acc in (("fp", 0.5), ("rtn", 0.25)):
        for task, metric, _ in collect.PAPER_COLUMNS:
            results[f"evaluate/{method}/{task}_{metric}"] = acc
            results[f"evaluate/{method}/{task}_n"], results[f"evaluate/{method}/{task}_n_total"] = 40, SIZES[task]
        results[f"evaluate/{method}/zeroshot_avg"] = acc
        results[f"evaluate/{method}/zeroshot_avg_stderr"] = 0.02
    results["evaluate/rtn/zeroshot_avg_minus_fp"], results["evaluate/rtn/zeroshot_avg_minus_fp_stderr"] = -0.25, 0.01
    (run / "results.json").write_text(json.dumps(results))
    assert [m for _, m, _ in collect.paper_rows([run])] == ["fp", "rtn"]
    text = collect.paper_markdown(collect.paper_rows([run]))
    assert "| Avg. | Avg. − fp (paired) | Wiki2 ppl | items/task |" in text
    assert "| quant=w4a8kv4 | fp | " + " | ".join(["50.0"] * 8) + " | 50.0 ± 2.0 | - | 36.1 | 40 |" in text
    assert "| quant=w4a8kv4 | rtn | " + " | ".join(["25.0"] * 8) + " | 25.0 ± 2.0 | -25.0 ± 1.0 | 130.5 | 40 |" in text
    assert [task for task, _, _ in collect.PAPER_COLUMNS] == list(ZEROSHOT_TASKS)
    assert {t: m for t, m, _ in collect.PAPER_COLUMNS} == PAPER_METRIC  # one definition of the paper's metrics


# ---- paired comparisons ------------------------------------------------------------------------------------
def test_paired_difference_is_the_difference_of_averages_with_the_paired_stderr():
    from qat_lightning.eval.zeroshot import paired_difference

    ref = {t: [1.0, 0.0, 1.0, 1.0, 0.0, 1.0] for t in ZEROSHOT_TASKS}
    same = paired_difference(ref, ref)
    assert same == {"zeroshot_avg_diff": 0.0, "zeroshot_avg_diff_stderr": 0.0}
    worse = {t: [0.0, 0.0, 1.0, 1.0, 0.0, 1.0] for t in ZEROSHOT_TASKS}  # one flip per task
    got = paired_difference(worse, ref)
    assert got["zeroshot_avg_diff"] == pytest.approx(-1 / 6)
    d = [-1.0, 0, 0, 0, 0, 0]  # per task: std(d, ddof=1) / sqrt(6), eight tasks combined
    se = math.sqrt(sum((x + 1 / 6) ** 2 for x in d) / 5 / 6)
    assert got["zeroshot_avg_diff_stderr"] == pytest.approx(math.sqrt(8 * se * se) / 8)
    def se_of(xs):  # one task's stderr of the mean
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))

    unpaired = math.sqrt(8 * (se_of(ref["boolq"]) ** 2 + se_of(worse["boolq"]) ** 2)) / 8  # sqrt(se_a² + se_b²)
    assert got["zeroshot_avg_diff_stderr"] < 0.6 * unpaired
    assert paired_difference({"boolq": [1.0, 0.0]}, {"boolq": [1.0, 1.0]}) == {}  # not all eight


def test_a_run_records_each_methods_average_minus_fp_from_the_same_items(tmp_path, data):
    from conftest import compose, tiny_overrides
    from qat_lightning.config import validate_config
    from qat_lightning.results import load_results
    from qat_lightning.stages import RunContext, run_stages

    cfg = validate_config(compose(["+exp=tiny_w4a8kv4", *tiny_overrides(tmp_path), "logger=none",
                                   "model.max_position_embeddings=256", "stages=[evaluate]",
                                   "evaluate.methods=[fp,rtn]", "evaluate.tasks=[zeroshot]",
                                   "evaluate.zeroshot_limit=4"]))
    run_stages(RunContext(cfg, tmp_path / "run"))
    res = load_results(tmp_path / "run")
    items = json.loads((tmp_path / "run" / "zeroshot_items.json").read_text())
    for method in ("fp", "rtn"):
        for t in ZEROSHOT_TASKS:
            assert len(items[method][t]) == 4
            assert sum(items[method][t]) / 4 == pytest.approx(res[f"evaluate/{method}/{t}_{PAPER_METRIC[t]}"])
    diff = res["evaluate/rtn/zeroshot_avg"] - res["evaluate/fp/zeroshot_avg"]
    assert res["evaluate/rtn/zeroshot_avg_minus_fp"] == pytest.approx(diff)
    assert "evaluate/rtn/zeroshot_avg_minus_fp_stderr" in res and "evaluate/fp/zeroshot_avg_minus_fp" not in res
