"""Probe (#15, 2026-12-03): where along WikiText-2's 512-token windows do llama.cpp files lose perplexity?

The training corpus is packed into 128-token blocks by default, so a student never trains positions
128-511, which WikiText-2 (seq 512) scores three quarters of. This splits llama.cpp's NLL on the same
512 x 16 windows as `bench_llamacpp.py --quality` into position buckets, per file and KV cache type, so the
loss of a student over the F16 teacher can be read per bucket (a gap that grows past position 128 points
at the training context).

    python benchmarks/probe_position_nll.py --files /tmp/qat_llamacpp/smollm2-f16.gguf student.gguf \\
        --kv f16 q4_0 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qat_lightning.atomic import write_json_atomic
from qat_lightning.eval import corpus_ids
from qat_lightning.export.llamacpp import llamacpp_logits, load_gguf
from qat_lightning.models import load_model

BUCKETS = ((0, 128), (128, 256), (256, 512))  # predicted-token positions [lo, hi) within a window


def bucket_nll(llm, windows: torch.Tensor) -> dict[str, float]:
    """Mean NLL per bucket of predicting token t+1 from position t (T-1 predictions per window)."""
    sums = {b: 0.0 for b in BUCKETS}
    counts = {b: 0 for b in BUCKETS}
    for w in windows:
        logp = F.log_softmax(llamacpp_logits(llm, w), dim=-1)  # (T, V)
        nll = -logp[:-1].gather(-1, w[1:, None])[:, 0].double()  # (T-1,)
        for lo, hi in BUCKETS:
            part = nll[lo:hi]
            sums[(lo, hi)] += part.sum().item()
            counts[(lo, hi)] += part.numel()
    out = {f"{lo}-{hi}": sums[(lo, hi)] / counts[(lo, hi)] for lo, hi in BUCKETS}
    out["all"] = sum(sums.values()) / sum(counts.values())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", nargs="+", required=True, help="GGUF files to score")
    p.add_argument("--kv", nargs="+", default=["f16", "q4_0"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    for f in args.files:
        if not Path(f).is_file():
            print(f"error: no such GGUF file: {f}", file=sys.stderr)
            return 2
    model, tok = load_model({"source": "smollm2"})
    del model
    ids = corpus_ids(tok, "wikitext2")
    windows = ids[: (ids.numel() // 512) * 512].view(-1, 512)[: args.windows]
    rows = []
    for f in args.files:
        for kv in args.kv:
            t0 = time.perf_counter()
            llm = load_gguf(f, n_ctx=512, kv_type=kv, n_threads=args.threads)
            try:
                nll = bucket_nll(llm, windows)
            finally:
                llm.close()
            row = {"file": f, "kv": kv, "nll": nll, "ppl": {k: math.exp(v) for k, v in nll.items()},
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"{Path(f).parent.parent.name}/{Path(f).name} KV {kv}: "
                  + "  ".join(f"{k} {v:.2f}" for k, v in row["ppl"].items()), flush=True)
    if args.json:
        write_json_atomic(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
