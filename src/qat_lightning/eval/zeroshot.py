"""The LLM-QAT paper's zero-shot table: eight tasks, scored offline by lm-evaluation-harness's own tasks.

Why the harness's task definitions and not our own prompts: its prompts, answer choices and `acc`/`acc_norm`
are what published numbers use. Why local files: evaluation must run with no network. The files in
`$QAT_DATA_DIR` (see ../shared/data/README.md) are the original releases, whose field layout differs from
the hub copies the harness's YAMLs were written for; `load_docs` maps each release onto the hub copy's
fields (ARC's nested `question.stem` -> `question`, PIQA/SIQA/WinoGrande's separate label files -> `label`
/ `answer`, ...) and `build_tasks` hands those docs to the harness's configs (loaded from the installed
lm-eval package) through `custom_dataset`, so `datasets.load_dataset` never goes to the hub.

HellaSwag: the shared file keeps `activity_label: ctx` as one line, where the hub has `ctx_a` and `ctx_b`
(the harness capitalises `ctx_b`). ActivityNet contexts end with the fragment that is `ctx_b`; `hellaswag_doc`
splits it off after the last sentence end (WikiHow contexts end with a full sentence: `ctx_b` is empty).
Without a local file, the hub copy from `datasets` is used as it is (cache only when offline).

Metrics (`score_zeroshot`): `<task>_acc`, `<task>_acc_norm` where the harness reports it, their
`..._stderr`, `<task>_n` (items scored: the first `limit` in file order) and `<task>_n_total` (items in the
split), and with all eight tasks `zeroshot_avg` (+ `zeroshot_avg_stderr`) over `PAPER_METRIC`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from qat_lightning.eval.lm_eval_adapter import QATLM, _require, flatten_results
from qat_lightning.eval.sources import ENV_VAR, _not_found, _tried, resolve_path

log = logging.getLogger("qat_lightning")

ZEROSHOT_TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
SUITE = "zeroshot"  # evaluate.tasks entry that means all eight
HARNESS_NAME = {"siqa": "social_iqa"}  # our task name -> lm-eval's, where they differ
# where each task's YAML lives inside lm_eval/tasks (indexing only these folders takes ~0.1 s, all ~7 s)
HARNESS_DIR = {"boolq": "super_glue/boolq", "piqa": "piqa", "siqa": "siqa", "hellaswag": "hellaswag",
               "winogrande": "winogrande", "arc_easy": "arc", "arc_challenge": "arc", "openbookqa": "openbookqa"}
# the metric of each task in the paper's average. The paper's numbers come from Meta's internal LLaMA
# evaluation (facebookresearch/LLM-QAT README: "The results reported in the paper is run with the internal
# LLaMA codebase"), which scores completions by likelihood normalised by their number of characters
# (LLaMA paper, arXiv 2302.13971, sec. 3), i.e. the harness's `acc_norm`, except BoolQ and OpenBookQA
# (normalised by the likelihood given "Answer:", which the harness does not offer). So: acc_norm where the
# harness reports it (PIQA, HellaSwag, ARC-e, ARC-c, OBQA: for OBQA the nearest the harness has), acc where it
# reports acc only (BoolQ, SIQA, WinoGrande; WinoGrande's choices share one continuation, so a length
# normalisation would not change the pick).
PAPER_METRIC = {"boolq": "acc", "piqa": "acc_norm", "siqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc",
                "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
# the files of each release inside the data folder ($QAT_DATA_DIR or evaluate.zeroshot_data_dir)
FILES = {
    "boolq": ("boolq/dev.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "siqa": ("siqa/dev.jsonl", "siqa/dev-labels.lst"),
    "winogrande": ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),
    "arc_easy": ("arc_easy/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc_challenge/ARC-Challenge-Test.jsonl",),
    "openbookqa": ("openbookqa/test.jsonl",),
}  # hellaswag: eval.sources' "hellaswag" source (evaluate.hellaswag_path, $QAT_DATA_DIR, HF datasets)
SIZES = {"boolq": 3270, "piqa": 1838, "siqa": 1954, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
         "arc_challenge": 1172, "openbookqa": 500}  # items per split, as documented with the data
CONFIG_KEY = "evaluate.zeroshot_data_dir"
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?\s+")  # a sentence end inside a context
_ENDS_SENTENCE = re.compile(r"[.!?\"')\]]$")


def expand_tasks(tasks: Iterable[str]) -> list[str]:
    """The zero-shot tasks named in `tasks` ("zeroshot" = all eight), once each, in the paper's order."""
    wanted = set(tasks)
    return [t for t in ZEROSHOT_TASKS if t in wanted or SUITE in wanted]


# ---- the local releases -> the hub copies' fields ----------------------------------------------------------
def data_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The folder holding the releases: `path` if given, else `$QAT_DATA_DIR`, else None."""
    if path is not None:
        return Path(path).expanduser()
    root = os.environ.get(ENV_VAR)
    return Path(root).expanduser() if root else None


def task_files(task: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The release files of `task` (not hellaswag) in the data folder.

    Raises:
        FileNotFoundError: one line naming the task, the folder and the missing file.
    """
    if task not in FILES:
        raise ValueError(f"unknown zero-shot task {task!r}; expected one of {', '.join(FILES)}")
    folder = data_dir(root)
    if folder is None:
        raise FileNotFoundError(f"zero-shot task {task}: no data folder ({CONFIG_KEY} and ${ENV_VAR} unset): set "
                                f"one to a folder holding {', '.join(FILES[task])}")
    paths = [folder / name for name in FILES[task]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        where = f"{CONFIG_KEY}={str(root)!r}" if root is not None else f"${ENV_VAR}={folder}"
        raise FileNotFoundError(f"zero-shot task {task}: {missing[0]} not found (data folder {folder}, from "
                                f"{where}): point it at a folder holding {', '.join(FILES[task])}")
    return paths


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _labels(path: Path, rows: list[dict]) -> list[str]:
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != len(rows):
        raise ValueError(f"{path} has {len(labels)} labels for {len(rows)} items: the release is incomplete")
    return labels


def _arc_choices(question: dict) -> dict[str, list[str]]:
    return {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}


def hellaswag_doc(context: str, label: int, endings: Sequence[str], ind: int = 0) -> dict[str, Any]:
    """One line of the shared file (`activity_label: ctx`) in the hub's fields (activity_label, ctx_a, ctx_b).

    `ctx_b` is the fragment after the last sentence end when the context does not end a sentence (the
    ActivityNet items, e.g. "...on a roof. he"), else empty (WikiHow items end with a full sentence).
    """
    activity, _, ctx = context.partition(": ")
    ctx_a, ctx_b = ctx, ""
    if not _ENDS_SENTENCE.search(ctx):
        ends = list(_SENTENCE_END.finditer(ctx))
        if ends:
            ctx_a, ctx_b = ctx[: ends[-1].end()].rstrip(), ctx[ends[-1].end() :]
    return {"ind": ind, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
            "endings": list(endings), "label": str(label), "split": "val", "source_id": ""}


def _hellaswag_docs(path: str | os.PathLike | None) -> list[dict]:
    from qat_lightning.eval.hellaswag import load_hellaswag

    found = resolve_path("hellaswag", path)
    if found is not None:
        return [hellaswag_doc(it.context, it.label, it.endings, ind=i) for i, it in enumerate(load_hellaswag(found))]
    tried = _tried("hellaswag")
    try:  # the hub copy itself (needs `datasets` and a network or its cache)
        import datasets

        return [dict(row) for row in datasets.load_dataset("Rowan/hellaswag", split="validation")]
    except ImportError:
        tried.append("HF datasets (not installed: pip install 'qat-lightning[eval]')")
    except Exception as err:  # offline, hub error, missing cache: all mean "not available here"
        tried.append(f"HF datasets ({type(err).__name__})")
    raise _not_found("hellaswag", tried)


def load_docs(task: str, root: str | os.PathLike | None = None, limit: int | None = None,
              hellaswag_path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The first `limit` items of `task`'s split, in file order, with the fields of the harness's hub copy.

    Raises:
        FileNotFoundError: the task's files are not in the data folder (one line naming both).
        ValueError: a label file that does not match its items.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if task == "hellaswag":
        docs = _hellaswag_docs(hellaswag_path)
        return docs[:limit] if limit is not None else docs
    paths = task_files(task, root)
    rows = _jsonl(paths[0])
    if task == "boolq":  # aps/super_glue boolq: question, passage, idx, label (0 = False, 1 = True)
        docs = [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(bool(r["answer"]))}
                for i, r in enumerate(rows)]
    elif task == "piqa":  # baber/piqa: goal, sol1, sol2, label (0/1)
        docs = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)}
                for r, label in zip(rows, _labels(paths[1], rows))]
    elif task == "siqa":  # lighteval/siqa: context, question, answerA..C, label ("1".."3")
        docs = [{k: r[k] for k in ("context", "question", "answerA", "answerB", "answerC")} | {"label": label}
                for r, label in zip(rows, _labels(paths[1], rows))]
    elif task == "winogrande":  # allenai/winogrande winogrande_xl: sentence, option1, option2, answer ("1"/"2")
        labels = _labels(paths[1], rows)
        bad = [i for i, (r, label) in enumerate(zip(rows, labels)) if str(r["answer"]) != label]
        if bad:
            raise ValueError(f"{paths[1]} disagrees with the answers of {paths[0]} at item {bad[0]}")
        docs = [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"],
                 "answer": str(r["answer"])} for r in rows]
    elif task in ("arc_easy", "arc_challenge"):  # allenai/ai2_arc: id, question, choices{text,label}, answerKey
        docs = [{"id": r["id"], "question": r["question"]["stem"], "choices": _arc_choices(r["question"]),
                 "answerKey": r["answerKey"]} for r in rows]
    else:  # openbookqa main: id, question_stem, choices{text,label}, answerKey
        docs = [{"id": r["id"], "question_stem": r["question"]["stem"], "choices": _arc_choices(r["question"]),
                 "answerKey": r["answerKey"]} for r in rows]
    return docs[:limit] if limit is not None else docs


# ---- the harness's tasks over those docs ---------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's per-task notices ("custom kwargs", default aggregations) and datasets' map bars, silenced."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


@functools.lru_cache(maxsize=1)
def _task_manager() -> Any:
    """lm-eval's TaskManager over the installed package's folders of the eight tasks (all tasks if moved)."""
    _require()
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    folders = sorted({str(root / d) for d in HARNESS_DIR.values()})
    if all(Path(f).is_dir() for f in folders):
        manager = TaskManager(include_path=folders, include_defaults=False)
        if all(HARNESS_NAME.get(t, t) in manager.task_index for t in ZEROSHOT_TASKS):
            return manager
    return TaskManager()


def _load_yaml(path: str) -> dict[str, Any]:
    try:  # lm-eval >= 0.4.10
        from lm_eval.tasks._yaml_loader import load_yaml

        return load_yaml(path, resolve_func=True)
    except ImportError:  # older 0.4.x
        from lm_eval.utils import load_yaml_config

        return load_yaml_config(path, mode="full")


def harness_config(task: str, docs: list[dict[str, Any]]) -> dict[str, Any]:
    """lm-eval's own config of `task` (prompts, choices, metrics unchanged), reading `docs` instead of the hub.

    Only the data source changes: `custom_dataset` returns `docs` as the split the harness evaluates
    (test for ARC/OBQA, validation otherwise); the train split is dropped (0-shot needs no examples).
    """
    import datasets

    entry = _task_manager().task_index[HARNESS_NAME.get(task, task)]
    cfg = _load_yaml(str(entry.yaml_path))
    split = cfg.get("test_split") or cfg["validation_split"]
    for key in ("tag", "group"):
        cfg.pop(key, None)
    # no train split, and no few-shot pool (0-shot; else the harness would process the eval docs twice)
    cfg.update(training_split=None, validation_split=None, test_split=None, num_fewshot=0, dataset_kwargs=None,
               fewshot_config={"samples": []})
    cfg["test_split" if split == "test" else "validation_split"] = split
    dataset = datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})
    cfg["custom_dataset"] = lambda **_: dataset
    return cfg


def build_tasks(docs_by_task: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """{our task name: lm-eval Task} over the given docs (a `TaskManager.load` result, for `evaluate`)."""
    manager = _task_manager()
    with _quiet():
        loaded = manager.load([harness_config(task, docs) for task, docs in docs_by_task.items()])
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=0)
    return loaded


def task_limits(tasks: Sequence[str], zeroshot_limit: int | None, hellaswag_limit: int | None) -> dict[str, int | None]:
    """Items scored per task: `zeroshot_limit` when set; else hellaswag keeps `evaluate.hellaswag_limit`."""
    return {t: zeroshot_limit if zeroshot_limit is not None or t != "hellaswag" else hellaswag_limit for t in tasks}


def zeroshot_average(metrics: Mapping[str, float]) -> dict[str, float]:
    """`zeroshot_avg` (mean of `PAPER_METRIC` over the eight tasks) and its standard error, or {} if any is missing.

    The stderr treats the tasks as independent samples: sqrt(sum of squared stderrs) / 8.
    """
    keys = [f"{t}_{PAPER_METRIC[t]}" for t in ZEROSHOT_TASKS]
    if not all(k in metrics for k in keys):
        return {}
    out = {"zeroshot_avg": sum(metrics[k] for k in keys) / len(keys)}
    errs = [metrics.get(f"{k}_stderr") for k in keys]
    if all(e is not None for e in errs):
        out["zeroshot_avg_stderr"] = math.sqrt(sum(e * e for e in errs)) / len(keys)
    return out


def paired_difference(items: Mapping[str, Sequence[float]], ref: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """`zeroshot_avg` of `items` minus that of `ref`, scored on the same items, with its paired standard error.

    Why paired: two models answer the same questions, so most of the per-item noise cancels in the difference;
    the standard error of the difference of the two averages (sqrt(se_a² + se_b²)) ignores that and needs many
    more items to separate two close methods. Per task, se = std(per-item differences, ddof 1) / sqrt(n); the
    average's se combines the eight as `zeroshot_average` does. {} unless both have the eight tasks, same sizes.
    """
    if not all(t in items and t in ref and len(items[t]) == len(ref[t]) > 1 for t in ZEROSHOT_TASKS):
        return {}
    means, errs = [], []
    for t in ZEROSHOT_TASKS:
        d = [a - b for a, b in zip(items[t], ref[t])]
        mean = sum(d) / len(d)
        var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
        means.append(mean)
        errs.append(math.sqrt(var / len(d)))
    n = len(ZEROSHOT_TASKS)
    return {"zeroshot_avg_diff": sum(means) / n, "zeroshot_avg_diff_stderr": math.sqrt(sum(e * e for e in errs)) / n}


def score_zeroshot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] = ZEROSHOT_TASKS,
    limits: Mapping[str, int | None] | int | None = None,
    batch_size: int = 32,
    root: str | os.PathLike | None = None,
    hellaswag_path: str | os.PathLike | None = None,
    items: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Score `model` on zero-shot `tasks` (names of `ZEROSHOT_TASKS`) with the harness, in one evaluation.

    Args:
        limits: items per task (the first N in file order), one int for all, or None for the full splits.
        batch_size: rows (continuations) per forward.
        root: the data folder (None: `$QAT_DATA_DIR`); hellaswag_path: as `evaluate.hellaswag_path`.
        items: when given, filled with each task's per-item score in its paper metric (`PAPER_METRIC`: 1.0 or
            0.0 per item, in file order), for paired comparisons between methods (`paired_difference`).
    Returns:
        Plain floats: `<task>_acc[_norm][_stderr]`, `<task>_n`, `<task>_n_total`, and `zeroshot_avg[_stderr]`
        when all eight are scored.
    """
    tasks = expand_tasks(tasks)
    if not tasks:
        raise ValueError(f"no zero-shot task in {list(tasks)}; expected {SUITE} or some of {', '.join(ZEROSHOT_TASKS)}")
    per_task = limits if isinstance(limits, Mapping) else {t: limits for t in tasks}
    full = {t: load_docs(t, root, hellaswag_path=hellaswag_path) for t in tasks}
    docs = {t: full[t][: per_task.get(t)] if per_task.get(t) is not None else full[t] for t in tasks}
    from lm_eval.evaluator import evaluate

    lm = QATLM(model, tokenizer, batch_size=batch_size)
    task_dict = build_tasks(docs)
    with _quiet():
        out = evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=100000, log_samples=items is not None,
                       verbosity="ERROR")
    ours = {HARNESS_NAME.get(t, t): t for t in tasks}
    metrics = flatten_results({ours.get(name, name): values for name, values in out["results"].items()},
                              keep_stderr=True)
    if items is not None:
        for t in tasks:
            samples = sorted(out["samples"][HARNESS_NAME.get(t, t)], key=lambda r: r["doc_id"])
            items[t] = [float(r[PAPER_METRIC[t]]) for r in samples]
    for t in tasks:
        metrics[f"{t}_n"] = float(len(docs[t]))
        metrics[f"{t}_n_total"] = float(len(full[t]))
    metrics.update(zeroshot_average(metrics))
    if "zeroshot_avg" in metrics and len({len(docs[t]) / len(full[t]) < 1 for t in tasks}) > 1:
        log.warning("zeroshot_avg mixes full and partial splits: %s",
                    ", ".join(f"{t} {len(docs[t])}/{len(full[t])}" for t in tasks))
    return metrics


def check_zeroshot_data(tasks: Iterable[str], root: str | os.PathLike | None = None,
                        hellaswag_path: str | os.PathLike | None = None) -> None:
    """Raise FileNotFoundError (one line per missing task) unless every zero-shot task in `tasks` finds its files."""
    errors = []
    for task in expand_tasks(tasks):
        try:
            if task == "hellaswag":
                if resolve_path("hellaswag", hellaswag_path) is None:
                    _hellaswag_docs(hellaswag_path)  # the HF fallback, tried (and cached) now
            else:
                task_files(task, root)
        except FileNotFoundError as err:
            errors.append(str(err))
    if errors:
        raise FileNotFoundError("\n".join(errors))
