"""Write a trained fake-quant student as real integers: packed codes + scales in one safetensors file.

The codes come from the same quantizer as training (`quantize_to_int`, with the learned LSQ step when
there is one), so `dequantize(codes, scale)` is exactly the weight the student used in its forward
(up to the rounding of scales to `scale_dtype`). Layout and metadata: docs/EXPORT_FORMAT.md.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from qat_lightning.atomic import atomic_dir
from qat_lightning.export.config import FLOAT_DTYPES, FORMAT_VERSION
from qat_lightning.export.pack import is_packed, pack_codes
from qat_lightning.quant import QuantEmbedding, QuantLinear, QuantSpec, quantize_to_int

__all__ = ["SAFETENSORS_FILE", "QUANT_CONFIG_FILE", "export_student", "sha256_file", "spec_to_dict"]

SAFETENSORS_FILE = "model.safetensors"
QUANT_CONFIG_FILE = "quant_config.json"


def spec_to_dict(spec: QuantSpec | None) -> dict | None:
    """JSON form of a spec; None when the tensor is not quantized."""
    return dataclasses.asdict(spec) if spec is not None and spec.enabled else None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _kv_entries(student: nn.Module) -> dict[str, dict]:
    """The KV quantizer of each attention block: {attention name: {"k", "v" (spec dicts), "placement"}}."""
    from qat_lightning.quant.kv import iter_kv_quantizers

    return {name.rsplit(".", 1)[0]: {"k": spec_to_dict(q.k_spec), "v": spec_to_dict(q.v_spec),
                                     "placement": q.placement}
            for name, q in iter_kv_quantizers(student)}


def _dtype(name: str) -> torch.dtype:
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {name!r}")
    return getattr(torch, name)


def _quantized_tensors(
    name: str, weight: torch.Tensor, spec: QuantSpec, lsq_scale: torch.Tensor | None, scale_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """`<name>.qweight` (packed codes), `<name>.scales` and, when asymmetric, `<name>.zeros` (uint8)."""
    w = weight.detach().float()  # (out, in); fp32 so codes match an fp32 student exactly
    scale = None if lsq_scale is None else lsq_scale.detach().float()
    q, scale, zero = quantize_to_int(w, spec, scale=scale)  # q: (out, in); scale: (out, 1) | (out, G, 1) | (1, 1)
    out = {f"{name}.qweight": pack_codes(q, spec.bits), f"{name}.scales": scale.to(scale_dtype).contiguous()}
    if not spec.symmetric:
        out[f"{name}.zeros"] = zero.to(torch.uint8).contiguous()  # integers 0..2^b-1
    return out


def _module_entry(kind: str, weight: torch.Tensor, wspec: QuantSpec | None, **specs: QuantSpec | None) -> dict:
    return {
        "kind": kind,
        "shape": list(weight.shape),
        "weight": spec_to_dict(wspec),
        "packed": bool(wspec is not None and wspec.enabled and is_packed(wspec.bits)),
        **{k: spec_to_dict(s) for k, s in specs.items()},
    }


def _fp16_bytes(model: nn.Module) -> int:
    """Bytes of the same model stored all-fp16: each parameter once (tied ones once), LSQ steps excluded."""
    seen, n = set(), 0
    for pname, p in model.named_parameters(remove_duplicate=False):
        if pname.endswith("weight_scale") or id(p) in seen:
            continue
        seen.add(id(p))
        n += p.numel()
    return 2 * n


def export_student(
    student: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    extra_meta: dict | None = None,
    scale_dtype: str = "float16",
    fp_dtype: str = "float16",
) -> dict[str, Any]:
    """Export every quantized module of `student` as integer codes + scales, everything else as floats.

    Args:
        student: a model from `quantize_model` (trained or not); its `quant_config` is recorded.
        out_dir: target folder; written to a temp folder beside it then renamed, so a half-written export
            never looks complete. An existing folder there is replaced.
        tokenizer: saved with `save_pretrained` when given.
        extra_meta: JSON-serialisable values recorded under "extra" in quant_config.json.
        scale_dtype: dtype of stored scales (fp16 by default: half the bytes; the loader decodes with them).
        fp_dtype: dtype of parameters kept in full precision (embeddings, norms, lm_head, biases).

    Returns:
        Stats: size_bytes (model.safetensors), fp16_size_bytes (same model all-fp16), ratio,
        embedding_bytes (input embedding + lm_head as stored), num_packed_linears, num_quantized_linears.
    """
    sdt, fdt = _dtype(scale_dtype), _dtype(fp_dtype)
    config = getattr(student, "config", None)
    if config is None:
        raise ValueError("export_student needs a HF model with a .config (from quantize_model)")
    qcfg = getattr(student, "quant_config", None)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    covered: set[str] = set()  # state-dict keys written in quantized form
    stats = {"num_packed_linears": 0, "num_quantized_linears": 0}

    emb = student.get_input_embeddings()
    head = student.get_output_embeddings()
    for name, m in student.named_modules():
        if isinstance(m, QuantLinear):
            wspec = m.weight_spec if m.weight_spec.enabled else None
            entry = _module_entry("linear", m.weight, wspec, act=m.act_spec, out=m.out_spec)
            entry.update(bias=m.bias is not None, lsq=m.weight_scale is not None)
            covered.add(f"{name}.weight_scale")
            if wspec is not None:
                tensors.update(_quantized_tensors(name, m.weight, wspec, m.weight_scale, sdt))
                covered.add(f"{name}.weight")
                stats["num_packed_linears"] += entry["packed"]
            stats["num_quantized_linears"] += any(s is not None for s in (wspec, entry["act"], entry["out"]))
            modules[name] = entry
        elif isinstance(m, QuantEmbedding) and m.weight_spec.enabled:
            modules[name] = _module_entry("embedding", m.weight, m.weight_spec)
            modules[name]["padding_idx"] = m.padding_idx
            tensors.update(_quantized_tensors(name, m.weight, m.weight_spec, None, sdt))
            covered.add(f"{name}.weight")

    # lm_head quantized from a copy of the embedding it was tied to: store the codes once.
    out_cfg = copy.deepcopy(config)
    if hasattr(out_cfg, "quantization_config"):  # e.g. the GGUF one of a converted SmolLM2: not this format's
        del out_cfg.quantization_config
    emb_name = next(n for n, mod in student.named_modules() if mod is emb)
    head_name = next((n for n, mod in student.named_modules() if mod is head), None)
    if (
        head_name in modules
        and emb_name in modules
        and modules[head_name]["weight"] == modules[emb_name]["weight"]
        and not modules[head_name]["lsq"]
        and torch.equal(head.weight, emb.weight)
    ):
        for suffix in ("qweight", "scales", "zeros"):
            tensors.pop(f"{head_name}.{suffix}", None)
        modules[head_name]["alias"] = emb_name
    if emb_name in modules and head is not None and head.weight is emb.weight:
        out_cfg.tie_word_embeddings = False  # embedding quantized, lm_head kept FP: two different tensors

    seen: dict[int, str] = {}
    for key, t in student.state_dict(keep_vars=True).items():
        if key in covered or t is None:
            continue
        if id(t) in seen:  # tied parameters (lm_head = embedding): stored once
            continue
        seen[id(t)] = key
        tensors[key] = t.detach().to(fdt if t.is_floating_point() else t.dtype).contiguous()
    if out_cfg.tie_word_embeddings is False and head is not None and f"{head_name}.weight" not in tensors:
        if head_name not in modules or modules[head_name]["weight"] is None:
            tensors[f"{head_name}.weight"] = head.weight.detach().to(fdt).contiguous()

    meta = {
        "format": FORMAT_VERSION,
        "safetensors_file": SAFETENSORS_FILE,
        "sha256": None,
        "scale_dtype": scale_dtype,
        "fp_dtype": fp_dtype,
        "quant_config": dataclasses.asdict(qcfg) if dataclasses.is_dataclass(qcfg) else None,
        "setting": getattr(qcfg, "setting", None),
        "modules": modules,
        "kv": _kv_entries(student),
        "extra": extra_meta or {},
    }

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        st_path = tmp / SAFETENSORS_FILE
        save_file(tensors, str(st_path), metadata={"format": FORMAT_VERSION})
        meta["sha256"] = sha256_file(st_path)
        (tmp / QUANT_CONFIG_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        out_cfg.to_json_file(str(tmp / "config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    size = (out_dir / SAFETENSORS_FILE).stat().st_size
    fp16 = _fp16_bytes(student)
    if "alias" in modules.get(head_name or "", {}) and head.weight is not emb.weight:
        fp16 -= 2 * head.weight.numel()  # quantize_model untied a tied lm_head only to quantize it
    emb_keys = [k for k in tensors if k.startswith((f"{emb_name}.", f"{head_name}."))]
    stats.update(
        size_bytes=size,
        fp16_size_bytes=fp16,
        ratio=size / fp16,
        embedding_bytes=sum(tensors[k].numel() * tensors[k].element_size() for k in emb_keys),
    )
    return stats
