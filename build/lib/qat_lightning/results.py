"""`results.json`: one flat JSON object of `"<stage>/<method>/<metric>": number` per run.

Every stage, sweep table and W&B summary reads the same keys, so they are written in one place and
always atomically (temp file, then rename): a crashed run never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from qat_lightning.atomic import write_json_atomic

RESULTS_FILE = "results.json"


def _check_key(key: str) -> None:
    parts = key.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"results key {key!r} must look like '<stage>/<method>/<metric>'")


__all__ = ["RESULTS_FILE", "Results", "load_results", "write_json_atomic"]


class Results:
    """The run's `results.json`, merged and rewritten on every update."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / RESULTS_FILE
        self.values: dict[str, float] = {}
        if self.path.exists():
            self.values = json.loads(self.path.read_text())

    def update(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            _check_key(key)
            value = float(value)
            # JSON has no NaN/inf: a diverged metric is recorded as null, not dropped.
            self.values[key] = value if math.isfinite(value) else None
        write_json_atomic(self.path, self.values)

    def write(self) -> None:
        """Write the file as it is now (a run with nothing to record still leaves its results.json)."""
        write_json_atomic(self.path, self.values)

    def prefixed(self, stage: str, method: str, metrics: dict[str, float]) -> dict[str, float]:
        return {f"{stage}/{method}/{name}": v for name, v in metrics.items()}

    def add(self, stage: str, method: str, metrics: dict[str, float]) -> None:
        self.update(self.prefixed(stage, method, metrics))


def load_results(run_dir: str | os.PathLike) -> dict[str, float]:
    return json.loads((Path(run_dir) / RESULTS_FILE).read_text())
