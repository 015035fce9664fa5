"""QuaRot-style baselines on SmolLM2: WikiText-2 perplexity of RTN vs RTN after rotations, per W-A-KV setting.

    QAT_DATA_DIR=/work/shared/data .venv/bin/python experiments/rotation_baselines.py \
        --settings W4A8KV4 W4A4KV4 --seq-len 512 --windows 16 --seeds 0

Rows: fp (the teacher), rtn, and RTN after each rotation set (r1r2 = deployable, plain checkpoint; r1r2r4 adds
the online down_proj Hadamard). Quantizers are the paper's (conf/quant/w4a8kv4.yaml): symmetric MinMax, weights
per channel, activations per token, KV per token before RoPE (`--kv-placement post_rope` for the engines'
placement, where `r1r2r3r4` also makes sense). Prints a markdown table; `--out` also writes the numbers as JSON.

`--errors N` instead prints the relative RTN error of every linear's weight (W4 per channel), input (A8 and A4
per token) and weight-only output (all tokens; first token) on the first N WikiText-2 tokens, before and after
R1+R2+R4 (`rotate.metrics`). `--ablate` prints perplexity with one error source at a time (W4, W4 on q/k/v
only, A8, A4, KV4) for the teacher, the teacher with norms folded only, R1+R2 and R1+R2+R4.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from qat_lightning.baselines.rtn import rtn
from qat_lightning.eval import corpus_ids
from qat_lightning.eval.ppl import perplexity
from qat_lightning.models import load_model
from qat_lightning.quant import QuantConfig, QuantSpec
from qat_lightning.rotate import attach_online_rotations, rotate_model
from qat_lightning.rotate.metrics import quantization_error

ROTATIONS = {"r1r2": dict(r1=True, r2=True), "r1r2r4": dict(r1=True, r2=True, r4=True)}


def parse_setting(setting: str) -> dict[str, int]:
    m = re.fullmatch(r"W(\d+)A(\d+)KV(\d+)", setting)
    if not m:
        raise ValueError(f"setting must look like W4A8KV4, got {setting!r}")
    return dict(zip(("w_bits", "a_bits", "kv_bits"), map(int, m.groups())))


def ppl(model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> float:
    return perplexity(model, ids, args.seq_len, batch_size=args.batch_size, max_windows=args.windows)["ppl"]


def print_errors(teacher: torch.nn.Module, ids: torch.Tensor, n_tokens: int, args: argparse.Namespace) -> None:
    """Relative RTN error per projection, teacher vs R1+R2+R4 (seed = first of --seeds)."""
    batch = ids[:n_tokens][None]  # (1, T)
    rotated = rotate_model(teacher, r1=True, r2=True, r4=True, seed=args.seeds[0], kind=args.kind)
    w = QuantSpec(bits=4, granularity="channel")
    table = {}
    for a_bits in (8, 4):
        a = QuantSpec(bits=a_bits, granularity="token")
        table[a_bits] = (quantization_error(teacher, batch, w, a), quantization_error(rotated, batch, w, a))
    print(f"\nrelative RTN error ||fq(t) - t||^2 / ||t||^2 on {n_tokens} WikiText-2 tokens (W4 channel, A token)\n")
    print("| tensor | W4 / A8 before | after R1+R2+R4 | A4 before | after R1+R2+R4 |")
    print("|---|---|---|---|---|")
    for key in table[8][0]:
        if key.split("/")[0] in ("weight", "wout", "wout0"):  # do not depend on the activation bits
            cells = [table[8][0][key], table[8][1][key], "", ""]
        else:
            cells = [table[8][0][key], table[8][1][key], table[4][0][key], table[4][1][key]]
        print(f"| {key} | " + " | ".join(f"{c:.3g}" if isinstance(c, float) else c for c in cells) + " |")


ABLATIONS = {  # one error source at a time (16 = full precision)
    "W4": dict(w_bits=4, a_bits=16, kv_bits=16),
    "W4 q/k/v only": dict(w_bits=16, a_bits=16, kv_bits=16, overrides=[{"pattern": "q_proj|k_proj|v_proj",
                                                                         "w_bits": 4}]),
    "A8": dict(w_bits=16, a_bits=8, kv_bits=16),
    "A4": dict(w_bits=16, a_bits=4, kv_bits=16),
    "KV4": dict(w_bits=16, a_bits=16, kv_bits=4),
}


def print_ablation(teacher: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> None:
    """Perplexity with one error source at a time, for the teacher, norms folded only, R1+R2 and R1+R2+R4."""
    import copy

    from qat_lightning.rotate import fold_norms

    seed = args.seeds[0]
    models = {"teacher": teacher, "fold only": fold_norms(copy.deepcopy(teacher)),
              "r1r2": rotate_model(teacher, seed=seed, kind=args.kind),
              "r1r2r4": rotate_model(teacher, r4=True, seed=seed, kind=args.kind)}
    print(f"\nfp {ppl(teacher, ids, args):.2f}; seq {args.seq_len} x {args.windows} windows, KV {args.kv_placement}\n")
    print("| quantized | " + " | ".join(models) + " |")
    print("|---|" + "---|" * len(models))
    for name, kw in ABLATIONS.items():
        cfg = QuantConfig(**kw, kv_placement=args.kv_placement)
        cells = [f"{ppl(rtn(m, cfg), ids, args):.2f}" for m in models.values()]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["W4A8KV4", "W4A4KV4"])
    ap.add_argument("--rotations", nargs="+", default=list(ROTATIONS), choices=[*ROTATIONS, "r1r2r3r4"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--kind", default="hadamard", choices=["hadamard", "random"])
    ap.add_argument("--kv-placement", default="pre_rope", choices=["pre_rope", "post_rope"])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-baselines", action="store_true", help="skip the fp and rtn rows (e.g. for more seeds)")
    ap.add_argument("--ablate", action="store_true", help="print perplexity with one error source at a time")
    ap.add_argument("--errors", type=int, default=0, metavar="N", help="print RTN errors on N tokens and exit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ROTATIONS["r1r2r3r4"] = dict(r1=True, r2=True, r3=True, r4=True)

    start = time.time()
    teacher, tokenizer = load_model({"source": "smollm2"})
    ids = corpus_ids(tokenizer, "wikitext2")
    if args.errors:
        print_errors(teacher, ids, args.errors, args)
        return
    if args.ablate:
        print_ablation(teacher, ids, args)
        print(f"wall {time.time() - start:.0f} s")
        return
    def qcfg(setting: str) -> QuantConfig:
        return QuantConfig(**parse_setting(setting), kv_placement=args.kv_placement)

    rows: list[dict] = []
    if not args.no_baselines:
        fp = ppl(teacher, ids, args)
        rows.append({"method": "fp", "rotation": "-", "seed": "-", **{s: fp for s in args.settings}})
        print(f"fp done ({time.time() - start:.0f} s)", flush=True)
        rows.append({"method": "rtn", "rotation": "-", "seed": "-",
                     **{s: ppl(rtn(teacher, qcfg(s)), ids, args) for s in args.settings}})
        print(f"rtn done ({time.time() - start:.0f} s)", flush=True)
    for name in args.rotations:
        for seed in args.seeds:
            rotated = rotate_model(teacher, **ROTATIONS[name], seed=seed, kind=args.kind)
            row = {"method": "quarot_rtn", "rotation": name, "seed": seed}
            for s in args.settings:
                student = attach_online_rotations(rtn(rotated, qcfg(s)))  # what methods.quarot does
                row[s] = ppl(student, ids, args)
                del student
            rows.append(row)
            del rotated
            print(f"{name} seed {seed} done ({time.time() - start:.0f} s)", flush=True)

    wall = time.time() - start
    head = ["method", "rotation", "seed", *args.settings]
    print(f"\nSmolLM2-135M-Instruct, WikiText-2 ppl (seq {args.seq_len} x {args.windows} windows), "
          f"kind={args.kind}, KV {args.kv_placement}; wall {wall:.0f} s\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [f"{r[h]:.2f}" if isinstance(r[h], float) else str(r[h]) for h in head]
        print("| " + " | ".join(cells) + " |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "wall_s": wall,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
