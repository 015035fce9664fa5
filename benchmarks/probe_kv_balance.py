"""Probe (#15, 2026-12-04): could absorbed per-channel K/V scales lower the cost of llama.cpp's rotated q4_0 cache?

llama.cpp multiplies keys (after RoPE) and values by a Walsh-Hadamard H before quantizing the cache, so the
stored error is about isotropic with energy proportional to the vector's energy. An absorbed diagonal D
(keys: one scale per RoPE pair, queries get 1/D, so RoPE and q·k are unchanged; values: v_proj rows D, o_proj
columns 1/D) trades that energy against how much each channel's error is amplified downstream:
error ∝ (Σ a_j d_j²)(Σ w_j / d_j²), with a_j the channel's energy and w_j its reader's (the query heads of
the KV group for keys, o_proj's columns for values). The best D gives (Σ √(a_j w_j))²; this prints that
bound over the unscaled (Σ a_j)(Σ w_j), per layer, averaged over KV heads, on the teacher's activations
on WikiText-2 windows: the error energy such a balance could remove at most, before any ppl is measured.

    OMP_NUM_THREADS=1 QAT_DATA_DIR=../shared/data python benchmarks/probe_kv_balance.py --windows 2
"""

from __future__ import annotations

import argparse
import sys

import torch

from qat_lightning.eval import corpus_ids
from qat_lightning.models import load_model
from qat_lightning.models.adapter import adapter_for


def bound(a: torch.Tensor, w: torch.Tensor) -> float:
    """(Σ √(a w))² / (Σ a · Σ w): the error energy left by the best diagonal scale (Cauchy-Schwarz), <= 1."""
    return (torch.sqrt(a * w).sum() ** 2 / (a.sum() * w.sum())).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=2, help="WikiText-2 windows of 512 tokens")
    args = ap.parse_args()
    model, tok = load_model({"source": "smollm2"})
    model.eval()
    ad = adapter_for(model)
    heads, kv_heads, hd = ad.num_heads, ad.num_kv_heads, ad.head_dim
    group, half = heads // kv_heads, hd // 2
    ids = corpus_ids(tok, "wikitext2")[: args.windows * 512].view(args.windows, 512)
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_mod, _inp, out):
            acts[name] = out.detach().double().flatten(0, 1)  # (tokens, features)
        return hook

    for i, layer in enumerate(ad.layers(model)):
        for n in ("q_proj", "k_proj", "v_proj"):
            getattr(ad.attention(layer), n).register_forward_hook(keep(f"{i}.{n}"))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    keys, values = [], []
    for i, layer in enumerate(ad.layers(model)):
        q = acts[f"{i}.q_proj"].view(-1, heads, hd)  # (N, H, hd); pair energies are RoPE-invariant
        k = acts[f"{i}.k_proj"].view(-1, kv_heads, hd)
        v = acts[f"{i}.v_proj"].view(-1, kv_heads, hd)
        wo = ad.attention(layer).o_proj.weight.double().view(-1, heads, hd)  # (out, H, hd)
        rk, rv = [], []
        for g in range(kv_heads):
            kp = (k[:, g] ** 2).mean(0)
            qp = (q[:, g * group:(g + 1) * group] ** 2).mean(0).sum(0)
            rk.append(bound(kp[:half] + kp[half:], qp[:half] + qp[half:]))  # HF order: pair p = (p, p + hd/2)
            rv.append(bound((v[:, g] ** 2).mean(0), (wo[:, g * group:(g + 1) * group] ** 2).sum((0, 1))))
        keys.append(sum(rk) / kv_heads)
        values.append(sum(rv) / kv_heads)
        print(f"layer {i:2d}  keys {keys[-1]:.3f}  values {values[-1]:.3f}")
    print(f"mean over layers: keys {sum(keys) / len(keys):.3f}  values {sum(values) / len(values):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
