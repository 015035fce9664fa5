"""Probe (#15, 2026-12-02): can an exact FP rewrite of q_proj/k_proj lower llama.cpp's q4_0-KV cost?

llama.cpp rotates K by a 64x64 Hadamard matrix before its Q4_0 blocks of 32, so the key rounding error is
near-isotropic with energy ~ ||k||^2. Rescaling RoPE pair j of the keys by 1/s_j and the queries reading it by
s_j leaves every logit q.k unchanged (the pair scales commute with RoPE, and row scales of q_proj/k_proj change
no Q4_0 weight rounding), while the logit error q'.e then has energy ~ sum_j s_j^2 Q_j * sum_j K_j / s_j^2
(Q_j, K_j: mean squares of pair j, q summed over the GQA heads reading it).

    --variant kvsmooth   our `kvsmooth` (pair ranges of K flattened, strength 1): it enlarges q where k is big
    --variant balance    the Cauchy-Schwarz minimum of that energy: s_j = (K_j / Q_j)^(1/4), per head

Each variant's F16 GGUF is scored by llama.cpp (2 threads) on WikiText-2 512 x 16 with KV q8_0 and q4_0, as
`bench_llamacpp.py --quality` scores the teacher (F16: 36.10 / 37.53). Calibration is data-free: the first
32 sequences of the generated corpus's first shard.

    python benchmarks/probe_kv_scales.py data/generated/smollm2-135m/hybrid-41e33420a0 --variant balance
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from qat_lightning.atomic import write_json_atomic
from qat_lightning.baselines.calibration import attention_heads, decoder_layers
from qat_lightning.baselines.kv_smooth import kv_smooth_model, scale_query_key
from qat_lightning.data.shards import read_shard
from qat_lightning.export.gguf import export_gguf
from qat_lightning.models import load_model
from qat_lightning.models.smollm2 import smollm2_gguf_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llamacpp import quality  # noqa: E402


def padded_batches(seqs: list[list[int]], size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Calibration batches for `kv_smooth_model`: right-padded, with their attention masks."""
    batches = []
    for i in range(0, len(seqs), size):
        chunk = seqs[i:i + size]
        ids = torch.zeros(len(chunk), max(len(s) for s in chunk), dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(chunk):
            ids[j, :len(s)], mask[j, :len(s)] = torch.tensor(s), 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@torch.no_grad()
def balanced_model(teacher: torch.nn.Module, seqs: list[list[int]], power: float = 0.25) -> torch.nn.Module:
    """A copy of `teacher` with s_j = (K_j / Q_j)^power on every key pair (geometric mean 1 per kv head)."""
    n_heads, n_kv, hd = attention_heads(teacher.config)
    layers = decoder_layers(teacher)
    energy: dict[tuple[str, int], torch.Tensor] = {}

    def hook(key):
        def h(_m, _a, y):  # y: (1, T, channels)
            energy[key] = energy.get(key, 0) + y.float().pow(2).sum(dim=(0, 1))
        return h

    handles = [getattr(layer.self_attn, f"{p}_proj").register_forward_hook(hook((p, i)))
               for i, layer in enumerate(layers) for p in ("q", "k")]
    for s in seqs:
        teacher(input_ids=torch.tensor([s]))
    for h in handles:
        h.remove()
    model = copy.deepcopy(teacher)
    for i, layer in enumerate(decoder_layers(model)):
        q = energy[("q", i)].view(n_kv, n_heads // n_kv, hd).sum(1).view(n_kv, 2, hd // 2).sum(1)  # (n_kv, hd/2)
        k = energy[("k", i)].view(n_kv, 2, hd // 2).sum(1)  # (n_kv, hd/2): pair d shares d + hd/2
        s = (k / q.clamp_min(1e-12)).pow(power)
        s = s / s.log().mean(dim=1, keepdim=True).exp()
        before = (q.sum(1) * k.sum(1)).sum().item()
        after = ((q * s**2).sum(1) * (k / s**2).sum(1)).sum().item()
        print(f"layer {i:2d}: predicted key-error energy ratio {after / before:.3f}", flush=True)
        scale_query_key(layer.self_attn, model.config, torch.cat([s, s], dim=1).reshape(-1))
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", help="a generated corpus folder (its first shard calibrates)")
    p.add_argument("--variant", choices=["kvsmooth", "balance"], required=True)
    p.add_argument("--work", default="/tmp/kv_probe")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    shards = sorted(Path(args.corpus).glob("*.safetensors"))
    if not shards:
        raise SystemExit(f"probe_kv_scales: no shards in {args.corpus}")
    torch.set_num_threads(2)
    seqs = read_shard(shards[0])[:32]
    teacher, tok = load_model({"source": "smollm2"})
    if args.variant == "kvsmooth":
        model = kv_smooth_model(teacher, padded_batches(seqs), strength=1.0)
    else:
        model = balanced_model(teacher, seqs)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / f"{args.variant}-f16.gguf"
    export_gguf(model, tok, f16, source_gguf=smollm2_gguf_path(), dtype="f16")
    rows = quality({"f16": f16}, teacher, tok, False, 2, 512, 16, None, ["q8_0", "q4_0"])
    for r in rows:
        r["variant"] = args.variant
    if args.json:
        write_json_atomic(args.json, rows)


if __name__ == "__main__":
    main()
