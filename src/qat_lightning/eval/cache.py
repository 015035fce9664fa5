"""Cached scores of the methods that involve no training (fp, rtn, smoothquant, gptq, awq): `evaluate.cache`.

Why: every job of an ablation sweep scores the same teacher and the same RTN student on the same text; on
two CPU cores that is over a minute per job, repeated. A score is keyed by everything it depends on: the
method, the model and quant configs, the calibration batches (by content), and per task its settings and
data (the text file's path, size and mtime; the held-out KL batches by content), and the hash of the
package's source code, so any code change invalidates every entry (no folder to delete by hand).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qat_lightning.eval.config import ZEROSHOT_TASKS, EvalConfig
from qat_lightning.eval.sources import resolve_path
from qat_lightning.fingerprint import digest, source_hash
from qat_lightning.results import write_json_atomic

# methods whose scores depend only on configs and data (QAT students and exports are never cached)
CACHEABLE_METHODS = ("fp", "rtn", "smoothquant", "gptq", "awq", "kvsmooth")


def batches_digest(batches: Sequence[dict[str, torch.Tensor]] | None) -> str | None:
    """A content hash of token batches (calibration or held-out data)."""
    if not batches:
        return None
    h = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            value = batch[name]
            if isinstance(value, torch.Tensor):
                h.update(name.encode())
                h.update(str(tuple(value.shape)).encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def file_identity(path: str | Path | None) -> list | None:
    """(resolved path, size, mtime) of a data file: cheap, and changes when the file does."""
    if path is None:
        return None
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        return [str(p)]
    st = p.stat()
    return [str(p), st.st_size, int(st.st_mtime)]


def task_parts(ev: EvalConfig, task: str, heldout: Sequence[dict] | None) -> dict[str, Any]:
    """What one task's score depends on besides the model."""
    if task == "kl":
        return {"task": task, "kl_batches": ev.kl_batches, "heldout": batches_digest(heldout)}
    if task in ZEROSHOT_TASKS or task == "zeroshot":
        return zeroshot_parts(ev, task)
    path = ev.text_path if task == "text" else resolve_path(task, getattr(ev, f"{task}_path"))
    return {"task": task, "seq_len": ev.seq_len, "max_windows": ev.max_windows, "batch_size": ev.batch_size,
            "file": file_identity(path) or "hf-datasets"}


def zeroshot_parts(ev: EvalConfig, task: str) -> dict[str, Any]:
    """A zero-shot task's (or the suite's) score: its tasks, item limits, release files and lm-eval's version."""
    from importlib.metadata import PackageNotFoundError, version

    from qat_lightning.eval.zeroshot import FILES, data_dir, expand_tasks, task_limits

    tasks = expand_tasks([task])
    root = data_dir(ev.zeroshot_data_dir)
    files = {t: file_identity(resolve_path("hellaswag", ev.hellaswag_path)) if t == "hellaswag"
             else [file_identity(root / name if root else None) for name in FILES[t]] for t in tasks}
    try:
        harness = version("lm_eval")
    except PackageNotFoundError:
        harness = None
    return {"task": task, "limits": task_limits(tasks, ev.zeroshot_limit, ev.hellaswag_limit),
            "batch_size": ev.zeroshot_batch_size, "files": files, "lm_eval": harness}


def cache_key(parts: dict[str, Any]) -> str:
    return digest([source_hash(), parts], length=24)


class EvalCache:
    """One JSON file per (method, task) score under `root`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, parts: dict[str, Any]) -> dict[str, float] | None:
        path = self._path(cache_key(parts))
        if not path.is_file():
            return None
        entry = json.loads(path.read_text())
        return entry.get("metrics")

    def put(self, parts: dict[str, Any], metrics: dict[str, float]) -> None:
        write_json_atomic(self._path(cache_key(parts)), {"parts": parts, "metrics": metrics})
