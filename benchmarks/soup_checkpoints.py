"""Average the weights of two Lightning checkpoints of one recipe (a model soup), for export and scoring.

Why: two QAT runs from the same teacher that differ only in data order may average to a better student
(Wortsman et al. 2022); the export rounds the averaged latent weights to the format again. Optimizer and
loop state come from the first checkpoint, so the command that wrote them can export the soup with
``ckpt_path=<out>`` (at max_steps it trains no step). Usage:

    python benchmarks/soup_checkpoints.py A/last.ckpt B/last.ckpt outputs/soup/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    for f in (args.first, args.second):
        if not f.is_file():
            print(f"soup_checkpoints: no checkpoint at {f}", file=sys.stderr)
            return 2
    a = torch.load(args.first, mmap=True, weights_only=False, map_location="cpu")
    b = torch.load(args.second, mmap=True, weights_only=False, map_location="cpu")
    sa, sb = a["state_dict"], b["state_dict"]
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        print("soup_checkpoints: the two checkpoints hold different tensors (not one recipe's)", file=sys.stderr)
        return 2
    out = {}
    for k, v in sa.items():
        if torch.is_floating_point(v):
            out[k] = ((v.float() + sb[k].float()) / 2).to(v.dtype)
        elif torch.equal(v, sb[k]):
            out[k] = v
        else:
            print(f"soup_checkpoints: non-float tensor {k} differs between the checkpoints", file=sys.stderr)
            return 2
    a["state_dict"] = out
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    torch.save(a, tmp)
    os.replace(tmp, args.out)
    print(f"averaged {sum(torch.is_floating_point(v) for v in out.values())} tensors "
          f"(global_step {a['global_step']} / {b['global_step']}) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
