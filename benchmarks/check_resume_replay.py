"""Did a resumed run train on the batches an uninterrupted one would have? Read from its CSV logs alone.

Each logged step's `train/logits - train/kl` is the teacher's entropy term of that step's batch: it depends on the
batch only, not on the student. A run resumed at checkpoint step R writes a new `csv/version_*`; its step s must
match the earlier version's step s (where both logged it), and must not match step s - R (the epoch replayed from
its first batch, the defect fixed on 2026-12-06; docs/BENCHMARKS.md, "Runs resumed mid-epoch replayed the epoch").
A run stopped right after a checkpoint logs no step twice; `--ref` then compares it step by step with another run of
the same seed and corpus (its batches are the same whatever the student's start, e.g. `init=awq` against the teacher).

    python benchmarks/check_resume_replay.py outputs/<run dir> [--every 50] [--ref outputs/<same-seed run>]
"""

from __future__ import annotations

import argparse
import csv
import glob
import sys


def entropy_terms(path: str) -> dict[int, float]:
    out = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get("train/logits") and row.get("train/kl"):
                out[int(row["step"])] = float(row["train/logits"]) - float(row["train/kl"])
    return out


def logged_versions(run_dir: str) -> list[dict[int, float]]:
    versions = [entropy_terms(p) for p in sorted(glob.glob(f"{run_dir}/csv/version_*/metrics.csv"))]
    return [v for v in versions if v]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--every", type=int, default=50,
                    help="checkpoint interval in steps (callbacks.checkpoint_every_n_steps)")
    ap.add_argument("--ref", help="a run of the same seed and corpus: each resumed version must match it step by step")
    args = ap.parse_args()
    versions = logged_versions(args.run_dir)
    if len(versions) < 2:
        print(f"error: {args.run_dir} has fewer than two logged csv versions: nothing resumed", file=sys.stderr)
        return 2
    ref = None
    if args.ref:
        ref = {s: t for v in logged_versions(args.ref) for s, t in v.items()}
        if not ref:
            print(f"error: --ref {args.ref} has no logged csv versions", file=sys.stderr)
            return 2
        n_ref = sum(abs(ref[s] - versions[0][s]) < 1e-4 for s in versions[0] if s in ref)
        n_all = sum(s in ref for s in versions[0])
        print(f"version 0: same step as --ref {n_ref}/{n_all}")
        if not n_all or n_ref != n_all:
            print("error: --ref did not see the same batches as version 0: not the same seed and corpus",
                  file=sys.stderr)
            return 2
    seen, ok = dict(versions[0]), True
    for i, v in enumerate(versions[1:], 1):
        resumed_at = min(v) // args.every * args.every
        same = [s for s in v if s in seen]
        replay = [s for s in v if s - resumed_at in seen]
        n_same = sum(abs(seen[s] - v[s]) < 1e-4 for s in same)
        n_replay = sum(abs(seen[s - resumed_at] - v[s]) < 1e-4 for s in replay)
        exact = bool(same) and n_same == len(same)
        line = (f"version {i}: resumed at {resumed_at}; same step {n_same}/{len(same)}; "
                f"replay from batch 0 {n_replay}/{len(replay)}")
        if ref is not None:
            ref_same = [s for s in v if s in ref]
            n_ref = sum(abs(ref[s] - v[s]) < 1e-4 for s in ref_same)
            exact = (exact or not same) and bool(ref_same) and n_ref == len(ref_same)
            line += f"; same step as --ref {n_ref}/{len(ref_same)}"
        elif not same:
            line += " (no step logged twice: pass --ref, a run of the same seed and corpus, to confirm it)"
        ok &= exact
        print(f"{line}: {'exact' if exact else 'NOT exact'}")
        seen.update(v)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
