"""benchmarks/check_resume_replay.py: a resumed run passes only when its batches continue where the first version
stopped, shown by steps logged twice or, after a clean stop at a checkpoint, by a run of the same seed (`--ref`)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def _write_run(root, name: str, versions: list[dict[int, float]]):
    """A run dir whose csv/version_i/metrics.csv logs `train/logits - train/kl` = the given entropy per step."""
    run = root / name
    for i, steps in enumerate(versions):
        d = run / "csv" / f"version_{i}"
        d.mkdir(parents=True)
        lines = ["epoch,step,train/kl,train/logits"]
        lines += [f"0,{s},0.5,{0.5 + h}" for s, h in sorted(steps.items())]
        (d / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run


def _check(*args):
    return subprocess.run([sys.executable, "benchmarks/check_resume_replay.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def _batches(steps):  # a distinct entropy per batch index
    return {s: 1.0 + 0.01 * s for s in steps}


def test_overlap_exact_and_replay_caught(tmp_path):
    good = _write_run(tmp_path, "good", [_batches(range(0, 120, 5)), _batches(range(100, 200, 5))])
    proc = _check(good)
    assert proc.returncode == 0 and "exact" in proc.stdout and "NOT" not in proc.stdout, proc.stdout
    # resumed at 100 but fed batches from 0 again: steps 100..115 disagree with the first version
    replayed = {s: 1.0 + 0.01 * (s - 100) for s in range(100, 200, 5)}
    bad = _write_run(tmp_path, "bad", [_batches(range(0, 120, 5)), replayed])
    proc = _check(bad)
    assert proc.returncode == 1 and "NOT exact" in proc.stdout and "replay from batch 0 20/20" in proc.stdout


def test_clean_stop_needs_ref_of_the_same_seed(tmp_path):
    run = _write_run(tmp_path, "run", [_batches(range(0, 100, 5)), _batches(range(100, 200, 5))])
    proc = _check(run)  # nothing logged twice: cannot be confirmed from the run alone
    assert proc.returncode == 1 and "pass --ref" in proc.stdout
    same_seed = _write_run(tmp_path, "same_seed", [_batches(range(0, 300, 5))])
    proc = _check(run, "--ref", same_seed)
    assert proc.returncode == 0 and "same step as --ref 20/20: exact" in proc.stdout, proc.stdout
    other_seed = _write_run(tmp_path, "other_seed", [{s: 2.0 + 0.01 * s for s in range(0, 300, 5)}])
    proc = _check(run, "--ref", other_seed)
    assert proc.returncode == 2 and "not the same seed" in proc.stderr
    # version 1 fed batches 50 steps ahead: the reference catches it with no step logged twice inside the run
    ahead = {s: 1.0 + 0.01 * (s + 50) for s in range(100, 200, 5)}
    skipped = _write_run(tmp_path, "skipped", [_batches(range(0, 100, 5)), ahead])
    proc = _check(skipped, "--ref", same_seed)
    assert proc.returncode == 1 and "same step as --ref 0/20: NOT exact" in proc.stdout, proc.stdout
