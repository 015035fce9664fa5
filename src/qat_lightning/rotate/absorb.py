"""Rotations absorbed into the weights (R1, R2, and the weight half of R4): the FP function is unchanged.

Conventions: a linear computes ``y = x Wᵀ + b`` on row vectors; Q is orthogonal (``Q Qᵀ = I``).

- fold norms: ``RMSNorm(x)·g`` read by W equals ``RMSNorm(x)`` read by ``W diag(g)``; g becomes 1. Needed
  because the per-channel scale g does not commute with a rotation, while ``RMSNorm(x Q) = RMSNorm(x) Q``
  (the mean of squares is rotation invariant).
- R1 (residual stream, one Q for the whole model): the residual becomes ``x Q``. Embeddings ``E -> E Q``;
  readers (q, k, v, gate, up, lm_head) ``W -> W Q``; writers (o_proj, down_proj) ``W -> Qᵀ W``, ``b -> b Q``.
  q/k/v biases (Qwen2) are on the output side and stay as they are.
- R2 (per attention head, one Q2 per KV head of each layer): v_proj rows of KV head h ``W_h -> Q2ᵀ W_h``,
  ``b_h -> b_h Q2``; o_proj columns of every query head j of that group ``W[:, j] -> W[:, j] Q2`` (GQA).
- R4 (down_proj input): ``W_down -> W_down Q4``; the input is rotated online (`online.OnlineHadamard`).

Tied embeddings: lm_head absorbs the final norm's scale (``E diag(g) Q``) while the embedding becomes ``E Q``,
so the two are untied and ``config.tie_word_embeddings`` set False: the result is still a plain HF model
(one more vocab x hidden matrix in the checkpoint), and llama.cpp reads it as a model with an output tensor.

All products run in float64 and are cast back to each weight's dtype once.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from qat_lightning.models.adapter import NORM_READERS, RESIDUAL_WRITERS, ModelAdapter, adapter_for
from qat_lightning.rotate.hadamard import check_kind, rotation_info, rotation_matrix
from qat_lightning.rotate.online import attach_r3, attach_r4

__all__ = ["CONFIG_KEY", "attach_online_rotations", "fold_norms", "rotate_model", "rotation_of", "untie_embeddings"]

CONFIG_KEY = "qat_rotation"  # config.json entry recording the rotations (online ones need it to reload)
# sub-seeds: each rotation gets its own stream of the user's seed
_TAG = {"r1": 1, "r2": 2, "r3": 3, "r4": 4}


def _sub_seed(seed: int, tag: str, layer: int = 0) -> int:
    return (int(seed) * 1_000_003 + _TAG[tag] * 10_007 + layer) % (2**63)


# -- weight products (in place, float64 inside) ----------------------------------------------------------
@torch.no_grad()
def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def _scale_input(linear: nn.Linear, g: torch.Tensor) -> None:
    """W -> W diag(g): the linear now reads x where it read x·g."""
    w = linear.weight.double()  # (out, in)
    _set(linear.weight, w * g.double().to(w.device)[None, :])


@torch.no_grad()
def _rotate_input(weight: torch.Tensor, q: torch.Tensor) -> None:
    """W -> W Q (the input arrives rotated by Q)."""
    _set(weight, weight.double() @ q.to(weight.device))  # (out, in) @ (in, in)


@torch.no_grad()
def _rotate_output(linear: nn.Linear, q: torch.Tensor) -> None:
    """W -> Qᵀ W, b -> b Q (the output leaves rotated by Q)."""
    q = q.to(linear.weight.device)
    _set(linear.weight, q.T @ linear.weight.double())  # (out, out) @ (out, in)
    if linear.bias is not None:
        _set(linear.bias, linear.bias.double() @ q)  # (out,)


def _is_tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is emb.weight


def untie_embeddings(model: nn.Module) -> bool:
    """Give lm_head its own copy of a weight tied to the input embeddings (in place); True if it was tied.

    Why: with the final norm's scale folded into lm_head (and R1), head and embedding differ. The config
    flag is cleared too, so neither `tie_weights()` nor a save/reload re-ties them.
    """
    tied = _is_tied(model)
    if tied:
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for config in {id(c): c for c in (model.config, _text_config(model.config))}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    return tied


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


@torch.no_grad()
def _set_ones(norm: nn.Module) -> None:
    norm.weight.fill_(1.0)


@torch.no_grad()
def fold_norms(model: nn.Module) -> nn.Module:
    """Fold every RMSNorm's scale into the linears reading it first (in place; FP output unchanged).

    input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, final norm -> lm_head (untied first).
    The norms keep a weight of ones, so the model is still a plain HF model. Returns `model`.
    """
    ad = adapter_for(model)
    for layer in ad.layers(model):
        for norm_name, readers in NORM_READERS:
            norm = layer.get_submodule(norm_name)
            for reader in readers:
                _scale_input(layer.get_submodule(reader), norm.weight)
            _set_ones(norm)
    untie_embeddings(model)
    final = ad.final_norm(model)
    _scale_input(ad.lm_head(model), final.weight)
    _set_ones(final)
    return model


def _norms_are_folded(model: nn.Module, ad: ModelAdapter) -> bool:
    norms = [n for layer in ad.layers(model) for n in ad.norms(layer)] + [ad.final_norm(model)]
    return all(bool((n.weight == 1).all()) for n in norms) and not _is_tied(model)


# -- R1 / R2 / R4 -----------------------------------------------------------------------------------
@torch.no_grad()
def apply_r1_matrix(model: nn.Module, ad: ModelAdapter, q: torch.Tensor) -> None:
    """R1 with a given orthogonal (hidden, hidden) `q`, in place; the norms must be folded already."""
    q = q.double()
    emb = ad.embed(model)
    _set(emb.weight, emb.weight.double() @ q.to(emb.weight.device))  # (V, h) @ (h, h)
    for layer in ad.layers(model):
        for _, readers in NORM_READERS:
            for reader in readers:
                _rotate_input(layer.get_submodule(reader).weight, q)
        for writer in RESIDUAL_WRITERS:
            _rotate_output(layer.get_submodule(writer), q)
    _rotate_input(ad.lm_head(model).weight, q)


@torch.no_grad()
def _apply_r2(model: nn.Module, ad: ModelAdapter, kind: str, seed: int) -> None:
    hd, n_kv = ad.head_dim, ad.num_kv_heads
    per_layer = [torch.stack([rotation_matrix(hd, kind, _sub_seed(seed, "r2", i * n_kv + h)) for h in range(n_kv)])
                 for i in range(len(ad.layers(model)))]  # each (n_kv, hd, hd): one per KV head
    apply_r2_matrices(model, ad, per_layer)


@torch.no_grad()
def apply_r2_matrices(model: nn.Module, ad: ModelAdapter, per_layer: list[torch.Tensor]) -> None:
    """R2 with given matrices: `per_layer[i]` is (n_kv, hd, hd), one orthogonal Q2 per KV head of layer i."""
    group = ad.group_size
    for layer, qs in zip(ad.layers(model), per_layer, strict=True):
        attn = ad.attention(layer)
        v, o = attn.v_proj, attn.o_proj
        n_kv, hd = qs.shape[0], qs.shape[-1]
        qs = qs.double().to(v.weight.device)  # (n_kv, hd, hd)
        wv = v.weight.double().unflatten(0, (n_kv, hd))  # (n_kv, hd, in)
        _set(v.weight, (qs.transpose(1, 2) @ wv).flatten(0, 1))  # rows of head h: Q2ᵀ W_h
        if v.bias is not None:
            bv = v.bias.double().unflatten(0, (n_kv, hd))  # (n_kv, hd)
            _set(v.bias, (bv[:, None, :] @ qs).squeeze(1).flatten())  # b_h Q2
        wo = o.weight.double().unflatten(1, (ad.num_heads, hd)).transpose(0, 1)  # (H, out, hd)
        q_of_head = qs.repeat_interleave(group, dim=0)  # (H, hd, hd): query head j reads KV head j // group
        _set(o.weight, (wo @ q_of_head).transpose(0, 1).flatten(1))  # columns of head j: W[:, j] Q2


@torch.no_grad()
def _apply_r4_weights(model: nn.Module, ad: ModelAdapter, q: torch.Tensor) -> None:
    for layer in ad.layers(model):
        _rotate_input(ad.mlp(layer).down_proj.weight, q)


def rotation_of(model: nn.Module) -> dict | None:
    """The rotations recorded in `model.config` by `rotate_model` (None for an unrotated model)."""
    rec = getattr(model.config, CONFIG_KEY, None)
    return dict(rec) if rec else None


def _check_fp(model: nn.Module) -> None:
    from qat_lightning.quant.modules import QuantEmbedding, QuantLinear

    if any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
        raise ValueError("rotate the FP teacher, then quantize: the model already contains QuantLinear modules")
    if rotation_of(model):
        raise ValueError(f"model is already rotated ({rotation_of(model)}); rotate the unrotated teacher")


def rotate_model(
    model: nn.Module,
    *,
    r1: bool = True,
    r2: bool = True,
    r3: bool = False,
    r4: bool = False,
    seed: int = 0,
    kind: str = "hadamard",
    inplace: bool = False,
) -> nn.Module:
    """A rotated copy of an FP teacher (teacher untouched unless `inplace`) with the same FP logits.

    R1 and R2 are absorbed: the result is a plain Llama / Qwen2 checkpoint (norms folded, embeddings untied).
    R3 and R4 are online (`online.py`): the copy carries parameter-free rotation modules and a
    ``config.qat_rotation`` record; after `from_pretrained` call `attach_online_rotations` to rebuild them.

    Args:
        model: a HF causal LM of a `models.adapter` family, not yet quantized.
        r1, r2, r3, r4: which rotations (see the module docstring and `online.py`).
        seed: seeds every rotation (each gets its own sub-seed).
        kind: "hadamard" (randomized Hadamard, QuaRot; random orthogonal for sizes without a construction)
            or "random" (Haar-random orthogonal everywhere).
    """
    check_kind(kind)
    _check_fp(model)
    ad = adapter_for(model)
    out = model if inplace else copy.deepcopy(model)
    if r1:
        fold_norms(out)
        apply_r1_matrix(out, ad, rotation_matrix(ad.hidden_size, kind, _sub_seed(seed, "r1")))
    if r2:
        _apply_r2(out, ad, kind, seed)
    if r4:
        _apply_r4_weights(out, ad, rotation_matrix(ad.intermediate_size, kind, _sub_seed(seed, "r4")))
    record = {"r1": r1, "r2": r2, "r3": r3, "r4": r4, "seed": int(seed), "kind": kind,
              "r1_matrix": rotation_info(ad.hidden_size, kind) if r1 else None,
              "r2_matrix": rotation_info(ad.head_dim, kind) if r2 else None,
              "r3_matrix": rotation_info(ad.head_dim, kind) if r3 else None,
              "r4_matrix": rotation_info(ad.intermediate_size, kind) if r4 else None}
    setattr(out.config, CONFIG_KEY, record)
    attach_online_rotations(out)
    return out


def attach_online_rotations(model: nn.Module) -> nn.Module:
    """Rebuild the online rotations (R3, R4) recorded in ``config.qat_rotation`` (in place, idempotent).

    Call it after `from_pretrained` of a rotated checkpoint with R3/R4 (a plain HF load lacks them and
    computes a different function), and after `quantize_model` when the KV cache is quantized post-RoPE
    (quantize_model switches the attention implementation; this re-wraps it so R3 runs before the KV quantizer).
    """
    rec = rotation_of(model)
    if not rec:
        return model
    if rec.get("r4"):
        attach_r4(model, rec["kind"], _sub_seed(rec["seed"], "r4"))
    if rec.get("r3"):
        attach_r3(model, rec["kind"], _sub_seed(rec["seed"], "r3"))
    return model
