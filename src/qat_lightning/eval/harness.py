"""The evaluation harness: `evaluate_model` scores one model on `cfg.tasks`, every method the same way.

`corpus_ids` tokenizes each corpus once per (tokenizer, text) and process, so scoring several methods
shares it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat_lightning.coerce import as_config
from qat_lightning.eval.agreement import kl_and_agreement
from qat_lightning.eval.config import EvalConfig
from qat_lightning.eval.lm_eval_adapter import run_lm_eval
from qat_lightning.eval.ppl import perplexity, tokenize_text
from qat_lightning.eval.sources import load_text
from qat_lightning.eval.zeroshot import ZEROSHOT_TASKS, expand_tasks, score_zeroshot, task_limits

log = logging.getLogger("qat_lightning")

# tokenized corpora, so scoring several methods with one tokenizer tokenizes each corpus once per process
_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}


def _as_eval_config(cfg: Any) -> EvalConfig:
    return as_config(EvalConfig, cfg, "evaluate")


def _tokenizer_key(tokenizer: Any) -> tuple:
    return (type(tokenizer).__qualname__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))


def corpus_ids(tokenizer: Any, task: str, path: str | os.PathLike | None = None) -> torch.Tensor:
    """The token ids of corpus `task` (wikitext2 | c4 | text), tokenized once per (tokenizer, text)."""
    if task == "text":
        if path is None or not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"evaluate.text_path={str(path)!r} does not exist: point it at a text file")
        text = Path(path).expanduser().read_text(encoding="utf-8")
    else:
        text = load_text(task, path)
    key = (_tokenizer_key(tokenizer), hashlib.sha1(text.encode("utf-8")).hexdigest())
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = tokenize_text(tokenizer, text)
    return _TOKEN_CACHE[key]


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    cfg: EvalConfig | Mapping | Any,
    teacher: nn.Module | None = None,
    heldout_batches: Sequence[dict] | None = None,
    zeroshot_items: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Run `cfg.tasks` (and `cfg.lm_eval_tasks`) on `model`; returns plain floats keyed by metric name.

    Metrics: `wikitext2_ppl`, `c4_ppl`, `text_ppl`, `kl`, `top1_agreement`; for the zero-shot tasks
    (`zeroshot` = all eight, or each by name, hellaswag included: lm-eval's task definitions over the local
    files, see `eval.zeroshot`) `<task>_acc`, `<task>_acc_norm` (where the harness reports it), their
    `_stderr`, `<task>_n`, `<task>_n_total` and, with all eight, `zeroshot_avg`; and `<task>_<metric>` from
    `lm_eval_tasks`. `kl` needs `teacher` and `heldout_batches`; without them it is skipped with a warning.
    `zeroshot_items`, when given, receives each zero-shot task's per-item scores (`score_zeroshot`'s `items`).
    """
    cfg = _as_eval_config(cfg)
    paths = {"wikitext2": cfg.wikitext2_path, "c4": cfg.c4_path, "text": cfg.text_path}
    metrics: dict[str, float] = {}
    zeroshot = expand_tasks(cfg.tasks)
    for task in cfg.tasks:
        if task in paths:
            ids = corpus_ids(tokenizer, task, paths[task])
            result = perplexity(model, ids, cfg.seq_len, batch_size=cfg.batch_size, max_windows=cfg.max_windows)
            metrics[f"{task}_ppl"] = float(result["ppl"])
        elif zeroshot and (task in ZEROSHOT_TASKS or task == "zeroshot"):
            # all zero-shot tasks in one harness evaluation, where the first of them is listed
            metrics.update(score_zeroshot(
                model, tokenizer, zeroshot, limits=task_limits(zeroshot, cfg.zeroshot_limit, cfg.hellaswag_limit),
                batch_size=cfg.zeroshot_batch_size, root=cfg.zeroshot_data_dir, hellaswag_path=cfg.hellaswag_path,
                items=zeroshot_items,
            ))
            zeroshot = []
        elif task == "kl":
            if teacher is None or not heldout_batches:
                log.warning("evaluate task 'kl' skipped: it needs a teacher and held-out batches")
                continue
            result = kl_and_agreement(teacher, model, list(heldout_batches)[: cfg.kl_batches])
            metrics["kl"] = float(result["kl"])
            metrics["top1_agreement"] = float(result["top1_agreement"])
    if cfg.lm_eval_tasks:
        metrics.update(
            run_lm_eval(
                model, tokenizer, cfg.lm_eval_tasks, limit=cfg.lm_eval_limit, batch_size=cfg.batch_size,
                include_path=cfg.lm_eval_include_path,
            )
        )
    return metrics
