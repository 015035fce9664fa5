"""benchmarks/compare_windows.py: the ratio it prints is the token-level perplexity ratio over the windows asked."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import REPO


def _run(tmp_path, rows, *args):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    return subprocess.run([sys.executable, "benchmarks/compare_windows.py", str(path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def _ratio(stdout: str, name: str) -> tuple[float, str]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith(f"| {name} |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    return float(cells[4]), cells[5]


def test_ratio_is_the_perplexity_ratio_over_the_chosen_windows(tmp_path):
    ref = [3.0, 3.5, 4.0, 3.2, 3.8, 3.1]
    # b is 5 % worse in perplexity on windows 2..5 and 20 % better on windows 0..1
    b = [x + math.log(0.8) for x in ref[:2]] + [x + math.log(1.05) for x in ref[2:]]
    rows = [{"file": "a", "kv": "q8_0", "window_nll": ref}, {"file": "b", "kv": "q8_0", "window_nll": b}]
    proc = _run(tmp_path, rows, "--ref", "a", "--windows", "2", "6")
    assert proc.returncode == 0, proc.stderr
    ratio, interval = _ratio(proc.stdout, "b")
    assert ratio == 1.05 and interval == "1.0500–1.0500"  # the same shift on every window: no spread
    proc = _run(tmp_path, rows, "--ref", "a")
    ratio, _ = _ratio(proc.stdout, "b")
    expected = math.exp(sum(y - x for x, y in zip(ref, b)) / len(ref))  # = ppl(b) / ppl(a), equal-length windows
    assert abs(ratio - expected) < 1e-4 and ratio < 1.0


def test_rows_without_window_nll_or_too_few_windows_are_refused(tmp_path):
    rows = [{"file": "a", "kv": "q8_0", "window_nll": [3.0, 3.1]}, {"file": "b", "kv": "q8_0", "ppl": 20.0}]
    proc = _run(tmp_path, rows, "--ref", "a")
    assert proc.returncode == 2 and "without per-window NLL" in proc.stderr
    proc = _run(tmp_path, rows, "--ref", "a", "--windows", "0", "2")  # the missing NLL is named, not the range
    assert proc.returncode == 2 and "without per-window NLL" in proc.stderr
    proc = _run(tmp_path, rows[:1], "--ref", "a", "--windows", "0", "5")
    assert proc.returncode == 2 and "not a range" in proc.stderr
    proc = _run(tmp_path, rows[:1], "--ref", "zzz")
    assert proc.returncode == 2 and "no row named" in proc.stderr
