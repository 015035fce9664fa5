"""Probe (#15 / #17, 2026-12-04): what do the absorbed rotations (R1, R2) do to llama.cpp's Q4_0 format?

QAT for Q4_0 from the R1+R2 teacher scored worse in llama.cpp than from the plain teacher (docs/BENCHMARKS.md).
This scores the SmolLM2 teacher post-training (RTN in the format, our PyTorch mirror of llama.cpp: weights Q4_0
blocks of 32, the tied embedding / output Q8_0, Q8_0 activation blocks, and the KV cache as chosen) after each
absorbed transform, on WikiText-2 512 x 16, with the weights alone quantized and with the whole format, and
gives the relative RTN error of the decoder linears' weights (Q4_0) and inputs (Q8_0) on the first window:

    none   the teacher as it is
    fold   RMSNorm scales folded into the linears that read them (what R1 needs first), no rotation
    r1     fold + R1 (residual stream)           r2   R2 alone (values / o_proj, per KV head)
    r1r2   fold + R1 + R2

    OMP_NUM_THREADS=1 QAT_DATA_DIR=../shared/data python benchmarks/probe_rotation_q4_0.py --kv q4_0 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time

import torch
from common import KV_BITS, q4_0_config

from qat_lightning.atomic import write_json_atomic
from qat_lightning.eval import corpus_ids
from qat_lightning.eval.ppl import perplexity
from qat_lightning.models import load_model
from qat_lightning.quant import quantize_model
from qat_lightning.rotate import rotate_model
from qat_lightning.rotate.absorb import fold_norms
from qat_lightning.rotate.metrics import quantization_error

VARIANTS = ("none", "fold", "r1", "r2", "r1r2")



def transformed(teacher: torch.nn.Module, variant: str, seed: int) -> torch.nn.Module:
    if variant == "none":
        return teacher
    if variant == "fold":
        return fold_norms(copy.deepcopy(teacher))
    return rotate_model(teacher, r1="r1" in variant, r2="r2" in variant, seed=seed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kv", default="q4_0", choices=sorted(KV_BITS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--seed", type=int, default=0, help="Hadamard signs (as methods.quarot.seed)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    teacher, tok = load_model({"source": "smollm2"})
    teacher.eval()
    ids = corpus_ids(tok, "wikitext2")
    full = q4_0_config(args.kv)
    weights_only = dataclasses.replace(full, a_bits=16, kv_bits=16)
    probe_ids = ids[:512][None]  # (1, 512): the first window, for the RTN errors
    w_spec, a_spec = full.weight_spec("model.layers.0.mlp.down_proj"), full.act_spec("model.layers.0.mlp.down_proj")
    rows = []
    for variant in args.variants:
        t0 = time.perf_counter()
        model = transformed(teacher, variant, args.seed)
        row: dict = {"variant": variant, "kv": args.kv, "seed": args.seed}
        with torch.inference_mode():
            err = quantization_error(model, probe_ids, w_spec, a_spec)
            row.update({k: err[k] for k in ("weight", "act", "wout")})
            for name, qcfg in (("ppl_weights_only", weights_only), (f"ppl_w_a_kv_{args.kv}", full)):
                student = quantize_model(model, qcfg)
                row[name] = perplexity(student, ids, 512, max_windows=args.windows)["ppl"]
                del student
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        write_json_atomic(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
