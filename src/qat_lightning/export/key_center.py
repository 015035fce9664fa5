"""Center the cached keys on RoPE's slowest pairs: a k_proj bias that removes their mean before a 4-bit KV cache.

Why: llama.cpp's q4_0 cache rotates each key (after RoPE) by a Walsh-Hadamard and rounds it in blocks of 32,
so a key's rounding error grows with its whole norm. On SmolLM2 about three quarters of that norm (62-89 % of
the energy, by layer) is a constant offset: the keys' mean over tokens. Subtracting a constant vector ``c``
from every key changes the logit of query q on the key n steps back by ``q . R(n) c``. Where RoPE turns a pair
by less than a small angle over the whole context, ``R(n) c`` is nearly ``c`` for every key, so the change is
nearly one constant per query, which softmax ignores. So only the ``n_pairs`` slowest pairs are centered.

llama.cpp adds an ``attn_k.bias`` to the keys before RoPE (`export.gguf` writes it, rows permuted like the
weight), so the file keeps its tensor types: 4 bytes a key channel per layer more.

Measured in llama.cpp (docs/BENCHMARKS.md, "Key centering"; SmolLM2, RoPE base 1e5, head_dim 64): 4 pairs
(at most 0.022 rad over 512 tokens) take the three AWQ-down Q4_0 students from 38.94 to 38.41 with a q4_0
cache (WikiText-2, first 16 windows; 0.6 % better on the next 48) and leave an f16 / q8_0 cache as it was
(+0.03 on the mean). More pairs centered the offsets the model uses as a slow, distance-linear attention bias
and helped less; the angle grows with the context, so check long contexts before centering more.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qat_lightning.models.adapter import adapter_for

__all__ = ["center_keys", "describe", "key_means", "slowest_pair_angles"]


def slowest_pair_angles(head_dim: int, rope_theta: float, n_pairs: int, context: int) -> list[float]:
    """Radians each of the `n_pairs` slowest RoPE pairs turns over `context` tokens (slowest last)."""
    half = head_dim // 2
    return [context * rope_theta ** (-2 * j / head_dim) for j in range(half - n_pairs, half)]


@torch.no_grad()
def key_means(model: nn.Module, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Per decoder layer, the mean of k_proj's output (pre-RoPE keys, (n_kv * head_dim,)) over every token."""
    ad = adapter_for(model)
    layers = list(ad.layers(model))
    sums = [torch.zeros(ad.num_kv_heads * ad.head_dim, dtype=torch.float64) for _ in layers]
    count = 0

    def accumulate(i: int):
        def hook(_mod, _inp, out):
            sums[i].add_(out.detach().double().flatten(0, -2).sum(0).cpu())  # (B*T, n_kv*hd) -> (n_kv*hd,)
        return hook

    handles = [ad.attention(layer).k_proj.register_forward_hook(accumulate(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for seq in sequences:
            ids = torch.as_tensor(list(seq), dtype=torch.long, device=device)[None]  # (1, T)
            model(input_ids=ids, use_cache=False)
            count += ids.shape[1]
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("key_means needs at least one non-empty sequence")
    return [s / count for s in sums]


def center_keys(model: nn.Module, sequences: Sequence[Sequence[int]], n_pairs: int,
                means: list[torch.Tensor] | None = None) -> dict[str, object]:
    """Give every k_proj a bias of minus the keys' mean on the `n_pairs` slowest RoPE pairs (in place).

    `sequences`: calibration token ids (the generated corpus: data-free). `means`: `key_means` of them when
    already at hand (a sweep over `n_pairs`). A k_proj that already has a bias keeps it and is shifted by the
    same amount. Returns what was done, for the run's record.
    """
    ad = adapter_for(model)
    half = ad.head_dim // 2
    if not 1 <= n_pairs <= half:
        raise ValueError(f"key centering: n_pairs must be in 1..{half} (head_dim {ad.head_dim}), got {n_pairs}")
    means = key_means(model, sequences) if means is None else means
    pair = torch.arange(half) >= half - n_pairs  # (hd/2,): pair j is channels j and j + hd/2 (rotate_half)
    mask = pair.repeat(2).repeat(ad.num_kv_heads)  # (n_kv * hd,)
    removed = []
    for layer, mean in zip(ad.layers(model), means, strict=True):
        k_proj = ad.attention(layer).k_proj
        shift = torch.where(mask, -mean, torch.zeros_like(mean)).to(k_proj.weight.dtype).to(k_proj.weight.device)
        if k_proj.bias is None:
            k_proj.bias = nn.Parameter(shift, requires_grad=False)
        else:
            k_proj.bias.data.add_(shift)
        removed.append(float(mean[mask].pow(2).sum() / mean.pow(2).sum().clamp_min(1e-30)))
    return {
        "n_pairs": n_pairs,
        "max_angle_512": max(slowest_pair_angles(ad.head_dim, ad.rope_theta, n_pairs, 512)),
        "max_angle_2048": max(slowest_pair_angles(ad.head_dim, ad.rope_theta, n_pairs, 2048)),
        "mean_share_removed": sum(removed) / len(removed),  # share of the mean's energy on the centered pairs
        "calib_sequences": len(sequences),
        "calib_tokens": sum(len(s) for s in sequences),
    }


def describe(info: dict[str, object]) -> str:
    """One log line of `center_keys`' record."""
    return (f"key centering: {info['n_pairs']} slowest RoPE pairs (turning at most "
            f"{info['max_angle_512']:.3f} rad over 512 tokens, {info['max_angle_2048']:.3f} over 2048), "
            f"{100 * info['mean_share_removed']:.0f} % of the key mean's energy removed, from "
            f"{info['calib_sequences']} sequences / {info['calib_tokens']} tokens")
