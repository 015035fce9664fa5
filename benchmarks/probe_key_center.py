"""Probe (#15, 2026-12-07): how many of RoPE's slowest pairs should key centering take? In our PyTorch mirror.

Key centering (`qat_lightning/export/key_center.py`) gives k_proj a bias of minus the keys' mean over generated
sequences on the n slowest RoPE pairs. This scores a trained student (`--run`, its `student/` folder, with the
KV cache of `--cases`) or the teacher (`--teacher`: weights unquantized, only the KV cache in llama.cpp's
blocks) on WikiText-2 (512-token windows: the goal windows 0-15 and, with `--held-out`, windows 16-63) for
each (KV bits, n) case; n = 0 is the file as it is. The means come from the first `--sequences` sequences of
the generated corpus, run through the first case's model (its KV cache included, which changes what later layers
see), as `export.key_center_pairs` takes them through the trained student.

    QAT_DATA_DIR=../shared/data python benchmarks/probe_key_center.py --run outputs/q40_8192_1100_awqdown \
        --held-out --cases 4:0 4:3 4:4 4:5 4:6 4:7 8:0 8:4
    QAT_DATA_DIR=../shared/data python benchmarks/probe_key_center.py --teacher --cases 4:0 4:6 4:8 16:6 16:8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import q4_0_config  # noqa: E402

from qat_lightning.data.shards import load_generated  # noqa: E402
from qat_lightning.eval import corpus_ids  # noqa: E402
from qat_lightning.eval.ppl import perplexity  # noqa: E402
from qat_lightning.export.key_center import center_keys, key_means  # noqa: E402
from qat_lightning.models import load_model  # noqa: E402
from qat_lightning.quant import QuantConfig, quantize_model  # noqa: E402

CORPUS = "data/generated/smollm2-135m/hybrid-41e33420a0"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--run", type=Path, help="a run folder holding student/ (student.safetensors, quant_config.json)")
    who.add_argument("--teacher", action="store_true", help="the FP teacher with only its KV cache quantized")
    ap.add_argument("--cases", nargs="+", required=True, help="KV_BITS:N_PAIRS, e.g. 4:0 4:4 8:4 (16 = no KV quant)")
    ap.add_argument("--corpus", default=CORPUS, help="the generated corpus the key means are taken over")
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--held-out", action="store_true", help="also windows 16-63")
    args = ap.parse_args()
    cases = [tuple(int(v) for v in c.split(":")) for c in args.cases]
    teacher, tok = load_model({"source": "smollm2"})
    teacher.float().eval()
    if args.run:
        qcfg0 = QuantConfig(**json.loads((args.run / "student" / "quant_config.json").read_text()))
        from safetensors.torch import load_file

        state = load_file(str(args.run / "student" / "student.safetensors"))
    else:
        qcfg0, state = dataclasses.replace(q4_0_config("q4_0"), w_bits=16, a_bits=16, overrides=()), None
    seqs = load_generated(args.corpus, args.sequences)
    ids = corpus_ids(tok, "wikitext2")
    means = None
    for kv_bits, n in cases:
        model = quantize_model(teacher, dataclasses.replace(qcfg0, kv_bits=kv_bits))
        if state is not None:
            model.load_state_dict(state, strict=False)
        model.eval()
        if means is None:  # taken once, through the first case's model (its KV cache included)
            means = key_means(model, seqs)
        if n:
            center_keys(model, seqs, n, means=means)
        t0 = time.time()
        with torch.no_grad():
            goal = perplexity(model, ids[: 16 * 512], 512)["ppl"]
            held = perplexity(model, ids[16 * 512 : 64 * 512], 512)["ppl"] if args.held_out else float("nan")
        name = args.run.name if args.run else "teacher"
        print(f"{name} kv{kv_bits} n={n}: goal {goal:.3f} held-out {held:.3f} ({time.time() - t0:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
