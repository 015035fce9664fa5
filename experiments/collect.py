"""Turn finished runs (single runs or multirun sweeps) into a markdown table and a PNG plot, no W&B needed.

    python experiments/collect.py multirun/smollm2_w4a8kv4/2026-11-23_10-00-00 [more dirs] \
        --metric evaluate/{method}/wikitext2_ppl --out experiments/out/table

Each run dir holds `results.json` and `.hydra/overrides.yaml`; rows are runs (labelled by their overrides),
columns are methods. Failed runs (no results.json, or null metrics) are listed, not dropped. Runs scored on
the zero-shot tasks (`evaluate.tasks=[zeroshot,...]`) also get the paper's table: per run and method the
eight tasks, their average and WikiText-2 beside it (`paper_markdown`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def find_runs(roots: list[Path]) -> list[Path]:
    runs: list[Path] = []
    for root in roots:
        if (root / ".hydra").exists() or (root / "results.json").exists():
            runs.append(root)
        runs += sorted({p.parent for p in root.glob("*/.hydra")} | {p.parent for p in root.glob("*/results.json")},
                       key=lambda p: (len(p.name), p.name))
    return list(dict.fromkeys(runs))


# columns: teacher, baselines, then the student
ORDER = ["fp", "rtn", "smoothquant", "gptq", "awq", "kvsmooth", "quarot", "quarot_gptq", "quarot_kvsmooth", "spinquant",
         "spinquant_gptq", "qat"]


def _overrides(run: Path) -> list[str]:
    path = run / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    items = [line.strip()[2:] for line in path.read_text().splitlines() if line.strip().startswith("- ")]
    return [i for i in items if not i.startswith(("hydra.", "paths.", "+exp=", "logger."))]


def run_labels(runs: list[Path]) -> dict[Path, str]:
    """Each run labelled by the overrides that differ between the runs (all of them for a single run)."""
    items = {run: _overrides(run) for run in runs}
    common = set.intersection(*(set(v) for v in items.values())) if len(runs) > 1 else set()
    return {run: " ".join(i for i in v if i not in common) or run.name for run, v in items.items()}


def run_label(run: Path) -> str:
    return run_labels([run])[run]


def collect(runs: list[Path], metric: str) -> tuple[list[str], dict[str, dict[str, float | None]], list[str]]:
    """Rows: run label → {method: value}. `metric` holds `{method}` where the method goes."""
    table: dict[str, dict[str, float | None]] = {}
    methods: list[str] = []
    failed: list[str] = []
    prefix, _, suffix = metric.partition("{method}")
    labels = run_labels(runs) if runs else {}
    for run in runs:
        label = labels[run]
        path = run / "results.json"
        if not path.exists():
            failed.append(f"{label} ({run}): no results.json (failed or unfinished)")
            continue
        results = json.loads(path.read_text())
        row: dict[str, float | None] = {}
        for key, value in results.items():
            if key.startswith(prefix) and key.endswith(suffix):
                method = key[len(prefix) : len(key) - len(suffix)]
                if "/" in method:
                    continue
                row[method] = value
                if method not in methods:
                    methods.append(method)
                if value is None:
                    failed.append(f"{label}: {key} is null (diverged)")
        table[label] = row
    methods.sort(key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
    return methods, table, failed


def recovery(row: dict[str, float | None]) -> float | None:
    """Share of RTN's loss that QAT wins back, `(rtn - qat) / (rtn - fp)` (#5's goal metric); None if undefined."""
    fp, rtn, qat = row.get("fp"), row.get("rtn"), row.get("qat")
    if fp is None or rtn is None or qat is None or rtn == fp:
        return None
    return (rtn - qat) / (rtn - fp)


def markdown(methods: list[str], table: dict[str, dict[str, float | None]], metric: str) -> str:
    with_rec = {"fp", "rtn", "qat"} <= set(methods)
    head = methods + (["QAT recovery of RTN's loss"] if with_rec else [])
    lines = [f"`{metric}`", "", "| run | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for label, row in table.items():
        cells = ["-" if row.get(m) is None else f"{row[m]:.4g}" for m in methods]
        if with_rec:
            rec = recovery(row)
            cells.append("-" if rec is None else f"{100 * rec:.1f} %")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# the paper's zero-shot columns: task, its metric in the average (eval/zeroshot.py PAPER_METRIC), header
PAPER_COLUMNS = [("boolq", "acc", "BoolQ"), ("piqa", "acc_norm", "PIQA"), ("siqa", "acc", "SIQA"),
                 ("hellaswag", "acc_norm", "HellaSwag"), ("winogrande", "acc", "WinoGrande"),
                 ("arc_easy", "acc_norm", "ARC-e"), ("arc_challenge", "acc_norm", "ARC-c"),
                 ("openbookqa", "acc_norm", "OBQA")]


def paper_rows(runs: list[Path]) -> list[tuple[str, str, dict[str, float | None]]]:
    """(run label, method, results of that method) for every method of every run with a `zeroshot_avg`."""
    labels = run_labels(runs) if runs else {}
    rows = []
    for run in runs:
        path = run / "results.json"
        if not path.exists():
            continue
        results = json.loads(path.read_text())
        methods = [k.split("/")[1] for k in results if k.startswith("evaluate/") and k.endswith("/zeroshot_avg")]
        methods.sort(key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
        for method in methods:
            prefix = f"evaluate/{method}/"
            rows.append((labels[run], method, {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}))
    return rows


def paper_markdown(rows: list[tuple[str, str, dict[str, float | None]]]) -> str:
    """The paper's layout: accuracy (%) on the eight tasks, their average ± its stderr, WikiText-2 beside it."""
    head = [h for _, _, h in PAPER_COLUMNS] + ["Avg.", "Avg. − fp (paired)", "Wiki2 ppl", "items/task"]
    lines = ["Zero-shot accuracy (%; acc_norm for PIQA, HellaSwag, ARC-e, ARC-c, OBQA, acc otherwise)", "",
             "| run | method | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    for label, method, m in rows:
        cells = [pct(m.get(f"{task}_{metric}")) for task, metric, _ in PAPER_COLUMNS]
        avg, se = m.get("zeroshot_avg"), m.get("zeroshot_avg_stderr")
        cells.append(pct(avg) + (f" ± {100 * se:.1f}" if avg is not None and se is not None else ""))
        diff, dse = m.get("zeroshot_avg_minus_fp"), m.get("zeroshot_avg_minus_fp_stderr")
        cells.append("-" if diff is None else f"{100 * diff:+.1f}" + (f" ± {100 * dse:.1f}" if dse is not None else ""))
        ppl = m.get("wikitext2_ppl")
        cells.append("-" if ppl is None else f"{ppl:.4g}")
        counts = {m.get(f"{task}_n") for task, _, _ in PAPER_COLUMNS} - {None}
        full = all(m.get(f"{task}_n") == m.get(f"{task}_n_total") for task, _, _ in PAPER_COLUMNS)
        cells.append("full" if full else "/".join(f"{c:.0f}" for c in sorted(counts)) or "-")
        lines.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(methods: list[str], table: dict[str, dict[str, float | None]], metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(table)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(methods)) / 2), 4))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs = [j + i * width for j in range(len(labels))]
        ys = [table[label].get(method) or 0.0 for label in labels]
        ax.bar(xs, ys, width=width, label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric.replace("{method}", "*"))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--metric", action="append", help="repeatable; default evaluate/{method}/wikitext2_ppl "
                    "and evaluate/{method}/kl; the plot shows the first")
    ap.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.png")
    args = ap.parse_args()
    for metric in args.metric or []:
        if "{method}" not in metric:
            raise SystemExit(f"error: --metric must contain {{method}}, e.g. evaluate/{{method}}/kl (got {metric!r})")
    runs = find_runs(args.dirs)
    if not runs:
        raise SystemExit(f"error: no runs found under {', '.join(map(str, args.dirs))}")
    zeroshot = paper_rows(runs)
    # by default WikiText-2, then the zero-shot average when any run has it, then KL
    metrics = args.metric or ["evaluate/{method}/wikitext2_ppl",
                              *(["evaluate/{method}/zeroshot_avg"] if zeroshot else []), "evaluate/{method}/kl"]
    tables = [(metric, *collect(runs, metric)) for metric in metrics]
    text = "\n\n".join(markdown(methods, table, metric) for metric, methods, table, _ in tables)
    if zeroshot:
        text += "\n\n" + paper_markdown(zeroshot)
    failed = list(dict.fromkeys(f for *_, fails in tables for f in fails))
    if failed:
        text += "\n\nFailed or diverged runs:\n" + "\n".join(f"- {f}" for f in failed)
    print(text)
    if args.out:
        metric, methods, table, _ = tables[0]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text + "\n")
        plot(methods, table, metric, args.out.with_suffix(".png"))
        print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
