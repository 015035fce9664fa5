"""llama.cpp on SmolLM2-135M: our GGUFs against llama.cpp's own, measured by the engine (2 threads).

Files (written once into --work, default /tmp/qat_llamacpp): `f16` (the teacher, `export_gguf(dtype="f16")`),
`q8_0` and `q4_0` (llama.cpp's own post-training quantization of `f16`, `llama_model_quantize`), `rtn_q4_0`
(our round-to-nearest student of quant=q4_0: the student's codes written as they are) and, with --student,
trained students' GGUFs (several in one table share the teacher's logits: rows `student:<run dir>`).

Speed (default): prompt tokens/s (one batch of `context - n_gen` tokens) and decode tokens/s (batch 1,
greedy, `n_gen` tokens ending at `context`) for F16, Q8_0, Q4_0 and Q4_0 + q4_0 KV at --contexts, run
interleaved round by round (--repeats rounds, medians) so load from other processes hits every row alike;
file size and KV-cache bytes at each context.

Quality (--quality): WikiText-2 perplexity from llama.cpp's logits on our harness' windows (seq 512, first 16),
KL(teacher‖engine) and top-1 agreement against the fp32 teacher in PyTorch, for every file with KV f16 /
q8_0 / q4_0; with --harness also our PyTorch fake-quant student's perplexity for the same setting. The JSON rows
keep each window's NLL, so `benchmarks/compare_windows.py` can pair two files window by window.

    python benchmarks/bench_llamacpp.py                      # speed table (make bench)
    python benchmarks/bench_llamacpp.py --quality --harness  # the perplexity table of docs/BENCHMARKS.md
    python benchmarks/bench_llamacpp.py --quality --student run/export/model.gguf
    python benchmarks/bench_llamacpp.py --quality --files student --kv q8_0 --windows 64 \
        --student a/export/model.gguf b/export/model.gguf   # rows student:a, student:b
    python benchmarks/bench_llamacpp.py --quality --rotate 0 --files rot_q4_0 rot_rtn_q4_0   # R1+R2 first (#17)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from common import KV_BITS, q4_0_config

from qat_lightning.atomic import write_json_atomic
from qat_lightning.eval import corpus_ids
from qat_lightning.eval.ppl import perplexity, token_nll
from qat_lightning.export.gguf import export_gguf
from qat_lightning.export.llamacpp import (
    kv_cache_bytes,
    llamacpp_available,
    llamacpp_quantize,
    llamacpp_speed,
    load_gguf,
    logits_fn,
    score_windows,
)
from qat_lightning.models import load_model
from qat_lightning.models.smollm2 import smollm2_gguf_path
from qat_lightning.quant import quantize_model

SPEED_ROWS = [  # (row, file, KV type); "ours": our RTN student's GGUF (same tensor types as llama.cpp's Q4_0)
    ("F16", "f16", "f16"), ("Q8_0", "q8_0", "f16"), ("Q4_0", "q4_0", "f16"), ("Q4_0 ours", "rtn_q4_0", "f16"),
    ("Q4_0 + q4_0 KV", "q4_0", "q4_0"), ("Q4_0 ours + q4_0 KV", "rtn_q4_0", "q4_0"),
]



def student_files(paths: list[str] | None) -> dict[str, Path]:
    """Rows for --student files: `student`, or `student:<run dir>` each when several share one table.

    Checked before the teacher is loaded: a missing file or two files of one name stop the run at once.
    """
    def label(p: Path) -> str:
        return "student:" + (p.parent.parent.name if p.parent.name == "export" else p.stem)

    files: dict[str, Path] = {}
    for path in map(Path, paths or []):
        name = label(path) if len(paths) > 1 else "student"
        if not path.is_file():
            raise SystemExit(f"bench_llamacpp: --student {path}: no such file")
        if name in files:
            raise SystemExit(f"bench_llamacpp: two --student files are both named {name!r}; rename a run dir")
        files[name] = path
    return files


def build_files(work: Path, teacher: torch.nn.Module, tokenizer, students: dict[str, Path]) -> dict[str, Path]:
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
    return {**files, **students}


def build_rotated_files(work: Path, teacher: torch.nn.Module, tokenizer, seed: int) -> dict[str, Path]:
    """#17 in the deployed format, post-training: QuaRot's R1+R2 (seed `seed`; a plain untied Llama) before
    llama.cpp's own Q4_0 (`rot_q4_0`) and before our RTN in the format (`rot_rtn_q4_0`). The untied
    output.weight and token_embd are Q8_0 in both, as quant=q4_0 writes them (llama-quantize would pick Q4_0
    for token_embd of an untied model)."""
    from qat_lightning.rotate import rotate_model

    files = {"rot_f16": work / f"smollm2-rot{seed}-f16.gguf", "rot_q4_0": work / f"smollm2-rot{seed}-q4_0.gguf",
             "rot_rtn_q4_0": work / f"smollm2-rot{seed}-rtn-q4_0.gguf"}
    if all(f.exists() for f in files.values()):
        return files
    rotated = rotate_model(teacher, r1=True, r2=True, seed=seed)
    source = smollm2_gguf_path()
    if not files["rot_f16"].exists():
        print("export rotated f16:", export_gguf(rotated, tokenizer, files["rot_f16"], source_gguf=source, dtype="f16"))
    if not files["rot_q4_0"].exists():
        print("llama.cpp quantize rotated q4_0:", llamacpp_quantize(files["rot_f16"], files["rot_q4_0"], "q4_0",
                                                                    output_type="q8_0", token_embd_type="q8_0"))
    if not files["rot_rtn_q4_0"].exists():
        student = quantize_model(rotated, q4_0_config("q8_0"))
        print("export rotated rtn q4_0:", export_gguf(student, tokenizer, files["rot_rtn_q4_0"], source_gguf=source))
    return files


def speed(files: dict[str, Path], contexts: list[int], n_gen: int, repeats: int, threads: int,
          only: list[str] | None = None, students: list[str] = ()) -> list[dict]:
    """Interleaved timing: every row once per round, medians over rounds; each --student file is timed with
    an f16 and a q4_0 KV cache as rows `<name>` and `<name> + q4_0 KV`."""
    rows = []
    table = SPEED_ROWS + [row for n in students for row in ((n, n, "f16"), (f"{n} + q4_0 KV", n, "q4_0"))]
    chosen = [r for r in table if not only or r[0] in only]
    for ctx in contexts:
        llms = {name: load_gguf(files[f], n_ctx=ctx, kv_type=kv, n_threads=threads, logits_all=False)
                for name, f, kv in chosen}
        times: dict[str, list[dict]] = {name: [] for name in llms}
        for _ in range(repeats):
            for name, llm in llms.items():
                times[name].append(llamacpp_speed(files["f16"], context=ctx, n_gen=n_gen, llm=llm))
        for name, f, kv in chosen:
            llms[name].close()
            rows.append({
                "file": name, "context": ctx, "size_mb": files[f].stat().st_size / 1e6,
                "kv_mb": kv_cache_bytes(ctx, 30, 3, 64, kv) / 1e6,
                "prompt_tok_s": statistics.median(t["prompt_tokens_per_s"] for t in times[name]),
                "decode_tok_s": statistics.median(t["decode_tokens_per_s"] for t in times[name]),
            })
    return rows


def quality(files: dict[str, Path], teacher, tokenizer, harness: bool, threads: int, seq_len: int, windows: int,
            names: list[str] | None = None, kv_types: list[str] | None = None):
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
    order = ("f16", "q4_0", "rtn_q4_0", "rot_f16", "rot_q4_0", "rot_rtn_q4_0")
    students = [n for n in files if n.split(":")[0] == "student"]  # in the order given on the command line
    for name in [n for n in (*order, *students) if n in files
                 and (not names or n in names or n.split(":")[0] in names)]:  # `student` picks every student
        for kv in kv_types or list(KV_BITS):
            t0 = time.perf_counter()
            llm = load_gguf(files[name], n_ctx=seq_len, kv_type=kv, n_threads=threads)
            r = score_windows(llm, w, teacher_fn)
            llm.close()
            row = {"file": name, "kv": kv, "ppl": r["ppl"], "kl": r["kl"], "top1": r["top1_agreement"],
                   "seconds": time.perf_counter() - t0, "path": str(files[name]), "window_nll": r["window_nll"]}
            if harness and name == "rtn_q4_0":  # the same student in PyTorch: its perplexity, and llama.cpp vs it
                student_fn, nll = logits_fn(quantize_model(teacher, q4_0_config(kv))), []

                def scored(x: torch.Tensor) -> torch.Tensor:  # the student's logits, its NLL kept on the way
                    logits = student_fn(x)
                    nll.append(token_nll(logits, x).double().sum())
                    return logits

                llm = load_gguf(files[name], n_ctx=seq_len, kv_type=kv, n_threads=threads)
                s = score_windows(llm, w, scored)
                llm.close()
                harness_ppl = math.exp(float(sum(nll)) / (w.shape[0] * (seq_len - 1)))  # = eval.ppl's
                row.update(harness_ppl=harness_ppl, kl_student=s["kl"], top1_student=s["top1_agreement"])
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
    p.add_argument("--student", nargs="+", default=None,
                   help="trained students' GGUFs to add to the quality table, or to time beside llama.cpp's "
                        "files (several: rows student:<run dir>)")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--n-gen", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--files", nargs="+", default=None,
                   help="--quality rows: f16 q4_0 rtn_q4_0 student, rot_* with --rotate (default all)")
    p.add_argument("--kv", nargs="+", default=list(KV_BITS), help="with --quality: only these KV cache types")
    p.add_argument("--rows", nargs="+", default=None, help="speed rows to time (default all), e.g. 'Q4_0' 'Q4_0 ours'")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--rotate", type=int, default=None, metavar="SEED",
                   help="with --quality: add rows rot_f16 / rot_q4_0 / rot_rtn_q4_0 (R1+R2 of this seed first)")
    args = p.parse_args(argv)
    if not llamacpp_available():
        print("bench_llamacpp: llama-cpp-python is not installed (pip install -e '.[engine]'); skipped")
        return
    students = student_files(args.student)
    torch.set_num_threads(args.threads)
    teacher, tokenizer = load_model({"source": "smollm2"})
    files = build_files(Path(args.work), teacher, tokenizer, students)
    if args.rotate is not None:
        files.update(build_rotated_files(Path(args.work), teacher, tokenizer, args.rotate))
    if args.quality:
        rows = quality(files, teacher, tokenizer, args.harness, args.threads, args.seq_len, args.windows,
                       args.files, args.kv)
        print("\n| file | KV | llama.cpp ppl | KL(teacher‖engine) | top-1 | harness ppl | KL(student‖engine) | top-1 |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            h = f"{r['harness_ppl']:.2f}" if "harness_ppl" in r else "-"
            a = f"{r['kl_student']:.2e} | {r['top1_student']:.4f}" if "kl_student" in r else "- | -"
            print(f"| {r['file']} | {r['kv']} | {r['ppl']:.2f} | {r['kl']:.4f} | {r['top1']:.3f} | {h} | {a} |")
    else:
        rows = speed(files, args.contexts, args.n_gen, args.repeats, args.threads, args.rows, list(students))
        print("\n| file | context | size MB | KV MB | prompt tok/s | decode tok/s |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['file']} | {r['context']} | {r['size_mb']:.1f} | {r['kv_mb']:.1f} | "
                  f"{r['prompt_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")
    if args.json:
        write_json_atomic(args.json, rows)


if __name__ == "__main__":
    sys.exit(main())
