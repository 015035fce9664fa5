"""Load an export back into a runnable HF model whose quantized layers hold real integer codes.

Each quantized linear becomes a `QuantizedLinear`: packed codes + scales, with inputs fake-quantized per
token and k_proj/v_proj outputs quantized per token exactly as in training. The logits therefore match the
fake-quant student (up to the scales' storage dtype). Integrity is checked before anything is built.

Two ways to hold the weights (`load_exported(weights=...)`):

* ``"packed"`` (default): only codes + scales; each forward dequantizes them on the fly. Memory stays at
  the packed size, decoding is slow (the dequantization dominates a small-batch step).
* ``"dequantized"``: each quantized linear / embedding also keeps its dequantized weight in the compute
  dtype, computed once at load by the very same `dequantize` call. Memory = the FP weights (plus the small
  codes); matmuls = the FP model's; numerics identical to ``"packed"`` (same weight tensor, bit for bit).
  Activations and the KV cache are still quantized per token in every forward.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from qat_lightning.export.config import FORMAT_VERSION
from qat_lightning.export.exporter import QUANT_CONFIG_FILE, SAFETENSORS_FILE, sha256_file
from qat_lightning.export.pack import packed_shape, unpack_codes
from qat_lightning.quant import QuantConfig, QuantLinear, QuantSpec, dequantize, fake_quantize

__all__ = ["QuantizedEmbedding", "QuantizedLinear", "load_exported", "read_export_meta"]

_OFF = QuantSpec(bits=16)
WEIGHT_MODES = ("packed", "dequantized")


def _spec(d: dict | None) -> QuantSpec:
    return _OFF if d is None else QuantSpec(**d)


class _PackedWeight(nn.Module):
    """Integer codes (packed for <= 4 bits) + scales (+ zero points) of one weight matrix."""

    def __init__(self, shape: tuple[int, int], spec: QuantSpec, qweight, scales, zeros) -> None:
        super().__init__()
        self.shape, self.weight_spec = tuple(shape), spec
        self.register_buffer("qweight", qweight)  # (out, ceil(in/2)) uint8 | (out, in) int8/uint8
        self.register_buffer("scales", scales)  # (out, 1) | (out, G, 1) | (1, 1)
        self.register_buffer("zeros", zeros)  # like scales, uint8, or None when symmetric

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.qweight, self.weight_spec.bits, self.shape, signed=self.weight_spec.symmetric)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, in) weight in `dtype`: (codes - zero) * scale, computed in fp32 like the student."""
        zeros = None if self.zeros is None else self.zeros.float()
        return dequantize(self.codes(), self.scales.float(), zeros, self.weight_spec).to(dtype)

    @property
    def cached_weight(self) -> torch.Tensor | None:
        """The weight dequantized once by `cache_dequantized`, or None (packed mode)."""
        return self._buffers.get("weight_cache")

    def cache_dequantized(self, dtype: torch.dtype, weight: torch.Tensor | None = None) -> None:
        """Keep the dequantized weight in `dtype` (a non-persistent buffer: the state_dict is unchanged).

        `weight` may be given to share one tensor between modules with the same codes (tied lm_head).
        """
        w = self.dequantized(dtype) if weight is None else weight
        if tuple(w.shape) != self.shape or w.dtype != dtype:
            raise ValueError(f"cached weight must be {self.shape} {dtype}, got {tuple(w.shape)} {w.dtype}")
        self.register_buffer("weight_cache", w, persistent=False)

    def drop_cache(self) -> None:
        """Back to packed mode: free the dequantized weight."""
        self._buffers.pop("weight_cache", None)

    def _weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        """The cached weight when it has `dtype`, else dequantized now (the same values either way)."""
        w = self.cached_weight
        return w if w is not None and w.dtype == dtype else self.dequantized(dtype)


class QuantizedLinear(_PackedWeight):
    """Linear layer over integer weights: ``y = fq_out(fq_act(x) @ dequant(Wq).T + b)``.

    Packed mode dequantizes the weight in every forward (cache-free): the baseline any integer kernel or
    cache must match. After `cache_dequantized` the same weight is computed once and reused.
    """

    def __init__(self, shape, weight_spec, qweight, scales, zeros, bias, act_spec, out_spec) -> None:
        super().__init__(shape, weight_spec, qweight, scales, zeros)
        self.out_features, self.in_features = self.shape
        self.act_spec, self.out_spec = act_spec, out_spec
        self.register_buffer("bias", bias)  # (out,) or None
        self.use_int8_kernel = False  # set by load_exported(int8_kernel=True) where `int8_kernel_ok`

    @property
    def int8_kernel_ok(self) -> bool:
        """torch's int8 weight-only kernel computes exactly x @ (q * s).T for symmetric per-row 8-bit codes."""
        w = self.weight_spec
        return w.bits == 8 and w.symmetric and w.granularity == "channel" and self.qweight.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake_quantize(x, self.act_spec)  # (B, T, in): one scale per token, as in training
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.use_int8_kernel and x.dtype == torch.float32:
            flat = x.reshape(-1, self.in_features)  # (B*T, in)
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scales.reshape(-1).float())  # (B*T, out)
            y = y.reshape(*x.shape[:-1], self.out_features) + (0 if bias is None else bias)
        else:
            y = F.linear(x, self._weight_for(x.dtype), bias)  # (B, T, out): cached or dequantized on the fly
        return fake_quantize(y, self.out_spec)  # k_proj/v_proj: the quantized KV values

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.weight_spec.bits}, "
            f"a_bits={min(self.act_spec.bits, 16)}, out_bits={min(self.out_spec.bits, 16)}, "
            f"cached={self.cached_weight is not None}"
        )


class QuantizedEmbedding(_PackedWeight):
    """Embedding table of integer rows: only the looked-up rows are unpacked and dequantized.

    After `cache_dequantized` the whole table is dequantized once and looked up like `nn.Embedding`
    (dequantization is elementwise, so the rows are the same values).
    """

    def __init__(self, shape, weight_spec, qweight, scales, zeros, padding_idx=None) -> None:
        super().__init__(shape, weight_spec, qweight, scales, zeros)
        self.num_embeddings, self.embedding_dim = self.shape
        self.padding_idx = padding_idx
        self.out_dtype = torch.float32

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (V, H) table, for code that inspects embeddings (used in forward only when cached)."""
        return self._weight_for(self.out_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        cached = self.cached_weight
        if cached is not None and cached.dtype == self.out_dtype:
            return F.embedding(ids, cached)  # (B, T, H)
        rows = self.qweight[ids]  # (B, T, packed H)
        codes = unpack_codes(rows, self.weight_spec.bits, (*ids.shape, self.embedding_dim), self.weight_spec.symmetric)
        scales = self.scales.reshape(self.num_embeddings, 1)[ids].float()  # (B, T, 1): one scale per row
        zeros = None if self.zeros is None else self.zeros.reshape(self.num_embeddings, 1)[ids].float()
        return dequantize(codes, scales, zeros, self.weight_spec).to(self.out_dtype)  # (B, T, H)


def read_export_meta(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """quant_config.json of an export, after checking the format version and (if `verify`) the sha256."""
    path = Path(path)
    meta_path = path / QUANT_CONFIG_FILE
    if not meta_path.is_file():
        raise ValueError(f"{path} is not a qat-lightning export: {QUANT_CONFIG_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is corrupted (not valid JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: export format {got!r} is not supported (this loader reads {FORMAT_VERSION!r})")
    st = path / meta.get("safetensors_file", SAFETENSORS_FILE)
    if not st.is_file():
        raise ValueError(f"{path}: {st.name} is missing")
    if verify and sha256_file(st) != meta.get("sha256"):
        raise ValueError(f"{st} is corrupted or was modified: its sha256 does not match quant_config.json")
    return meta


def _take(tensors: dict, key: str, shape: tuple | None, dtype: torch.dtype | None, where: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"export is missing tensor {key!r} ({where})")
    t = tensors.pop(key)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)} ({where})")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"tensor {key!r} has dtype {t.dtype}, expected {dtype} ({where})")
    return t


def _quantized_parts(tensors: dict, name: str, shape: tuple[int, int], spec: QuantSpec) -> tuple:
    """(qweight, scales, zeros) of module `name`, shape-checked against the model config."""
    if spec.bits <= 4:
        qshape, qdtype = packed_shape(shape), torch.uint8
    else:
        qshape, qdtype = shape, (torch.int8 if spec.symmetric else torch.uint8)
    out, inp = shape
    sshape = {"channel": (out, 1), "tensor": (1, 1), "group": (out, inp // (spec.group_size or 1), 1)}.get(
        spec.granularity
    )
    where = f"module {name} of shape {shape}"
    q = _take(tensors, f"{name}.qweight", qshape, qdtype, where)
    s = _take(tensors, f"{name}.scales", sshape, None, where)
    z = None if spec.symmetric else _take(tensors, f"{name}.zeros", sshape, torch.uint8, where)
    return q, s, z


def load_exported(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    int8_kernel: bool = False,
    weights: str = "packed",
) -> nn.Module:
    """Rebuild the exported student as a HF causal LM with integer weights.

    Args:
        path: an export folder written by `export_student`.
        device: where to put the model.
        dtype: compute dtype of activations and of the parameters kept in full precision.
        int8_kernel: use `torch._weight_int8pack_mm` (CPU, fp32) for symmetric per-row 8-bit weights instead
            of dequantizing; same math, different summation order (~1e-6 relative). Off by default.
        weights: "packed" (default): keep only the integer codes and dequantize in every forward (memory at
            the packed size, slow decode). "dequantized": also dequantize every quantized linear and
            embedding once, after moving to `device`, into a `dtype` buffer (memory of the FP weights,
            FP-model matmuls, logits identical to "packed"); a quantized lm_head that shares the
            embedding's codes shares its dequantized table too. Layers on the int8 kernel are not cached.

    Returns:
        The model in eval mode, with `model.quant_config` (a `QuantConfig`, or None) and `model.export_meta`.

    Raises:
        ValueError: wrong format version, sha256 mismatch (corrupted/truncated file), missing or extra
            tensors, or tensors whose shapes disagree with config.json.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    path = Path(path)
    meta = read_export_meta(path)
    try:
        tensors = load_file(str(path / meta["safetensors_file"]))
    except SafetensorError as e:
        raise ValueError(f"{path}: cannot read {meta['safetensors_file']}: {e}") from None
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    built: dict[str, _PackedWeight] = {}
    entries = sorted(meta["modules"].items(), key=lambda kv: "alias" in kv[1])  # aliases after their source
    for name, entry in entries:
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"export has quantized module {name!r} that config.json's model does not have") from None
        expected = tuple(current.weight.shape)
        if tuple(entry["shape"]) != expected:
            raise ValueError(f"module {name}: export shape {tuple(entry['shape'])} != model config shape {expected}")
        wspec = _spec(entry["weight"])
        if entry["kind"] == "embedding":
            parts = _quantized_parts(tensors, name, expected, wspec)
            new = QuantizedEmbedding(expected, wspec, *parts, entry["padding_idx"])
            new.out_dtype = dtype
        elif entry["weight"] is None:  # weight kept FP, activations/outputs still quantized
            new = QuantLinear(
                expected[1],
                expected[0],
                bias=entry["bias"],
                act_spec=_spec(entry["act"]),
                out_spec=_spec(entry["out"]),
                dtype=dtype,
            )
            new.weight.data.copy_(_take(tensors, f"{name}.weight", expected, None, f"module {name}"))
            if entry["bias"]:
                new.bias.data.copy_(_take(tensors, f"{name}.bias", (expected[0],), None, f"module {name}"))
        else:
            if "alias" in entry:
                src = built.get(entry["alias"])
                if src is None:
                    raise ValueError(f"module {name} shares codes with {entry['alias']!r}, which is not in the export")
                parts = (src.qweight, src.scales, src.zeros)
            else:
                parts = _quantized_parts(tensors, name, expected, wspec)
            bias = _take(tensors, f"{name}.bias", (expected[0],), None, f"module {name}") if entry["bias"] else None
            bias = None if bias is None else bias.to(dtype)
            new = QuantizedLinear(expected, wspec, *parts, bias, _spec(entry["act"]), _spec(entry["out"]))
        if isinstance(new, QuantizedLinear):
            new.use_int8_kernel = int8_kernel and new.int8_kernel_ok
        built[name] = new
        model.set_submodule(name, new)

    # everything else: FP parameters and persistent buffers, matched against the rebuilt model
    expected_fp = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(f"{n}." for n in built))}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in expected_fp if k not in tensors and not (tied and k.endswith("lm_head.weight"))]
    if missing:
        raise ValueError(f"export is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(tensors) - set(expected_fp))
    if unexpected:
        raise ValueError(f"export has tensor(s) the model does not use: {unexpected[:5]}")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(expected_fp[k].shape):
            want = tuple(expected_fp[k].shape)
            raise ValueError(f"tensor {k!r} has shape {tuple(t.shape)}, config.json expects {want}")
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, strict=False)
    if tied and "lm_head" not in built:
        model.tie_weights()

    _attach_kv(model, meta.get("kv") or {})
    from qat_lightning.rotate import attach_online_rotations

    attach_online_rotations(model)  # R3/R4 recorded in config.json (a no-op for unrotated models)
    qcfg = meta.get("quant_config")
    model.quant_config = QuantConfig(**qcfg) if qcfg else None
    model.export_meta = meta
    model = model.to(device).eval()
    if weights == "dequantized":
        _cache_weights(built, entries, dtype)
    return model


def _attach_kv(model: nn.Module, kv: dict[str, dict]) -> None:
    """Give the rebuilt model the KV quantizers the student had (same specs, same placement)."""
    if not kv:
        return
    from qat_lightning.quant.kv import attach_kv_quantizers

    placements = {entry["placement"] for entry in kv.values()}
    if len(placements) != 1:
        raise ValueError(f"export mixes KV placements {sorted(placements)}; one model has one")
    off = QuantSpec(bits=16)

    def specs(attn: str) -> tuple[QuantSpec, QuantSpec]:
        entry = kv.get(attn)
        return (off, off) if entry is None else (_spec(entry["k"]) or off, _spec(entry["v"]) or off)

    attach_kv_quantizers(model, specs, placements.pop())


def _cache_weights(built: dict[str, _PackedWeight], entries: list, dtype: torch.dtype) -> None:
    """Dequantize each packed module once (aliases reuse their source's table: same codes, same values)."""
    for name, entry in entries:  # aliases come after their source
        mod = built[name]
        if not isinstance(mod, _PackedWeight) or getattr(mod, "use_int8_kernel", False):
            continue
        src = built.get(entry.get("alias", ""))
        shared = src.cached_weight if src is not None and src.weight_spec == mod.weight_spec else None
        mod.cache_dequantized(dtype, shared if shared is not None and shared.dtype == dtype else None)
