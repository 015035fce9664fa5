"""Size × perplexity × decode speed of SmolLM2's GGUF files in llama.cpp: one picture of bench_llamacpp's tables.

Reads the JSON rows that `bench_llamacpp.py --json` writes (one quality file, one or more speed files) and
plots, per (file, KV cache type), bytes held in memory at `--context` (weights + KV cache) against
WikiText-2 perplexity from llama.cpp's logits, coloured by decode tokens/s at batch 1. A trained student's
file has the tensor types and shapes of our RTN Q4_0 file, so it takes that file's measured speed unless
its own speed rows are given (file "student").

    python benchmarks/bench_llamacpp.py --quality --student run/export/model.gguf --json /tmp/q.json
    python benchmarks/bench_llamacpp.py --contexts 512 --json /tmp/s.json
    python benchmarks/plot_tradeoff.py --quality /tmp/q.json --speed /tmp/s.json --out docs/img/llamacpp_tradeoff.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LABELS = {"f16": "F16 teacher", "q8_0": "llama.cpp Q8_0", "q4_0": "llama.cpp Q4_0 (PTQ)",
          "rtn_q4_0": "ours RTN Q4_0", "student": "ours QAT Q4_0"}
SPEED_ROW = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "rtn_q4_0": "Q4_0 ours", "student": "Q4_0 ours"}


def points(quality: list[dict], speed: list[dict], context: int) -> list[dict]:
    """One point per quality row: file and KV MB at `context`, ppl, decode tok/s (None: not timed)."""
    from qat_lightning.export.llamacpp import kv_cache_bytes

    timed = {(r["file"], r["context"]): r for r in speed}
    sizes = {r["file"]: r["size_mb"] for r in speed}
    out = []
    for q in quality:
        base = SPEED_ROW[q["file"]]
        name = base if q["kv"] == "f16" else f"{base} + {q['kv']} KV"
        own = timed.get((name.replace("Q4_0 ours", "student"), context)) if q["file"] == "student" else None
        row = own or timed.get((name, context))
        out.append({"file": q["file"], "kv": q["kv"], "ppl": q["ppl"], "size_mb": q.get("size_mb", sizes.get(base)),
                    "kv_mb": kv_cache_bytes(context, 30, 3, 64, q["kv"]) / 1e6,  # SmolLM2: 30 layers, 3 KV heads
                    "decode_tok_s": row["decode_tok_s"] if row else None})
    return out


def plot(pts: list[dict], out: Path, context: int) -> None:
    """Left: memory against perplexity; right: decode speed against perplexity. Colour = file, marker = KV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = dict(zip(LABELS, ["black", "tab:grey", "tab:red", "tab:orange", "tab:blue"]))
    markers = {"f16": "o", "q8_0": "s", "q4_0": "^"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for p in pts:
        kw = {"marker": markers[p["kv"]], "color": colours[p["file"]], "s": 60, "edgecolors": "black",
              "linewidths": 0.5}
        if p["size_mb"] is not None:
            left.scatter(p["size_mb"] + p["kv_mb"], p["ppl"], **kw)
        if p["decode_tok_s"]:
            right.scatter(p["decode_tok_s"], p["ppl"], **kw)
    left.set_xlabel(f"MB in memory: weights + KV cache at {context} tokens")
    right.set_xlabel(f"decode tokens/s (batch 1, context {context}, 2 threads)")
    left.set_ylabel("WikiText-2 perplexity (llama.cpp's logits, 512 × 16)")
    handles = [Line2D([], [], marker="o", ls="", color=colours[f], label=LABELS[f])
               for f in LABELS if any(p["file"] == f for p in pts)]
    handles += [Line2D([], [], marker=m, ls="", color="white", markeredgecolor="black", label=f"KV {k}")
                for k, m in markers.items()]
    right.legend(handles=handles, fontsize=8, loc="center")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M-Instruct in llama.cpp (llama-cpp-python 0.3.36)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quality", required=True, help="bench_llamacpp.py --quality --json output")
    p.add_argument("--speed", nargs="+", required=True, help="bench_llamacpp.py (speed) --json outputs")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--out", default="docs/img/llamacpp_tradeoff.png")
    args = p.parse_args(argv)
    quality = json.loads(Path(args.quality).read_text())
    speed = [r for f in args.speed for r in json.loads(Path(f).read_text())]
    pts = points(quality, speed, args.context)
    for q in pts:
        print(json.dumps(q))
    plot(pts, Path(args.out), args.context)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
