"""Write a student as a compressed-tensors checkpoint (what transformers and vLLM load): `export_compressed_tensors`.

The student's own integer codes and scales are written (`quantize_to_int`, the learned LSQ step when there is
one), packed and described by the compressed-tensors library itself (its compressors and `QuantizationConfig`),
so the checkpoint's dequantized weights are the student's fake-quantized weights, not a second quantization.
What is expressible, and why the rest is refused, is in docs/COMPRESSED_TENSORS.md:

============  ===================================================  ======================================
setting       what is written                                      compressed-tensors format
============  ===================================================  ======================================
W4A16/W8A16   int4/int8 symmetric weights per output channel or    ``pack-quantized`` (int32 words)
              per group; activations not quantized
W8A8          int8 symmetric weights per output channel, dynamic   ``int-quantized`` (int8 weights)
              symmetric int8 activations per token
============  ===================================================  ======================================

Refused (one ValueError line each): a KV cache below 8 bits (compressed-tensors' ``kv_cache_scheme`` holds
static scales; the student's cache is quantized dynamically per token), llama.cpp's "ggml" grids, 4/6-bit or
non-per-token activations, W4A8, 2/3-bit, asymmetric or per-tensor weights, quantized embeddings or lm_head,
online rotations (R3/R4). An 8-bit KV cache is left out (the engine keeps its own cache) and said so in the stats.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat_lightning.atomic import atomic_dir
from qat_lightning.quant.modules import QuantEmbedding, QuantLinear
from qat_lightning.quant.spec import DISABLED_BITS, QuantSpec

__all__ = ["FORMAT", "compressed_tensors_scheme", "export_compressed_tensors"]

log = logging.getLogger("qat_lightning")

FORMAT = "compressed-tensors"
WEIGHT_BITS = (4, 8)  # vLLM's WNA16 kernels (Marlin / machete) take uint4b8 / uint8b128 codes
EXPORT_META_FILE = "qat_export.json"
MAX_SHARD_SIZE = "5GB"
_WHY = "export.format=compressed-tensors"


@dataclass(frozen=True)
class _Setting:
    """How one linear is written: its scheme name, the compressed-tensors format and QuantizationArgs fields."""

    name: str  # "W4A16", "W8A8", ...
    format: str  # "pack-quantized" | "int-quantized"
    weights: tuple  # sorted (key, value) pairs of QuantizationArgs fields
    input_activations: tuple | None

    def key(self) -> tuple:
        return self.format, self.weights, self.input_activations


def _refuse(msg: str) -> ValueError:
    return ValueError(f"{_WHY}: {msg}")


def _ggml_refusal() -> ValueError:
    return _refuse(
        "estimator 'ggml' (llama.cpp's Q4_0/Q8_0) is not exported: its Q8_0 activation blocks and post-RoPE KV "
        "blocks have no compressed-tensors scheme, and Q4_0's signed per-block scales (codes -8..7, negative when "
        "the block's extreme is positive) fit int4 group-32 only as negative scales, which compressed-tensors' "
        "quantizers never write and vLLM is not known to serve; use export.format=gguf"
    )


def _linear_setting(w: QuantSpec, a: QuantSpec, where: str) -> _Setting | None:
    """The compressed-tensors setting of one linear with weight spec `w` and input spec `a`; None when neither
    is quantized (the layer is listed in ``ignore``). Raises ValueError (one line) when it is not expressible."""
    if not w.enabled and not a.enabled:
        return None
    if w.ggml_type is not None or a.ggml_type is not None:
        raise _ggml_refusal()
    if not w.enabled:
        raise _refuse(f"{where}: activation-only quantization (W16A{a.bits}) has no compressed-tensors scheme "
                      "vLLM serves; quantize the weights too")
    if w.bits not in WEIGHT_BITS:
        raise _refuse(f"{where}: {w.bits}-bit weights ({w.estimator}) are not exported: vLLM's compressed-tensors "
                      f"kernels take {' or '.join(map(str, WEIGHT_BITS))}-bit integer weights")
    if w.granularity not in ("channel", "group"):
        raise _refuse(f"{where}: per-{w.granularity} weight scales are not exported: vLLM's int kernels take "
                      "per-channel or per-group weight scales (quant.w_granularity=channel or group)")
    if not w.symmetric:  # the compressor packs zero points along dim 0; transformers' load expects them unpacked
        raise _refuse(f"{where}: asymmetric weights are not exported: transformers (5.24, compressed-tensors 0.20) "
                      "cannot load the packed zero points the compressor writes; train with symmetric weights")
    strategy = "group" if w.granularity == "group" else "channel"
    weights = {"num_bits": w.bits, "type": "int", "symmetric": True, "strategy": strategy,
               "group_size": w.group_size if strategy == "group" else None, "dynamic": False}
    if not a.enabled:
        return _Setting(f"W{w.bits}A16", "pack-quantized", tuple(sorted(weights.items())), None)
    if a.bits != 8:
        raise _refuse(f"{where}: {a.bits}-bit activations are not expressible as an int scheme vLLM serves "
                      "(its integer activation kernels are int8; 4-bit activations there are FP4, another grid)")
    if a.granularity != "token" or not a.symmetric or a.estimator != "minmax":
        raise _refuse(f"{where}: 8-bit activations must be symmetric MinMax per token (compressed-tensors' dynamic "
                      f"int8 scheme), got {a.granularity} symmetric={a.symmetric} estimator={a.estimator}")
    if w.bits != 8 or strategy != "channel":
        raise _refuse(f"{where}: with int8 activations the weights must be 8-bit per channel (vLLM's W8A8 int8 "
                      f"scheme; its W4A8 int path reads unpacked int4 codes, not pack-quantized ones), got "
                      f"{w.bits}-bit {w.granularity}")
    inputs = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    return _Setting("W8A8", "int-quantized", tuple(sorted(weights.items())), tuple(sorted(inputs.items())))


def _kv_check(bits: int, where: str) -> bool:
    """True when a KV cache of `bits` is left out of the checkpoint (8 bits); raises below 8 bits."""
    if bits >= DISABLED_BITS:
        return False
    if bits < 8:
        raise _refuse(f"{where}: a {bits}-bit KV cache cannot be held: compressed-tensors' kv_cache_scheme only "
                      "stores static (calibrated) scales per tensor or head, while the student's cache is quantized "
                      "dynamically per token (an engine's int4 KV cache is not in the format); set quant.kv_bits=8 "
                      "or 16, or export.format=native")
    return True


def _rotation_check(record: Any) -> None:
    rec = record or {}
    if rec.get("r3") or rec.get("r4"):
        raise _refuse("online rotations (R3/R4) are not in the format: transformers and vLLM would run another "
                      "function; rotate with R1+R2 only (methods.<init>.r3=false methods.<init>.r4=false)")


def compressed_tensors_scheme(quant_cfg: Any, rotation: Any = None) -> str:
    """The scheme(s) a student of `quant_cfg` is written as ("W4A16", "W8A8", "W4A16+W8A16", ...).

    Pure: reads the quant config only (and the rotations `rotation` names, a `config.qat_rotation` record or a
    QuaRot method), so a run refuses a bad setting at start-up. Raises ValueError with one line otherwise.
    """
    from qat_lightning.quant.api import as_quant_config

    q = as_quant_config(quant_cfg)
    if q.ggml:
        raise _ggml_refusal()
    if rotation is not None:
        _rotation_check(rotation if isinstance(rotation, dict) else
                        {"r3": getattr(rotation, "r3", False), "r4": getattr(rotation, "r4", False)})
    if q.quantize_embeddings:
        raise _refuse("quantize_embeddings: quantized embedding tables are not exported (vLLM's compressed-tensors "
                      "method quantizes linear layers)")
    if q.quantize_lm_head:
        raise _refuse("quantize_lm_head: a quantized lm_head is not exported (vLLM's LM head is an embedding-like "
                      "layer its compressed-tensors method does not quantize)")
    combos = [(q.w_bits, q.a_bits, q.kv_bits, "quant")]
    for i, o in enumerate(q.overrides):
        if o.get("skip"):
            continue
        combos.append((o.get("w_bits") or q.w_bits, o.get("a_bits") or q.a_bits, o.get("kv_bits") or q.kv_bits,
                       f"quant.overrides[{i}]"))
    names = set()
    w0, a0 = q.weight_spec(""), q.act_spec("")
    for w_bits, a_bits, kv_bits, where in combos:
        _kv_check(kv_bits, where)
        estimator = q.w_estimator or q.estimator  # as QuantConfig.weight_spec: "seq" applies to 2-bit weights only
        w = dataclasses.replace(w0, bits=w_bits, estimator=q.estimator if estimator == "seq" and w_bits != 2
                                else estimator)
        setting = _linear_setting(w, dataclasses.replace(a0, bits=a_bits), where)
        if setting is not None:
            names.add(setting.name)
    if not names:
        raise _refuse("nothing is quantized (every bit width >= 16): save the model with save_pretrained instead")
    return "+".join(sorted(names))


# ---- the student ---------------------------------------------------------------------------------
def _plan(student: nn.Module) -> tuple[list[tuple[str, QuantLinear, _Setting]], list[str], bool]:
    """(quantized linears with their settings, names of linears left in full precision, KV cache left out)."""
    from qat_lightning.quant.kv import iter_kv_quantizers

    _rotation_check(getattr(getattr(student, "config", None), "qat_rotation", None))
    head = student.get_output_embeddings()
    planned, ignore = [], []
    for name, m in student.named_modules():
        if isinstance(m, QuantEmbedding) and m.weight_spec.enabled and m.quant_enabled:
            raise _refuse(f"{name}: quantized embedding tables are not exported (quant.quantize_embeddings=false)")
        if not isinstance(m, nn.Linear):
            continue
        if not isinstance(m, QuantLinear) or not m.quant_enabled:
            ignore.append(name)
            continue
        if m.out_spec.enabled:
            raise _refuse(f"{name}: output quantization is not a compressed-tensors linear scheme")
        setting = _linear_setting(m.weight_spec, m.act_spec, name)
        if setting is not None and m is head:
            raise _refuse("quantize_lm_head: a quantized lm_head is not exported (vLLM's LM head is an "
                          "embedding-like layer its compressed-tensors method does not quantize)")
        if setting is None:
            ignore.append(name)
        else:
            planned.append((name, m, setting))
    if not planned:
        raise _refuse("the model has no quantized linear layer (a student from quantize_model is expected)")
    kv_dropped = False
    for name, kvq in iter_kv_quantizers(student):
        if kvq.quant_enabled:
            for spec in (kvq.k_spec, kvq.v_spec):
                if spec.ggml_type is not None:
                    raise _ggml_refusal()
                kv_dropped |= _kv_check(spec.bits if spec.enabled else DISABLED_BITS, name.rsplit(".", 1)[0])
    return planned, ignore, kv_dropped


def _ct_tensors(m: QuantLinear, setting: _Setting, scheme: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The module's tensors as the compressed-tensors compressor writes them, from the student's own codes."""
    from compressed_tensors.compressors import BaseCompressor

    from qat_lightning.quant.primitives import group_view, quantize_to_int

    spec = m.weight_spec
    w = m.weight.detach()
    with torch.no_grad():
        codes, scale, _ = quantize_to_int(w, spec, scale=m.weight_scale)  # the student's dtype and grid; zero point 0
    # Hand the compressor w = codes * scale in float64 (exact): its round(w / scale) gives back the student's
    # codes whatever the student's dtype (re-quantizing a bf16 fake-quantized weight could move an 8-bit code).
    weight = (group_view(codes.to(torch.float64), spec) * scale.to(torch.float64)).reshape(w.shape)
    ct_shape = (w.shape[0], scale.shape[-2]) if spec.granularity == "group" else (w.shape[0], 1)
    state = {"weight": weight, "weight_scale": scale.to(torch.float64).reshape(ct_shape)}
    out = BaseCompressor.get_value_from_registry(setting.format).compress(state, scheme)
    # the scale as the student computed it (exact when `dtype` is the student's; else rounded once to `dtype`)
    out["weight_scale"] = scale.reshape(ct_shape).to(dtype)
    return {k: v.contiguous().cpu() for k, v in out.items()}


def _config_groups(planned: list[tuple[str, QuantLinear, _Setting]]) -> dict[tuple, Any]:
    """One QuantizationScheme per distinct setting (keyed by `_Setting.key`); targets "Linear" when there is one
    (the rest is in ``ignore``), else the exact module names (vLLM matches exact names first, fused shards too)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    by_key: dict[tuple, tuple[_Setting, list[str]]] = {}
    for name, _, setting in planned:
        by_key.setdefault(setting.key(), (setting, []))[1].append(name)
    return {
        key: QuantizationScheme(
            targets=["Linear"] if len(by_key) == 1 else names,
            weights=QuantizationArgs(**dict(setting.weights)),
            input_activations=(QuantizationArgs(**dict(setting.input_activations))
                               if setting.input_activations else None),
            format=setting.format,
        )
        for key, (setting, names) in by_key.items()
    }


def _fp_tensors(student: nn.Module, covered: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every other state-dict tensor (embeddings, norms, lm_head, biases, skipped linears) in `dtype`, tied once."""
    out, seen = {}, set()
    for key, t in student.state_dict(keep_vars=True).items():
        if key in covered or t is None or id(t) in seen:
            continue
        seen.add(id(t))
        t = t.detach()
        out[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous().cpu()
    return out


def _write_safetensors(tensors: dict[str, torch.Tensor], folder: Path) -> list[str]:
    """model.safetensors, or shards of MAX_SHARD_SIZE with the index transformers and vLLM read."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD_SIZE)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return list(split.filename_to_tensors)


def export_compressed_tensors(
    student: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
) -> dict[str, Any]:
    """Write `student` (from `quantize_model`, trained or not) as a compressed-tensors checkpoint in `out_dir`.

    Args:
        student: a HF causal LM whose decoder linears are `QuantLinear`s of an expressible setting (module doc).
        out_dir: target folder; written to a temp folder beside it, then renamed (an existing one is replaced).
        tokenizer: saved with its `save_pretrained` when given (our ByteTokenizer has nothing to save).
        dtype: float dtype of the checkpoint (scales, embeddings, norms, lm_head); None: the student's. With the
            student's dtype the dequantized weights are exactly its fake-quantized ones; another dtype rounds the
            scales once (vLLM's kernels run float16 / bfloat16).

    Returns:
        Stats: path, bytes (safetensors files), fp16_bytes (the same model all-fp16), ratio, format
        ("compressed-tensors"), scheme ("W4A16", "W8A8", ...), quant_format (compressed-tensors' format),
        num_quantized_linears, kv_cache ("not quantized" | "left out: 8-bit KV not in the format").

    Raises:
        ValueError: one line saying what cannot be expressed (see `compressed_tensors_scheme`).
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    config = getattr(student, "config", None)
    if config is None:
        raise ValueError(f"{_WHY}: needs a HF model with a .config (from quantize_model)")
    planned, ignore, kv_dropped = _plan(student)
    param_dtype = next(student.parameters()).dtype
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or param_dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"{_WHY}: dtype must be a float dtype, got {dtype}")

    groups = _config_groups(planned)  # {setting key: QuantizationScheme}
    formats = {g.format for g in groups.values()}
    quant_format = formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value
    qconfig = QuantizationConfig(config_groups={f"group_{i}": g for i, g in enumerate(groups.values())},
                                 format=quant_format, ignore=ignore, quantization_status=QuantizationStatus.COMPRESSED)

    tensors: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    for name, m, setting in planned:
        tensors.update({f"{name}.{k}": v for k, v in _ct_tensors(m, setting, groups[setting.key()], dtype).items()})
        covered.update({f"{name}.weight", f"{name}.weight_scale"})
    fp = _fp_tensors(student, covered, dtype)
    tensors.update(fp)
    fp16 = 2 * (sum(t.numel() for t in fp.values() if t.is_floating_point())
                + sum(m.weight.numel() for _, m, _ in planned))

    out_cfg = copy.deepcopy(config)
    for key in ("quantization_config",):  # e.g. a converted SmolLM2's GGUF one: not this checkpoint's
        if hasattr(out_cfg, key):
            delattr(out_cfg, key)
    out_cfg._attn_implementation = None  # the student's KV-quantizing wrapper is ours, not the checkpoint's
    out_cfg.dtype = dtype
    names = sorted({s.name for _, _, s in planned})
    scheme_name = "+".join(names)
    kv = "left out: 8-bit KV not in the format" if kv_dropped else "not quantized"
    if kv_dropped:
        log.warning("%s: the student's 8-bit KV cache is left out (compressed-tensors' kv_cache_scheme holds static "
                    "scales only); engines run their own cache", _WHY)
    qcfg = getattr(student, "quant_config", None)
    meta = {"format": FORMAT, "scheme": scheme_name, "quant_format": quant_format, "kv_cache": kv,
            "setting": getattr(qcfg, "setting", None),
            "quant_config": dataclasses.asdict(qcfg) if dataclasses.is_dataclass(qcfg) else None}

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        files = _write_safetensors(tensors, tmp)
        out_cfg.to_json_file(str(tmp / "config.json"))
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))  # the library writes quantization_config
        gen = getattr(student, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
        (tmp / EXPORT_META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))

    size = sum((out_dir / f).stat().st_size for f in files)
    return {"path": str(out_dir), "bytes": size, "fp16_bytes": fp16, "ratio": size / fp16, "format": FORMAT,
            "scheme": scheme_name, "quant_format": quant_format, "num_quantized_linears": len(planned),
            "kv_cache": kv}
