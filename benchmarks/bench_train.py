"""QAT training step vs the same KD step with a full-precision student, interleaved in one process.

Prints tokens/s and saved-for-backward activation memory of the W4A8KV4 student ÷ an FP student (same
teacher, batch, loss and optimizer), plus a per-rank memory estimate for LLaMA-7B W4A8KV4 at sequence
2048 on 8 GPUs under our FSDP2 (teacher sharded) vs the reference's FSDP with a replicated teacher.

    python benchmarks/bench_train.py [--model smollm2|tiny] [--steps 5] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from qat_lightning.distill.config import LossConfig
from qat_lightning.distill.losses import DistillationLoss
from qat_lightning.models import load_model
from qat_lightning.quant import QuantConfig, quantize_model


def saved_bytes(fn) -> int:
    """Bytes of tensors autograd saves for backward during `fn()` (the activation memory of a step)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def make_step(teacher, student, batch, criterion):
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)

    def forward():
        with torch.no_grad():
            t_out = teacher(batch, use_cache=False)
        s_out = student(batch, use_cache=False)
        return criterion(s_out, t_out, batch, None).loss

    def step() -> tuple[float, int]:
        t0 = time.perf_counter()
        mem, loss = saved_bytes(forward)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, mem

    return step


def llama7b_memory_estimate(ranks: int = 8, seq: int = 2048) -> dict[str, float]:
    """Per-rank GiB for LLaMA-7B KD-QAT in bf16: student sharded in both, teacher sharded or replicated.

    Student: bf16 params + bf16 grads + fp32 AdamW m and v = 12 bytes/param, sharded over `ranks`.
    Teacher: 2 bytes/param, sharded (ours) or replicated (reference). Activations with gradient
    checkpointing: one (seq, hidden) bf16 tensor per layer kept, one layer's full activations recomputed,
    and the (seq, vocab) logits of both models in fp32 for the loss. One unsharded layer of each model is
    resident during its forward under both schemes.
    """
    params, layers, hidden, inter, vocab = 6.74e9, 32, 4096, 11008, 32000
    gib = 2**30
    student = 12 * params / ranks
    teacher_sharded = 2 * params / ranks
    teacher_replicated = 2 * params
    layer_params = 4 * hidden * hidden + 3 * hidden * inter
    unsharded_layer = 2 * 2 * layer_params  # student + teacher layer, bf16
    checkpoints = layers * seq * hidden * 2
    layer_acts = seq * (10 * hidden + 3 * inter) * 2 * 2  # inputs + fake-quant copies, one layer
    logits = 2 * seq * vocab * 4 * 2  # both models' logits + softmax, fp32
    acts = checkpoints + layer_acts + logits + unsharded_layer
    ours = (student + teacher_sharded + acts) / gib
    ref = (student + teacher_replicated + acts) / gib
    return {"ours_gib": ours, "replicated_teacher_gib": ref, "teacher_replicated_gib": teacher_replicated / gib}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher, _ = load_model({"source": args.model})
    teacher.requires_grad_(False).eval()
    fp_student = copy.deepcopy(teacher).requires_grad_(True).train()
    q_student = quantize_model(teacher, QuantConfig(w_bits=4, a_bits=8, kv_bits=4)).requires_grad_(True).train()
    batch = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seq))
    criterion = DistillationLoss(LossConfig())
    steps = {
        "fp": make_step(teacher, fp_student, batch, criterion),
        "qat": make_step(teacher, q_student, batch, criterion),
    }
    for fn in steps.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {"fp": [], "qat": []}
    mem: dict[str, int] = {}
    for _ in range(args.steps):
        for name, fn in steps.items():  # interleaved: both see the same machine state
            t, m = fn()
            times[name].append(t)
            mem[name] = m
    fp_t, q_t = statistics.median(times["fp"]), statistics.median(times["qat"])
    tokens = args.batch * args.seq
    print(f"train_step W4A8KV4/FP time: {q_t / fp_t:.3f}x  (fp {fp_t:.3f} s = {tokens / fp_t:.0f} tok/s, "
          f"qat {q_t:.3f} s = {tokens / q_t:.0f} tok/s; {args.model}, B={args.batch} T={args.seq}, "
          f"median of {args.steps}, KD step incl. teacher fwd + AdamW)")
    print(f"train_step W4A8KV4/FP saved-activation memory: {mem['qat'] / mem['fp']:.3f}x  "
          f"(fp {mem['fp'] / 2**20:.0f} MiB, qat {mem['qat'] / 2**20:.0f} MiB)")
    est = llama7b_memory_estimate()
    print(f"LLaMA-7B W4A8KV4 seq 2048 on 8 GPUs, per-rank estimate: FSDP2 with sharded teacher "
          f"{est['ours_gib']:.1f} GiB vs replicated teacher {est['replicated_teacher_gib']:.1f} GiB "
          f"(teacher alone replicated: {est['teacher_replicated_gib']:.1f} GiB)")


if __name__ == "__main__":
    main()
