"""Run memo: reuse the results of an identical finished run instead of training it again (`memo=true`).

Why: the paper's ablations share a base run (hybrid data, logits loss, MinMax W4A8KV4): the data-source,
k, loss, quantizer and corpus-size sweeps each contain it. With `memo=true` it is trained once; the other
sweeps copy its `results.json` (and say where it came from in `memo.json`).

Two runs are identical when their resolved configs are equal, leaving out what does not change the
numbers: `logger` (W&B group/tags), `paths`, `name` and `memo` itself. The hash of the package's source is part
of the key, so a code change is a new key (nothing to delete by hand).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from qat_lightning.fingerprint import source_hash
from qat_lightning.results import RESULTS_FILE, write_json_atomic

IGNORED_KEYS = ("logger", "paths", "name", "memo", "hydra")


def memo_key(resolved_cfg: dict[str, Any]) -> str:
    """The identity of a run: a hash of its resolved config without the keys that do not change results."""
    kept = {k: v for k, v in resolved_cfg.items() if k not in IGNORED_KEYS}
    text = json.dumps([source_hash(), kept], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def memo_path(data_dir: str | Path, key: str) -> Path:
    return Path(data_dir).expanduser() / "memo" / f"{key}.json"


def lookup(data_dir: str | Path, key: str) -> dict[str, Any] | None:
    """The finished run stored under `key` ({"run_dir", "results"}), or None."""
    path = memo_path(data_dir, key)
    if not path.is_file():
        return None
    entry = json.loads(path.read_text())
    return entry if isinstance(entry.get("results"), dict) else None


def store(data_dir: str | Path, key: str, run_dir: str | Path, results: dict[str, float | None]) -> None:
    """Remember a finished run (failed runs are not stored: a rerun should try again)."""
    if results.get("run/job/failed"):
        return
    write_json_atomic(memo_path(data_dir, key), {"run_dir": str(run_dir), "results": results})


def replay(entry: dict[str, Any], run_dir: str | Path) -> Path:
    """Write the memoised results into this run's dir, with `memo.json` naming the run they came from."""
    run_dir = Path(run_dir)
    write_json_atomic(run_dir / "memo.json", {"copied_from": entry["run_dir"]})
    write_json_atomic(run_dir / RESULTS_FILE, entry["results"])
    return run_dir / RESULTS_FILE
