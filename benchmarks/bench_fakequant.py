"""Fake-quantization overhead: forward+backward time of the W4A8KV4 student / the FP model.

Same model, same batch (B x T random token ids), same loss (next-token cross entropy); FP and student
steps alternate in one process so machine noise hits both, and medians are reported.

    python benchmarks/bench_fakequant.py --model smollm2 --steps 10
    python benchmarks/bench_fakequant.py --model tiny --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import load_bench_model
from torch import nn

from qat_lightning.quant import QuantConfig, quant_summary, quantize_model


def step_time(model: nn.Module, ids: torch.Tensor) -> float:
    """Seconds for one forward + backward (next-token cross entropy) on `ids`."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    logits = model(ids).logits  # (B, T, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (after 1 warm-up each)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()

    t0 = time.perf_counter()
    fp = load_bench_model(args.model).train()
    cfg = QuantConfig(w_bits=4, a_bits=8, kv_bits=4)
    student = quantize_model(fp, cfg).train()
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s; student: {quant_summary(student)}")

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, fp.config.vocab_size, (args.batch, args.seq), generator=g)
    step_time(fp, ids), step_time(student, ids)  # warm-up
    fp_times, st_times = [], []
    for _ in range(args.steps):  # interleaved: FP, student, FP, student, ...
        fp_times.append(step_time(fp, ids))
        st_times.append(step_time(student, ids))
    fp_s, st_s = statistics.median(fp_times), statistics.median(st_times)
    print(
        f"fakequant_overhead {cfg.setting} fwd+bwd: student/fp = {st_s / fp_s:.2f}x "
        f"(fp {fp_s:.3f} s, student {st_s:.3f} s, B={args.batch} T={args.seq}, {args.steps} steps, "
        f"{torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
