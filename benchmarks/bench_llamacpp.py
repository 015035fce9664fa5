"""llama.cpp on SmolLM2-135M: our GGUFs against llama.cpp's own, measured by the engine (2 threads).

Files (written once into --work, default /tmp/qat_llamacpp): `f16` (the teacher, `export_gguf(dtype="f16")`),
`q8_0` and `q4_0` (llama.cpp's own post-training quantization of `f16`, `llama_model_quantize`), `rtn_q4_0`
(our round-to-nearest student of quant=q4_0: the student's codes written as they are) and, with --student,
a trained student's GGUF.

Speed (default): prompt tokens/s (one batch of `context - n_gen` tokens) and decode tokens/s (batch 1,
greedy, `n_gen` tokens ending at `context`) for F16, Q8_0, Q4_0 and Q4_0 + q4_0 KV at --contexts, run
interleaved round by round (--repeats rounds, medians) so load from other processes hits every row alike;
file size and KV-cache bytes at each context.

Quality (--quality): WikiText-2 perplexity from llama.cpp's logits on our harness' windows (seq 512, first 16),
KL(teacher‖engine) and top-1 agreement against the fp32 teacher in PyTorch, for every file with KV f16 /
q8_0 / q4_0; with --harness also our PyTorch fake-quant student's perplexity for the same setting.

    python benchmarks/bench_llamacpp.py                      # speed table (make bench)
    python benchmarks/bench_llamacpp.py --quality --harness  # the perplexity table of docs/BENCHMARKS.md
    python benchmarks/bench_llamacpp.py --quality --student run/export/model.gguf
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from qat_lightning.eval import corpus_ids
from qat_lightning.eval.perplexity import perplexity
from qat_lightning.export.gguf import export_gguf
from qat_lightning.export.llamacpp import (
    kv_cache_bytes,
    llamacpp_available,
    llamacpp_quantize,
    llamacpp_speed,
    load_gguf,
    score_windows,
)
from qat_lightning.models import load_model
from qat_lightning.models.smollm2 import smollm2_gguf_path
from qat_lightning.quant import QuantConfig, quantize_model

KV_BITS = {"f16": 16, "q8_0": 8, "q4_0": 4}
SPEED_ROWS = [  # (row, file, KV type)
    ("F16", "f16", "f16"), ("Q8_0", "q8_0", "f16"), ("Q4_0", "q4_0", "f16"), ("Q4_0 + q4_0 KV", "q4_0", "q4_0"),
]


def q4_0_config(kv: str) -> QuantConfig:
    """quant=q4_0 (conf/quant/q4_0.yaml) with the KV cache of `kv`."""
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "src" / "qat_lightning" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="quant/q4_0")  # the group file alone: its defaults chain, nothing else
    from qat_lightning.quant import as_quant_config

    return dataclasses.replace(as_quant_config(cfg.quant), kv_bits=KV_BITS[kv])


def build_files(work: Path, teacher: torch.nn.Module, tokenizer, student_gguf: str | None) -> dict[str, Path]:
    """The GGUF files of the table, written once into `work` (reused when present)."""
    work.mkdir(parents=True, exist_ok=True)
    files = {"f16": work / "smollm2-f16.gguf", "q8_0": work / "smollm2-q8_0.gguf", "q4_0": work / "smollm2-q4_0.gguf",
             "rtn_q4_0": work / "smollm2-rtn-q4_0.gguf"}
    source = smollm2_gguf_path()
    if not files["f16"].exists():
        print("export f16:", export_gguf(teacher, tokenizer, files["f16"], source_gguf=source, dtype="f16"), flush=True)
    for ftype in ("q8_0", "q4_0"):
        if not files[ftype].exists():
            print(f"llama.cpp quantize {ftype}:", llamacpp_quantize(files["f16"], files[ftype], ftype), flush=True)
    if not files["rtn_q4_0"].exists():
        student = quantize_model(teacher, q4_0_config("q8_0"))
        print("export rtn q4_0:", export_gguf(student, tokenizer, files["rtn_q4_0"], source_gguf=source), flush=True)
    if student_gguf:
        files["student"] = Path(student_gguf)
    return files


def speed(files: dict[str, Path], contexts: list[int], n_gen: int, repeats: int, threads: int) -> list[dict]:
    """Interleaved timing: every row once per round, medians over rounds."""
    rows = []
    for ctx in contexts:
        llms = {name: load_gguf(files[f], n_ctx=ctx, kv_type=kv, n_threads=threads, logits_all=False)
                for name, f, kv in SPEED_ROWS}
        times: dict[str, list[dict]] = {name: [] for name in llms}
        for _ in range(repeats):
            for name, llm in llms.items():
                times[name].append(llamacpp_speed(files["f16"], context=ctx, n_gen=n_gen, llm=llm))
        for name, f, kv in SPEED_ROWS:
            llms[name].close()
            rows.append({
                "file": name, "context": ctx, "size_mb": files[f].stat().st_size / 1e6,
                "kv_mb": kv_cache_bytes(ctx, 30, 3, 64, kv) / 1e6,
                "prompt_tok_s": statistics.median(t["prompt_tokens_per_s"] for t in times[name]),
                "decode_tok_s": statistics.median(t["decode_tokens_per_s"] for t in times[name]),
            })
    return rows


def quality(files: dict[str, Path], teacher, tokenizer, harness: bool, threads: int, seq_len: int, windows: int):
    ids = corpus_ids(tokenizer, "wikitext2")
    w = ids[: (ids.numel() // seq_len) * seq_len].view(-1, seq_len)[:windows]
    cache: dict[int, torch.Tensor] = {}

    def teacher_fn(x: torch.Tensor) -> torch.Tensor:  # fp32 teacher logits of one window, computed once
        key = hash(tuple(x[0, :8].tolist())) ^ x.shape[1]
        if key not in cache:
            with torch.inference_mode():
                cache[key] = teacher(input_ids=x, use_cache=False).logits.float()
        return cache[key]

    rows = []
    for name in [n for n in ("f16", "q4_0", "rtn_q4_0", "student") if n in files]:
        for kv in KV_BITS:
            t0 = time.perf_counter()
            llm = load_gguf(files[name], n_ctx=seq_len, kv_type=kv, n_threads=threads)
            r = score_windows(llm, w, teacher_fn)
            llm.close()
            row = {"file": name, "kv": kv, "ppl": r["ppl"], "kl": r["kl"], "top1": r["top1_agreement"],
                   "seconds": time.perf_counter() - t0}
            if harness and name == "rtn_q4_0":
                student = quantize_model(teacher, q4_0_config(kv))
                row["harness_ppl"] = perplexity(student, ids, seq_len, max_windows=windows)["ppl"]
            if harness and name == "f16" and kv == "f16":
                row["harness_ppl"] = perplexity(teacher, ids, seq_len, max_windows=windows)["ppl"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/qat_llamacpp")
    p.add_argument("--quality", action="store_true", help="the perplexity/KL table instead of speed")
    p.add_argument("--harness", action="store_true", help="with --quality: also our PyTorch harness' perplexity")
    p.add_argument("--student", default=None, help="a trained student's GGUF to add to the quality table")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--n-gen", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    if not llamacpp_available():
        print("bench_llamacpp: llama-cpp-python is not installed (pip install -e '.[engine]'); skipped")
        return
    torch.set_num_threads(args.threads)
    teacher, tokenizer = load_model({"source": "smollm2"})
    files = build_files(Path(args.work), teacher, tokenizer, args.student)
    if args.quality:
        rows = quality(files, teacher, tokenizer, args.harness, args.threads, args.seq_len, args.windows)
        print("\n| file | KV | llama.cpp ppl | KL(teacher‖engine) | top-1 | harness ppl |\n|---|---|---|---|---|---|")
        for r in rows:
            h = f"{r['harness_ppl']:.2f}" if "harness_ppl" in r else "-"
            print(f"| {r['file']} | {r['kv']} | {r['ppl']:.2f} | {r['kl']:.4f} | {r['top1']:.3f} | {h} |")
    else:
        rows = speed(files, args.contexts, args.n_gen, args.repeats, args.threads)
        print("\n| file | context | size MB | KV MB | prompt tok/s | decode tok/s |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['file']} | {r['context']} | {r['size_mb']:.1f} | {r['kv_mb']:.1f} | "
                  f"{r['prompt_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
