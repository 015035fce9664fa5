"""Export trade-offs on SmolLM2-135M: size, bits, KV-cache bytes, WikiText-2 perplexity and decode speed.

For each setting the *untrained* round-to-nearest student from `quantize_model` (no QAT: the worst case
a trained student improves on) is exported with the defaults (fp16 scales, fp16 FP params), reloaded with
`load_exported`, and decoded greedily with `QuantizedKVCache`, once with `weights="packed"` (codes
dequantized in every forward) and once with `weights="dequantized"` (dequantized once at load).
Perplexity (GPTQ convention, `qat_lightning.eval.ppl`) is measured on the first --ppl-windows
windows of --ppl-seq-len tokens of WikiText-2 test ($QAT_DATA_DIR/wikitext2/wiki.test.raw), with the
dequantized weights (same logits as packed; checked on the first window). Baselines: the same model
all-fp16 for sizes, its fp32 perplexity, an fp16 KV cache for KV bytes, the FP32 model with HF's
DynamicCache for tokens/s. The FP model and each setting's weight modes are timed interleaved, round by
round (--repeats rounds, medians), and speeds are reported as paired ratios to the FP model, so load from
other processes hits all contenders alike.

    python benchmarks/bench_export.py                       # SmolLM2, writes docs/export_tradeoff.png
    python benchmarks/bench_export.py --model tiny --new-tokens 8 --out /tmp/tradeoff.png
    python benchmarks/bench_export.py --replot saved.json   # redraw the plot from a --json file
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import load_bench_model
from torch import nn

from qat_lightning.atomic import write_json_atomic
from qat_lightning.eval.ppl import perplexity, tokenize_text
from qat_lightning.eval.sources import load_text
from qat_lightning.export import (
    QuantizedKVCache,
    export_student,
    kv_cache_bytes,
    load_exported,
    theoretical_kv_bytes,
)
from qat_lightning.models import ByteTokenizer, load_model
from qat_lightning.quant import QuantConfig, quantize_model

EMB = r"embed_tokens|lm_head"
SETTINGS = {  # name: (QuantConfig fields, decode speed measured?)
    "W4A8KV4": (dict(w_bits=4, a_bits=8, kv_bits=4), True),
    "W8A8KV8": (dict(w_bits=8, a_bits=8, kv_bits=8), True),
    "W4A8KV4 +emb8": (
        dict(quantize_embeddings=True, quantize_lm_head=True, overrides=[{"pattern": EMB, "w_bits": 8}]),
        False,
    ),
    "W4A8KV4 +emb4": (dict(quantize_embeddings=True, quantize_lm_head=True), True),
}


def load_with_tokenizer(name: str) -> tuple[nn.Module, object]:
    """The fp32 bench model and its tokenizer: SmolLM2's own, or bytes for the tiny random model.

    SmolLM2 comes straight from `load_model` (fp32 already) rather than `common.load_bench_model`, whose
    `.float()` transformers refuses when the converted config still carries the GGUF quantization_config.
    """
    if name == "tiny":
        return load_bench_model("tiny"), ByteTokenizer()
    model, tokenizer = load_model({"source": "smollm2", "dtype": "float32"})
    return model.eval(), tokenizer


def wikitext2_ids(tokenizer) -> torch.Tensor | None:
    """WikiText-2 test tokenized once as a whole, or None (with a note) when the file is not available."""
    try:
        return tokenize_text(tokenizer, load_text("wikitext2"))
    except FileNotFoundError as err:
        print(f"perplexity skipped: {err}")
        return None


def _generate(model: nn.Module, ids: torch.Tensor, new_tokens: int, quantized_cache: bool) -> float:
    """Seconds for one greedy `generate` of exactly `new_tokens` tokens (prefill included)."""
    kw = {"cache": QuantizedKVCache(model)} if quantized_cache else {}
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **kw)
    return time.perf_counter() - t


def decode_side_by_side(
    contenders: dict[str, tuple[nn.Module, bool]], batch: int, new_tokens: int, repeats: int, vocab: int
) -> dict[str, dict[str, float]]:
    """Greedy decode speed of each contender (model, uses QuantizedKVCache), interleaved round by round.

    After a short untimed warm-up of each, every round times each contender once on the same 8-token
    prompt, so load from other processes hits all of them alike. Returns, per contender, "tps" (median
    tok/s over rounds) and "vs_ref": the median over rounds of t(first contender) / t(this one).
    """
    ids = torch.randint(0, vocab, (batch, 8), generator=torch.Generator().manual_seed(0))
    for model, qc in contenders.values():
        _generate(model, ids, 2, qc)  # warm-up: allocators, kernels
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, (model, qc) in contenders.items():
            times[name].append(_generate(model, ids, new_tokens, qc))
    ref = times[next(iter(contenders))]
    return {
        name: {
            "tps": batch * new_tokens / statistics.median(ts),
            "vs_ref": statistics.median(r / t for r, t in zip(ref, ts)),
        }
        for name, ts in times.items()
    }


def measured_kv_ratio(model: nn.Module, context: int, vocab: int) -> float:
    """Bytes of a filled `QuantizedKVCache` after one `context`-token prefill / fp16 K+V bytes."""
    cache = QuantizedKVCache(model)
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    fp16 = cfg.num_hidden_layers * context * 2 * cfg.num_key_value_heads * head_dim * 2
    return kv_cache_bytes(cache) / fp16


def plot(rows: list[dict], fp_row: dict, budget: str, out: Path) -> None:
    """Left: size vs perplexity (colour = weight bits, marker area = decode tok/s); right: tok/s per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1.1, 1]})
    has_ppl = fp_row.get("ppl") is not None
    colours = {16: "black", 8: "C1", 4: "C0"}
    tps_max = max(r.get("tps_deq_b1") or 0 for r in [fp_row, *rows]) or 1.0
    for r in [fp_row, *rows]:
        y = r["ppl"] if has_ppl else r["w_bits"]
        tps = r.get("tps_deq_b1")
        area = 40 + 460 * (tps or 0) / tps_max
        ax1.scatter(
            r["size_mb"],
            y,
            s=area,
            c=colours.get(r["w_bits"], "C2"),
            alpha=0.75,
            marker="o" if tps else "x",
            edgecolors="k" if tps else None,
        )
        label = f"{r['setting']}\n{r['w_bits']}-bit W"
        if tps:
            label += f", {tps:.1f} tok/s" + (f" (packed {r['tps_packed_b1']:.1f})" if r.get("tps_packed_b1") else "")
        below = not tps  # untimed points label below-left, away from their timed neighbours
        ax1.annotate(
            label,
            (r["size_mb"], y),
            textcoords="offset points",
            xytext=(-8, -22) if below else (8, 4),
            ha="right" if below else "left",
            fontsize=7,
        )
    for bits, c in colours.items():
        ax1.scatter([], [], c=c, s=60, label=f"{bits}-bit weights" + (" (FP reference)" if bits == 16 else ""))
    ax1.scatter([], [], c="grey", marker="x", label="decode not timed")
    ax1.legend(fontsize=7, loc="best", title="marker area = batch-1 tok/s (dequantized)", title_fontsize=7)
    ax1.axvline(fp_row["size_mb"] * 0.30, ls="--", c="grey", lw=1)
    ax1.text(
        fp_row["size_mb"] * 0.30, 0.02, " 0.30 x fp16", fontsize=7, color="grey", transform=ax1.get_xaxis_transform()
    )
    ax1.set_xlabel("export size (MB, model.safetensors; FP row: fp16 checkpoint)")
    if has_ppl:
        ppls = [r["ppl"] for r in [fp_row, *rows]]
        if max(ppls) / min(ppls) > 3:  # a log axis only when the range is wide enough to have ticks
            ax1.set_yscale("log")
            ax1.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
            ax1.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax1.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax1.set_ylabel(f"WikiText-2 perplexity{' (log)' if ax1.get_yscale() == 'log' else ''}")
        ax1.margins(y=0.12)
    else:
        ax1.set_ylabel("weight bits (no WikiText-2 data: perplexity skipped)")
    ax1.set_xlim(0, fp_row["size_mb"] * 1.35)
    ax1.set_title(f"size x bits x perplexity x tok/s, untrained RTN students\n(WikiText-2 {budget})", fontsize=9)

    timed = [r for r in rows if r.get("tps_packed_b1")]
    modes = [("packed", "packed (dequant per forward)"), ("deq", "dequantized once at load"), ("int8", "int8 kernel")]
    width = 0.8 / len(modes)
    for batch, hatch, x0 in ((1, None, 0), (8, "//", len(timed) + 1)):
        for j, (key, label) in enumerate(modes):
            pts = [(x0 + i + (j - 1) * width, r) for i, r in enumerate(timed) if r.get(f"vs_fp_{key}_b{batch}")]
            ys = [r[f"vs_fp_{key}_b{batch}"] for _, r in pts]
            ax2.bar([x for x, _ in pts], ys, width, color=f"C{j}", hatch=hatch, label=label if batch == 1 else None)
            for (x, r), y in zip(pts, ys):
                ax2.annotate(f"{r[f'tps_{key}_b{batch}']:.1f}", (x, y), ha="center", va="bottom", fontsize=6)
    ax2.axhline(1.0, ls="--", c="k", lw=1, label="fp32 model (timed in the same rounds)")
    ticks = [(i, f"{r['setting']}\nbatch 1") for i, r in enumerate(timed)]
    ticks += [(len(timed) + 1 + i, f"{r['setting']}\nbatch 8") for i, r in enumerate(timed)]
    ax2.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], fontsize=6, rotation=30, ha="right")
    ax2.set_yscale("log")
    ax2.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax2.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.set_ylabel("decode speed / fp32 model (paired rounds; labels: tok/s)")
    ax2.set_title("decode speed by weight mode (greedy, integer KV cache)", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def _fmt(v: float | None, ratio: float | None = None, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" + (f" ({ratio:.2f}x)" if ratio else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--out", default="docs/export_tradeoff.png", help="PNG plot path")
    ap.add_argument("--json", default=None, help="optional path for the numbers as JSON")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--context", type=int, default=2048, help="context length for KV-cache bytes")
    ap.add_argument("--ppl-seq-len", type=int, default=512, help="WikiText-2 window length")
    ap.add_argument("--ppl-windows", type=int, default=8, help="WikiText-2 windows scored (0: skip perplexity)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--replot", default=None, help="redraw --out from a saved --json file, measuring nothing")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        plot(saved["rows"], saved["fp"], saved["budget"], Path(args.out))
        print(f"plot: {args.out}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_with_tokenizer(args.model)
    vocab = model.config.vocab_size
    n_emb = model.get_input_embeddings().weight.numel()
    fp16_mb = 2 * sum(p.numel() for p in model.parameters()) / 1e6  # tied weights counted once
    print(
        f"model: {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params "
        f"(embedding {n_emb / 1e6:.1f}M), torch threads {torch.get_num_threads()}\n"
        "students: untrained round-to-nearest (quantize_model, no QAT), exported with fp16 scales"
    )
    ids = wikitext2_ids(tokenizer) if args.ppl_windows > 0 else None
    budget = "skipped (no WikiText-2 data or --ppl-windows 0)"
    if ids is not None:
        n_win = min(args.ppl_windows, ids.numel() // args.ppl_seq_len)
        budget = f"seq {args.ppl_seq_len}, {n_win} windows = {n_win * (args.ppl_seq_len - 1)} predicted tokens"
        print(f"perplexity budget: WikiText-2 test ({ids.numel()} tokens), first {budget}")

    def ppl(m: nn.Module) -> float | None:
        return None if ids is None else perplexity(m, ids, args.ppl_seq_len, max_windows=args.ppl_windows)["ppl"]

    fp_row = {"setting": "FP (fp32; size as fp16)", "w_bits": 16, "kv_bits": 16, "size_mb": fp16_mb, "ppl": ppl(model)}
    print(f"  FP: ppl {fp_row['ppl']}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exp"
        for name, (fields, timed) in SETTINGS.items():
            student = quantize_model(model, QuantConfig(**fields))
            stats = export_student(student, path)
            del student
            packed = load_exported(path)
            cached = load_exported(path, weights="dequantized")
            row = {
                "setting": name,
                "w_bits": fields.get("w_bits", 4),
                "kv_bits": fields.get("kv_bits", 4),
                "size_mb": stats["size_bytes"] / 1e6,
                "fp16_mb": stats["fp16_size_bytes"] / 1e6,
                "ratio": stats["ratio"],
                "embedding_mb": stats["embedding_bytes"] / 1e6,
                "ratio_wo_emb": (stats["size_bytes"] - stats["embedding_bytes"])
                / (stats["fp16_size_bytes"] - 2 * n_emb),
                "ppl": ppl(cached),
            }
            if ids is not None:  # same logits in both weight modes: check it on the first window
                first = ids[: args.ppl_seq_len]
                nll = [perplexity(m, first, args.ppl_seq_len)["nll"] for m in (packed, cached)]
                row["nll_w1_packed_minus_dequantized"] = nll[0] - nll[1]
            if timed:  # FP model, packed, dequantized (and the int8 kernel) interleaved round by round
                contenders = {"fp": (model, False), "packed": (packed, True), "deq": (cached, True)}
                if name == "W8A8KV8":
                    contenders["int8"] = (load_exported(path, int8_kernel=True), True)
                for b in (1, 8):
                    res = decode_side_by_side(contenders, b, args.new_tokens, args.repeats, vocab)
                    for key, r in res.items():
                        row[f"tps_{key}_b{b}"] = r["tps"]
                        if key != "fp":
                            row[f"vs_fp_{key}_b{b}"] = r["vs_ref"]
                del contenders
            if name in ("W4A8KV4", "W8A8KV8"):
                theory = theoretical_kv_bytes(model.config, args.context, row["kv_bits"])
                row["kv_ratio_theory"] = theory["ratio"]
                row["kv_ratio_measured"] = measured_kv_ratio(cached, args.context, vocab)  # same bytes as packed
            rows.append(row)
            print(
                f"  {name}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})}",
                flush=True,
            )
            del packed, cached

    for b in (1, 8):  # the FP model's speed over all rounds, for the plot's reference point
        fps = [r[f"tps_fp_b{b}"] for r in rows if f"tps_fp_b{b}" in r]
        fp_row[f"tps_deq_b{b}"] = statistics.median(fps) if fps else None
    print(
        f"\nmodels: untrained RTN students (quantize_model, no QAT); perplexity: WikiText-2 test, {budget}; "
        f"decode: greedy, 8-token prompt, {args.new_tokens} new tokens, median of {args.repeats} interleaved "
        "rounds, integer KV cache for the exported models, DynamicCache for FP; FP = the fp32 model timed in the "
        "same rounds; (x) = median over rounds of t(FP) / t(this)\n"
    )
    print(
        f"| setting | W bits | size MB | / fp16 | emb MB | / fp16 w/o emb | KV bytes / fp16 @{args.context} | "
        "WikiText-2 ppl | b1 tok/s packed | b1 dequantized | b1 FP | b8 tok/s packed | b8 dequantized | b8 FP |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {fp_row['setting']} | 16 | {fp16_mb:.1f} | 1 | - | - | 1 | {_fmt(fp_row['ppl'], digits=2)} |" + " - |" * 6
    )
    for r in rows:
        kv = f"{r['kv_ratio_measured']:.3f} (theory {r['kv_ratio_theory']:.3f})" if "kv_ratio_measured" in r else "-"
        speeds = []
        for b in (1, 8):
            speeds += [_fmt(r.get(f"tps_{k}_b{b}"), r.get(f"vs_fp_{k}_b{b}")) for k in ("packed", "deq")]
            speeds.append(_fmt(r.get(f"tps_fp_b{b}")))
        print(
            f"| {r['setting']} | {r['w_bits']} | {r['size_mb']:.1f} | {r['ratio']:.3f} | {r['embedding_mb']:.1f} | "
            f"{r['ratio_wo_emb']:.3f} | {kv} | {_fmt(r['ppl'], digits=2)} | " + " | ".join(speeds) + " |"
        )
        if "tps_int8_b1" in r:
            i8 = [_fmt(r[f"tps_int8_b{b}"], r[f"vs_fp_int8_b{b}"]) for b in (1, 8)]
            print(f"| {r['setting']} int8 kernel |" + " |" * 7 + f" {i8[0]} | | | {i8[1]} | | |")
    plot(rows, fp_row, budget, Path(args.out))
    print(f"\nplot: {args.out}")
    if args.json:
        write_json_atomic(args.json, {"budget": budget, "fp": fp_row, "rows": rows})


if __name__ == "__main__":
    main()
