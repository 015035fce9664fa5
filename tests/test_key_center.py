"""Key centering (export/key_center.py): what it removes, what it leaves, and why only RoPE's slowest pairs."""

from __future__ import annotations

import pytest
import torch

from qat_lightning.export.key_center import center_keys, key_means, slowest_pair_angles
from qat_lightning.models import build_tiny_config, build_tiny_model


def _model(rope_theta: float = 1e6, seed: int = 0):
    config = build_tiny_config(vocab_size=259, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
                               num_layers=2)
    config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    return build_tiny_model(config, seed=seed).eval()


def _seqs(n: int = 6, length: int = 40, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (length,), generator=g).tolist() for _ in range(n)]


def _shift_key_offsets(model, scale: float = 3.0) -> None:
    """Give the keys a large constant offset, as trained models have (random tiny ones have almost none)."""
    g = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        k = layer.self_attn.k_proj
        k.bias = torch.nn.Parameter(scale * torch.randn(k.out_features, generator=g), requires_grad=False)


def test_centering_zeroes_the_key_mean_on_the_slowest_pairs_only():
    model, calib = _model(), _seqs()
    _shift_key_offsets(model)
    before = key_means(model, calib)
    info = center_keys(model, calib, n_pairs=4)
    after = key_means(model, calib)
    hd = 128 // 4
    slow = (torch.arange(hd // 2) >= hd // 2 - 4).repeat(2).repeat(2)  # (n_kv * hd,): channels j, j + hd/2
    for b, a in zip(before, after, strict=True):
        assert a[slow].abs().max() < 1e-5 * b[slow].abs().max()
        assert torch.allclose(a[~slow], b[~slow], atol=1e-6)
    assert info["n_pairs"] == 4 and info["calib_tokens"] == 6 * 40
    assert 0 < info["mean_share_removed"] < 1


def test_slow_pairs_are_nearly_free_in_full_precision_and_fast_pairs_are_not():
    """Why only the slowest pairs: RoPE barely turns them over the context, so removing their offset shifts
    each query's logits by about one constant (softmax ignores it); the same offset on the fastest pairs moves
    the attention pattern."""
    model, calib, ids = _model(), _seqs(), torch.tensor(_seqs(2, 64, seed=9))
    _shift_key_offsets(model)
    with torch.no_grad():
        ref = model(ids).logits
        slow = center_keys(model, calib, n_pairs=4)
        moved_slow = (model(ids).logits - ref).abs().max().item()
        for layer in model.model.layers:  # undo, then remove the same offsets from the 4 fastest pairs
            layer.self_attn.k_proj.bias = None
        _shift_key_offsets(model)
        means = key_means(model, calib)
        hd = 128 // 4
        fast = (torch.arange(hd // 2) < 4).repeat(2).repeat(2)
        for layer, m in zip(model.model.layers, means, strict=True):
            layer.self_attn.k_proj.bias.data -= torch.where(fast, m, 0.0).float()
        moved_fast = (model(ids).logits - ref).abs().max().item()
    assert max(slowest_pair_angles(32, 1e6, 4, 64)) < 3e-3
    assert slow["max_angle_512"] == pytest.approx(max(slowest_pair_angles(32, 1e6, 4, 512)))  # the config's base
    assert moved_slow < 0.01 * moved_fast, (moved_slow, moved_fast)


def test_bad_pair_counts_are_refused_before_any_forward():
    model = _model()
    for n in (0, 17):
        with pytest.raises(ValueError, match=r"n_pairs must be in 1\.\.16"):
            center_keys(model, [[1, 2, 3]], n_pairs=n)
    with pytest.raises(ValueError, match="at least one non-empty sequence"):
        center_keys(model, [], n_pairs=2)


def test_the_angles_are_ropes():
    """Pair j of head_dim d turns by context * theta^(-2j/d); SmolLM2 (theta 1e5, d 64): the 6 slowest pairs
    stay under 0.05 rad over 512 tokens, the 7th does not."""
    angles = slowest_pair_angles(64, 1e5, 7, 512)
    assert angles == sorted(angles, reverse=True)
    assert angles[-1] == pytest.approx(512 * 1e5 ** (-62 / 64))
    assert max(angles[1:]) < 0.05 < angles[0]


def test_export_config_refuses_key_centering_outside_gguf_and_bad_counts():
    from qat_lightning.export.config import ExportConfig

    assert ExportConfig(format="gguf", key_center_pairs=6).key_center_pairs == 6
    with pytest.raises(ValueError, match="needs export.format=gguf"):
        ExportConfig(format="native", key_center_pairs=6)
    with pytest.raises(ValueError, match="key_center_pairs must be >= 0"):
        ExportConfig(format="gguf", key_center_pairs=-1)
