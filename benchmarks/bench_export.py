"""Export trade-offs on SmolLM2-135M: file size, KV-cache bytes and decode speed of the integer model.

For each setting the (untrained) student from `quantize_model` is exported with the defaults (fp16
scales, fp16 FP params), reloaded with `load_exported`, and decoded greedily with `QuantizedKVCache`.
Baselines: the same model all-fp16 for sizes, an fp16 KV cache for KV bytes, the FP32 model with HF's
DynamicCache for tokens/s. Times are medians of --repeats runs on whatever CPU/GPU this runs on.

    python benchmarks/bench_export.py                       # SmolLM2, writes docs/export_tradeoff.png
    python benchmarks/bench_export.py --model tiny --new-tokens 8 --out /tmp/tradeoff.png
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

from qat_lightning.export import (
    QuantizedKVCache,
    export_student,
    kv_cache_bytes,
    load_exported,
    theoretical_kv_bytes,
)
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


def decode_tokens_per_s(
    model: nn.Module, batch: int, new_tokens: int, repeats: int, quantized_cache: bool, vocab: int
) -> float:
    """Generated tokens per second of greedy decoding (8-token prompt, prefill included), median of repeats."""
    ids = torch.randint(0, vocab, (batch, 8), generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(repeats + 1):  # the first run warms up allocators and kernels, not timed
        kw = {"past_key_values": QuantizedKVCache(model)} if quantized_cache else {}
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **kw
            )
        if i:
            times.append(time.perf_counter() - t)
    return batch * new_tokens / statistics.median(times)


def measured_kv_ratio(model: nn.Module, context: int, vocab: int) -> float:
    """Bytes of a filled `QuantizedKVCache` after one `context`-token prefill / fp16 K+V bytes."""
    cache = QuantizedKVCache(model)
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    fp16 = cfg.num_hidden_layers * context * 2 * cfg.num_key_value_heads * head_dim * 2
    return kv_cache_bytes(cache) / fp16


def plot(rows: list[dict], fp32_tps: dict[int, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        ax1.scatter(r["size_mb"], r["w_bits"], s=60)
        ax1.annotate(r["setting"], (r["size_mb"], r["w_bits"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax1.set_xlabel("export size (MB, model.safetensors)")
    ax1.set_ylabel("weight bits")
    ax1.set_title(f"size vs bits (fp16 model = {rows[0]['fp16_mb']:.0f} MB)")
    ax1.axvline(rows[0]["fp16_mb"] * 0.30, ls="--", c="grey", lw=1)
    ax1.text(rows[0]["fp16_mb"] * 0.30, ax1.get_ylim()[1] * 0.95, " 0.30 x fp16", fontsize=8, color="grey")
    for batch, marker in ((1, "o"), (8, "s")):
        pts = [(r["size_mb"], r[f"tps_b{batch}"], r["setting"]) for r in rows if r.get(f"tps_b{batch}")]
        ax2.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"integer model, batch {batch}")
        for x, y, name in pts:
            ax2.annotate(name, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
        ax2.axhline(fp32_tps[batch], ls="--", lw=1, c="C0" if batch == 1 else "C1", label=f"fp32 model, batch {batch}")
    ax2.set_xlabel("export size (MB)")
    ax2.set_ylabel("decode tokens/s")
    ax2.set_yscale("log")
    ax2.set_title("decode speed (greedy, integer KV cache)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--out", default="docs/export_tradeoff.png", help="PNG plot path")
    ap.add_argument("--json", default=None, help="optional path for the numbers as JSON")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--context", type=int, default=2048, help="context length for KV-cache bytes")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_bench_model(args.model).eval()
    vocab = model.config.vocab_size
    n_emb = model.get_input_embeddings().weight.numel()
    print(
        f"model: {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params "
        f"(embedding {n_emb / 1e6:.1f}M), torch threads {torch.get_num_threads()}"
    )
    fp32_tps = {b: decode_tokens_per_s(model, b, args.new_tokens, args.repeats, False, vocab) for b in (1, 8)}

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (fields, timed) in SETTINGS.items():
            student = quantize_model(model, QuantConfig(**fields))
            stats = export_student(student, Path(tmp) / "exp")
            del student
            exported = load_exported(Path(tmp) / "exp")
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
            }
            if timed:
                for b in (1, 8):
                    row[f"tps_b{b}"] = decode_tokens_per_s(exported, b, args.new_tokens, args.repeats, True, vocab)
            if name == "W8A8KV8" and timed:
                fast = load_exported(Path(tmp) / "exp", int8_kernel=True)
                row["tps_b1_int8mm"] = decode_tokens_per_s(fast, 1, args.new_tokens, args.repeats, True, vocab)
                row["tps_b8_int8mm"] = decode_tokens_per_s(fast, 8, args.new_tokens, args.repeats, True, vocab)
                del fast
            if name in ("W4A8KV4", "W8A8KV8"):
                theory = theoretical_kv_bytes(model.config, args.context, row["kv_bits"])
                row["kv_ratio_theory"] = theory["ratio"]
                row["kv_ratio_measured"] = measured_kv_ratio(exported, args.context, vocab)
            rows.append(row)
            print(
                f"  {name}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})}",
                flush=True,
            )
            del exported

    print(
        f"\nfp32 model decode: batch 1 {fp32_tps[1]:.1f} tok/s, batch 8 {fp32_tps[8]:.1f} tok/s "
        f"({args.new_tokens} new tokens, median of {args.repeats})\n"
    )
    print(
        f"| setting | size MB | / fp16 | emb MB | / fp16 w/o emb | KV bytes / fp16 @{args.context} | "
        "tok/s b1 (/fp32) | tok/s b8 (/fp32) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        kv = f"{r['kv_ratio_measured']:.3f} (theory {r['kv_ratio_theory']:.3f})" if "kv_ratio_measured" in r else "-"
        tps = [
            f"{r[f'tps_b{b}']:.1f} ({r[f'tps_b{b}'] / fp32_tps[b]:.2f}x)" if f"tps_b{b}" in r else "-" for b in (1, 8)
        ]
        print(
            f"| {r['setting']} | {r['size_mb']:.1f} | {r['ratio']:.3f} | {r['embedding_mb']:.1f} | "
            f"{r['ratio_wo_emb']:.3f} | {kv} | {tps[0]} | {tps[1]} |"
        )
        if "tps_b1_int8mm" in r:
            print(
                f"| {r['setting']} int8 kernel | | | | | | {r['tps_b1_int8mm']:.1f} "
                f"({r['tps_b1_int8mm'] / fp32_tps[1]:.2f}x) | {r['tps_b8_int8mm']:.1f} "
                f"({r['tps_b8_int8mm'] / fp32_tps[8]:.2f}x) |"
            )
    plot(rows, fp32_tps, Path(args.out))
    print(f"\nplot: {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"fp32_tokens_per_s": fp32_tps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
