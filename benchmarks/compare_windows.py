"""Pair files scored on the same WikiText-2 windows: is a perplexity difference larger than the windows' noise?

Two students of one recipe (two data orders) differed by up to 0.8 ppl on the 16 windows every row of
docs/BENCHMARKS.md uses. Whether that is a difference between the students or between the windows they happen
to be scored on is a question of the spread over windows: this takes the JSON rows of `bench_llamacpp.py
--quality` (which keep each window's mean NLL), and for each row against a reference row of the same KV type
prints the perplexity ratio exp(mean over windows of the NLL difference) with a 95 % interval from the
windows' standard error (normal approximation, ±1.96 se: with 16 windows a t interval would be ~9 % wider).
Every window holds the same number of tokens, so the mean of window means is the token mean that perplexity
uses.

    python benchmarks/compare_windows.py rows.json [more.json ...] --ref student:q40_minlr0_amd
    python benchmarks/compare_windows.py rows.json --ref q4_0 --windows 16 64   # only windows 16..63

`--windows 16 64` leaves out the first 16 windows, the ones every table here reports: a file picked for its
score there is judged again on windows that played no part in picking it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error over windows of the per-window NLL difference a - b."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need the same windows (>= 2) for both rows, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+", help="JSON files written by bench_llamacpp.py --quality --json")
    p.add_argument("--ref", required=True, help="the `file` name of the reference row (e.g. q4_0, student:<run>)")
    p.add_argument("--windows", type=int, nargs=2, default=None, metavar=("START", "END"),
                   help="only windows START..END-1 (default: all the rows hold)")
    args = p.parse_args(argv)
    rows = [r for path in args.rows for r in json.load(open(path))]
    missing = [r["file"] for r in rows if "window_nll" not in r]
    if missing:
        print(f"compare_windows: rows without per-window NLL (scored before 2026-12-06?): {sorted(set(missing))}",
              file=sys.stderr)
        return 2
    if args.windows:
        start, end = args.windows
        short = sorted({r["file"] for r in rows if len(r["window_nll"]) < end})
        if start < 0 or end <= start + 1 or short:
            print(f"compare_windows: --windows {start} {end} is not a range of >= 2 windows every row holds"
                  f"{' (short rows: ' + ', '.join(short) + ')' if short else ''}", file=sys.stderr)
            return 2
        rows = [{**r, "window_nll": r["window_nll"][start:end]} for r in rows]
    refs = {r["kv"]: r for r in rows if r["file"] == args.ref}
    if not refs:
        print(f"compare_windows: no row named {args.ref!r}; rows: {sorted({r['file'] for r in rows})}", file=sys.stderr)
        return 2
    print(f"| file | KV | windows | ppl | ppl / {args.ref} | 95 % interval |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ref = refs.get(r["kv"])
        if ref is None:
            continue
        n = len(r["window_nll"])
        ppl = math.exp(statistics.fmean(r["window_nll"]))
        if r is ref:
            print(f"| {r['file']} | {r['kv']} | {n} | {ppl:.2f} | 1 | - |")
            continue
        try:
            mean, se = paired(r["window_nll"], ref["window_nll"])
        except ValueError as e:
            print(f"compare_windows: {r['file']} against {args.ref} ({r['kv']}): {e}; pass --windows", file=sys.stderr)
            return 2
        lo, hi = math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)
        print(f"| {r['file']} | {r['kv']} | {n} | {ppl:.2f} | {math.exp(mean):.4f} | {lo:.4f}–{hi:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
