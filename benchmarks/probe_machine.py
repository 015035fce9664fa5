"""Does a long QAT job fit in this session? This machine's speed at what our long runs spend their time on.

Sessions land on different machines, and the same training step has taken 7 s on one and 20 s on another
(docs/BENCHMARKS.md, "Machines"). Measured here, one process, the threads given:

* fp32 GEMM GFLOP/s at a SmolLM2 MLP shape (512 tokens x 576 -> 1536), with 1 thread and with `--threads`;
* corpus generation: one batch of 64 SmolLM2 sequences of 128 tokens (EOS stop off), generated tokens/s;
* one training step (teacher forward, student forward and backward, AdamW; 4 x 128 tokens, fp32) of the two
  students of the open goal runs: W4A8KV4 with R1-R4 (the `+exp=smollm2_w4a8kv4_rot` student, RTN weights
  instead of GPTQ's: the same modules) and llama.cpp's Q4_0 with a q4_0 cache (`+exp=smollm2_q4_0_kv4`).

It then projects the wall time of the recorded long runs from those rates: the 4096-sequence corpus
(481,150 tokens, session 14) plus 1000 (#17) or 700 (#15) steps. GPTQ, export and evaluation (a few minutes
each) are not included.

`--device cuda` times generation and the steps on a GPU (the GEMM figures stay CPU ones); `--random` uses a
randomly initialised model of SmolLM2-135M's layer shapes (30 layers, hidden 576, GQA 9/3, vocab 49152; its head
is untied, 163M parameters against 135M: the same matmuls, one more weight for AdamW), for
a machine that has not got the weights: the timings need the shapes, not the values.

    python benchmarks/probe_machine.py [--threads 2] [--device cuda] [--random] [--json out.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from bench_train import make_step
from common import load_bench_model, q4_0_config

from qat_lightning.atomic import write_json_atomic
from qat_lightning.baselines.quarot import QuaRot
from qat_lightning.data.config import GenerationConfig
from qat_lightning.data.generate import generate_batch
from qat_lightning.distill.config import LossConfig
from qat_lightning.distill.losses import DistillationLoss
from qat_lightning.quant import QuantConfig, quantize_model

CORPUS_TOKENS = 481_150  # the 4096-sequence corpus (docs/BENCHMARKS.md, session 14)
RUNS = {"#17 W4A8KV4 rot, 1000 steps": ("w4a8kv4_rot", 1000), "#15 Q4_0 + q4_0 KV, 700 steps": ("q4_0_kv4", 700)}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gemm_gflops(threads: int, reps: int = 30) -> float:
    """fp32 (512, 576) @ (576, 1536) GFLOP/s with `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    dt = time.perf_counter() - t0
    torch.set_num_threads(before)
    return 2 * 512 * 576 * 1536 * reps / dt / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generation_tok_s(teacher: torch.nn.Module) -> float:
    """Generated tokens/s of one batch of 64 sequences of 128 tokens (the corpus's batch; EOS stop off)."""
    device = next(teacher.parameters()).device
    cfg = GenerationConfig(max_length=128, batch_size=64, stop_at_eos=False)
    firsts = torch.randint(100, teacher.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    ks = torch.full((64,), 4)
    gen = torch.Generator(device=device).manual_seed(0)
    _sync(device)
    t0 = time.perf_counter()
    out = generate_batch(teacher, firsts, ks, cfg, gen, eos_id=None)
    _sync(device)
    dt = time.perf_counter() - t0
    return sum(len(s) - 1 for s in out) / dt


def step_seconds(teacher: torch.nn.Module, student: torch.nn.Module, steps: int) -> float:
    """Median seconds of a KD-QAT step (4 x 128 tokens) after one warm-up step (synchronised on a GPU)."""
    device = next(teacher.parameters()).device
    batch = torch.randint(0, teacher.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    step = make_step(teacher, student.requires_grad_(True).train(), batch.to(device), DistillationLoss(LossConfig()))
    step()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=1, help="timed steps per student (after one warm-up)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--device", default="cpu", help="where generation and the steps run: cpu or cuda")
    ap.add_argument("--random", action="store_true", help="a random model of SmolLM2's shapes (no weights needed)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device here")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    res: dict = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "device": str(device),
                 "model": "random, SmolLM2-135M shapes" if args.random else "SmolLM2-135M-Instruct"}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
    res["gemm_gflops_1_thread"] = gemm_gflops(1)
    if args.threads != 1:
        res[f"gemm_gflops_{args.threads}_threads"] = gemm_gflops(args.threads)
    teacher = load_bench_model("smollm2_shapes" if args.random else "smollm2")
    teacher = teacher.to(device).requires_grad_(False).eval()
    res["generation_tok_s"] = generation_tok_s(teacher)
    students = {
        "w4a8kv4_rot": lambda: QuaRot(r3=True, r4=True).build(
            teacher, QuantConfig(w_bits=4, a_bits=8, kv_bits=4, kv_placement="post_rope")),
        "q4_0_kv4": lambda: quantize_model(teacher, q4_0_config("q4_0")),
    }
    for name, build in students.items():
        res[f"step_s_{name}"] = step_seconds(teacher, build(), args.steps)
    corpus_min = CORPUS_TOKENS / res["generation_tok_s"] / 60
    res["corpus_4096_min"] = corpus_min
    print(f"{res['cpu']}, torch {res['torch']}, threads={args.threads}, {res.get('gpu', 'cpu')}, {res['model']}")
    more = "" if args.threads == 1 else f", {res[f'gemm_gflops_{args.threads}_threads']:.1f} (threads={args.threads})"
    print(f"  fp32 GEMM 512x576x1536: {res['gemm_gflops_1_thread']:.1f} GFLOP/s (1 thread){more}")
    print(f"  generation: {res['generation_tok_s']:.0f} tok/s -> the 4096-sequence corpus in ~{corpus_min:.0f} min")
    for run, (student, steps) in RUNS.items():
        s = res[f"step_s_{student}"]
        total = corpus_min + steps * s / 60
        res[f"projected_min {run}"] = total
        print(f"  {run}: {s:.1f} s a step -> corpus + training ~{total:.0f} min (GPTQ/export/eval not included)")
    if args.json:
        write_json_atomic(args.json, res)


if __name__ == "__main__":
    main()
