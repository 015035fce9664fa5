"""Write a student (or the FP teacher) as a GGUF file that llama.cpp runs: `export_gguf`.

Why: llama.cpp is the engine that actually runs Q4_0 weights, Q8_0 activations and a 4-bit KV cache on
CPUs. A student trained with the "ggml" estimator (quant=q4_0 / q8_0) holds exactly llama.cpp's blocks,
so its own int codes and fp16 scales are written as they are: no second quantization, and llama.cpp
dequantizes every tensor to the student's fake-quantized weight.

Layout (what llama.cpp's convert_hf_to_gguf.py writes for the Llama architecture):

* tensor names ``token_embd``, ``blk.{i}.attn_norm|attn_q|attn_k|attn_v|attn_output|ffn_norm|ffn_gate|
  ffn_up|ffn_down``, ``output_norm``, ``output`` (absent when tied: llama.cpp then reads token_embd);
* q_proj / k_proj rows permuted (`quant.ggml.permute_rope_rows`) so llama.cpp's adjacent-pair RoPE equals
  HF's rotate-half; blocks run along the input dim, so whole quantized rows move and codes survive;
* metadata ``llama.*`` (GQA head counts, RoPE base/dims, RMSNorm eps, context length) and the tokenizer:
  copied from the source GGUF when the model came from one, else written from the HF tokenizer
  (byte-level BPE or SentencePiece);
* norms F32; other tensors the student's ggml type, or `dtype` (f16 | f32) when not quantized;
* ``blk.{i}.attn_q|attn_k|attn_v|attn_output.bias`` F32 where the module has a bias (llama.cpp's Llama reads
  them when present; key centering, `export/key_center.py`, adds attn_k's), q/k ones permuted like the rows.

The file is written to a temp name and renamed, so a crash never leaves a file that looks complete.
`check_gguf` refuses a truncated file or one that does not match a model, with a message saying which.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qat_lightning.models.adapter import adapter_for
from qat_lightning.quant import ggml

__all__ = ["GGUFError", "check_gguf", "export_gguf", "gguf_tensor_types", "read_gguf_tensor", "read_gguf_tensors"]

log = logging.getLogger("qat_lightning")

ARCH = "llama"
FLOAT_TYPES = ("f16", "f32")
_PROJ = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
# metadata copied from a source GGUF besides the tokenizer (describes the model, not its weights)
_COPIED_GENERAL = ("general.name", "general.basename", "general.finetune", "general.organization",
                   "general.size_label", "general.license", "general.languages", "general.type")


class GGUFError(ValueError):
    """A GGUF file that cannot be used: truncated, not llama, or not the model it is meant to be."""


def _gguf():
    import gguf

    return gguf


def _ggml_type(name: str):
    g = _gguf()
    return {"q4_0": g.GGMLQuantizationType.Q4_0, "q8_0": g.GGMLQuantizationType.Q8_0,
            "f16": g.GGMLQuantizationType.F16, "f32": g.GGMLQuantizationType.F32}[name]


def _check_arch(model: nn.Module) -> Any:
    config = model.config
    if config.model_type not in ("llama", "mistral"):
        raise GGUFError(f"export_gguf writes llama.cpp's Llama architecture; {config.model_type!r} is not supported")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFError("export_gguf: Llama models with attention/MLP biases are not supported")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear"):
        raise GGUFError(f"export_gguf: RoPE scaling {rope.get('rope_type')!r} is not supported (default, linear)")
    return config


def _hparams(config: Any) -> dict[str, Any]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    return {
        "n_layer": config.num_hidden_layers, "n_embd": config.hidden_size, "n_ff": config.intermediate_size,
        "n_head": heads, "n_head_kv": config.num_key_value_heads or heads, "head_dim": head_dim,
        "eps": float(config.rms_norm_eps), "rope_theta": adapter_for(config).rope_theta,
        "n_ctx": config.max_position_embeddings, "rope": rope,
    }


def _is_tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is emb.weight


def _module_type(module: nn.Module, dtype: str) -> str:
    """The GGUF type of a weight module: its ggml spec's type, `dtype` when it is not quantized."""
    spec = getattr(module, "weight_spec", None)
    if spec is None or not spec.enabled or not getattr(module, "quant_enabled", True):
        return dtype
    if spec.ggml_type is None:
        raise GGUFError(
            f"{type(module).__name__} weight spec {spec.bits}-bit {spec.estimator}/{spec.granularity} is not a "
            "llama.cpp format: train with quant=q4_0 (or q8_0), or export with export.format=native"
        )
    return spec.ggml_type


def _learned_scale(module: nn.Module) -> torch.Tensor | None:
    """The learned block scales (out, in/32, 1) of an LSQ ggml weight, None for the format's own ``d``."""
    d = getattr(module, "weight_scale", None)
    return None if d is None else d.detach().float().cpu()


def _tensor_data(
    weight: torch.Tensor, qtype: str, n_rope_heads: int | None, d: torch.Tensor | None = None
) -> np.ndarray:
    """numpy data for GGUFWriter: uint8 block bytes (rows, row_bytes) or float (rows, cols); rows permuted for q/k.

    `d`: learned block scales (LSQ) of a ggml type; the codes are then the ones the student's forward rounded to
    under them. Float types ignore it.
    """
    w = weight.detach().float().cpu()  # (out, in)
    if qtype in ggml.GGML_TYPES:
        codes, d16 = ggml.quantize_blocks(w, qtype, d=d)  # (out, in/32, 32), (out, in/32, 1): the student's own grid
        data = ggml.pack_blocks(codes, d16, qtype)  # (out, in/32 * block bytes)
    else:
        data = w.to(torch.float16 if qtype == "f16" else torch.float32)
    if n_rope_heads is not None:
        data = ggml.permute_rope_rows(data, n_rope_heads)
    return data.contiguous().numpy()


def _iter_tensors(model: nn.Module, hp: dict, dtype: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """(GGUF name, data, type) of every tensor, in llama.cpp's order."""
    emb = model.get_input_embeddings()
    emb_type = _module_type(emb, dtype)
    yield "token_embd.weight", _tensor_data(emb.weight, emb_type, None), emb_type
    for i, layer in enumerate(model.model.layers):
        for attr, gname in _NORMS.items():
            yield f"blk.{i}.{gname}.weight", getattr(layer, attr).weight.detach().float().cpu().numpy(), "f32"
        for path, gname in _PROJ.items():
            module = layer.get_submodule(path)
            qtype = _module_type(module, dtype)
            n_rope = hp["n_head"] if gname == "attn_q" else hp["n_head_kv"] if gname == "attn_k" else None
            yield f"blk.{i}.{gname}.weight", _tensor_data(module.weight, qtype, n_rope, _learned_scale(module)), qtype
            if module.bias is not None:  # llama.cpp adds attn_q/k/v/output biases (key centering writes attn_k's)
                if gname.startswith("ffn_"):
                    raise GGUFError(f"export_gguf: llama.cpp's Llama has no {gname} bias (layer {i})")
                bias = module.bias.detach().float().cpu()  # (out,): rows permuted like the weight's
                yield f"blk.{i}.{gname}.bias", (ggml.permute_rope_rows(bias, n_rope) if n_rope else bias).numpy(), "f32"
    yield "output_norm.weight", model.model.norm.weight.detach().float().cpu().numpy(), "f32"
    if not _is_tied(model):
        head = model.get_output_embeddings()
        qtype = _module_type(head, dtype)
        yield "output.weight", _tensor_data(head.weight, qtype, None, _learned_scale(head)), qtype


def _file_type(counts: Counter) -> int:
    """general.file_type: the type of most 2-D tensors (llama.cpp's "mostly" convention)."""
    g = _gguf()
    main = max(((t, n) for t, n in counts.items() if t != "f32"), key=lambda x: x[1], default=("f32", 0))[0]
    return {"q4_0": g.LlamaFileType.MOSTLY_Q4_0, "q8_0": g.LlamaFileType.MOSTLY_Q8_0,
            "f16": g.LlamaFileType.MOSTLY_F16, "f32": g.LlamaFileType.ALL_F32}[main]


@functools.lru_cache(maxsize=4)
def _source_fields(path: str, mtime_ns: int) -> tuple[tuple[str, tuple, Any], ...]:
    """(name, value types, value) of the fields of a GGUF worth copying; parsed once per file version."""
    reader = _gguf().GGUFReader(path)
    keep = [(n, f) for n, f in reader.fields.items() if n.startswith("tokenizer.") or n in _COPIED_GENERAL]
    return tuple((n, tuple(f.types), f.contents()) for n, f in keep)


def _tokenizer_from_gguf(writer: Any, source: Path, vocab_size: int, skip_name: bool = False) -> None:
    """Copy tokenizer.* (and descriptive general.*) fields of the GGUF the model came from."""
    g = _gguf()
    fields = _source_fields(str(source.resolve()), source.stat().st_mtime_ns)
    tokens = next((v for n, _, v in fields if n == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise GGUFError(f"{source} has no tokenizer to copy")
    if len(tokens) != vocab_size:
        raise GGUFError(f"{source} has {len(tokens)} tokens but the model's vocab is {vocab_size}: not its source")
    for name, types, value in fields:
        if skip_name and name == "general.name":
            continue
        if types[0] == g.GGUFValueType.ARRAY:
            writer.add_key_value(name, value, g.GGUFValueType.ARRAY, sub_type=types[-1])
        else:
            writer.add_key_value(name, value, types[0])


def _tokenizer_from_hf(writer: Any, tokenizer: Any, vocab_size: int, pre: str | None) -> None:
    """Write the vocabulary of a HF tokenizer: byte-level BPE ("gpt2") or SentencePiece ("llama")."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model_json = json.loads(backend.to_str())["model"] if backend is not None else {}
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if model_json.get("type") == "BPE" and not model_json.get("byte_fallback"):
        _bpe_vocab(writer, tokenizer, model_json, vocab_size)
        if pre is None:
            log.warning("export_gguf: no tokenizer.ggml.pre given; llama.cpp will use its 'default' pre-tokenizer")
        writer.add_tokenizer_pre(pre or "default")
    elif vocab_file and Path(vocab_file).is_file():
        _spm_vocab(writer, tokenizer, Path(vocab_file), vocab_size)
    else:
        raise GGUFError(
            f"export_gguf cannot write the tokenizer {type(tokenizer).__name__} (llama.cpp needs byte-level BPE or "
            "SentencePiece): pass source_gguf= the GGUF the model came from, or use a real tokenizer (tiny models: "
            "model.tokenizer=smollm2)"
        )
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None and 0 <= int(tid) < vocab_size:
            getattr(writer, f"add_{kind}_token_id")(int(tid))
    for kind in ("bos", "eos"):
        flag = getattr(tokenizer, f"add_{kind}_token", None)
        if isinstance(flag, bool):
            getattr(writer, f"add_add_{kind}_token")(flag)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def _token_types(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types (normal, control for special, user-defined, unused padding)."""
    g = _gguf()
    added = {int(i): tok for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i < len(tokenizer):
            tokens.append(tokenizer.convert_ids_to_tokens(i))
            if i in added:
                types.append(g.TokenType.CONTROL if added[i].special else g.TokenType.USER_DEFINED)
            else:
                types.append(g.TokenType.NORMAL)
        else:  # the model has more embeddings than the tokenizer has tokens
            tokens.append(f"[PAD{i}]")
            types.append(g.TokenType.UNUSED)
    return tokens, types


def _bpe_vocab(writer: Any, tokenizer: Any, model_json: dict, vocab_size: int) -> None:
    tokens, types = _token_types(tokenizer, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_json.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def _spm_vocab(writer: Any, tokenizer: Any, vocab_file: Path, vocab_size: int) -> None:
    import sentencepiece

    g = _gguf()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(vocab_file))
    tokens, types = _token_types(tokenizer, vocab_size)
    scores = [0.0] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (g.TokenType.UNKNOWN if sp.is_unknown(i) else g.TokenType.CONTROL if sp.is_control(i)
                    else g.TokenType.UNUSED if sp.is_unused(i) else g.TokenType.BYTE if sp.is_byte(i)
                    else g.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    out_path: str | os.PathLike,
    *,
    source_gguf: str | os.PathLike | None = None,
    dtype: str = "f16",
    name: str | None = None,
    tokenizer_pre: str | None = None,
) -> dict[str, Any]:
    """Write `model` as a llama.cpp GGUF file at `out_path` (atomically); returns stats.

    Args:
        model: a Llama-family HF causal LM: a student of quant=q4_0/q8_0 (its tensors are written in their
            ggml types, codes as they are) or a plain model (the teacher: every 2-D tensor in `dtype`).
        tokenizer: the model's HF tokenizer (written when there is no `source_gguf`).
        source_gguf: the GGUF the model was converted from (e.g. `models.smollm2_gguf_path()`): its
            tokenizer and descriptive metadata are copied verbatim.
        dtype: "f16" | "f32", the type of tensors that are not quantized (norms are always F32).
        name: general.name (default: the source's, else the model's name_or_path).
        tokenizer_pre: llama.cpp's pre-tokenizer name for a HF BPE tokenizer (e.g. "smollm", "llama-bpe").

    Returns:
        {"path", "file_size_bytes", "tensor_bytes", "n_tensors", "tensor_types" ({type: count}),
         "file_type", "tied", "seconds"}.

    Raises:
        GGUFError: not a Llama-family model, a quantizer llama.cpp has no format for, or no writable tokenizer.
    """
    g = _gguf()
    rec = getattr(getattr(model, "config", None), "qat_rotation", None) or {}
    if rec.get("r3") or rec.get("r4"):  # online rotations: llama.cpp would silently run another function
        raise GGUFError("the model has online rotations (R3/R4), which llama.cpp cannot run: export R1+R2 only")
    if dtype not in FLOAT_TYPES:
        raise GGUFError(f"dtype must be one of {FLOAT_TYPES}, got {dtype!r}")
    t0 = time.perf_counter()
    config = _check_arch(model)
    hp = _hparams(config)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")

    tensors = list(_iter_tensors(model, hp, dtype))
    counts = Counter(t for _, _, t in tensors)
    writer = g.GGUFWriter(tmp, ARCH)
    try:
        if source_gguf is not None:
            _tokenizer_from_gguf(writer, Path(source_gguf), vocab_size, skip_name=name is not None)
        if name is not None or source_gguf is None:
            writer.add_name(name or str(getattr(config, "name_or_path", "") or "qat-lightning student"))
        writer.add_context_length(hp["n_ctx"])
        writer.add_embedding_length(hp["n_embd"])
        writer.add_block_count(hp["n_layer"])
        writer.add_feed_forward_length(hp["n_ff"])
        writer.add_head_count(hp["n_head"])
        writer.add_head_count_kv(hp["n_head_kv"])
        writer.add_rope_freq_base(hp["rope_theta"])
        writer.add_layer_norm_rms_eps(hp["eps"])
        writer.add_rope_dimension_count(hp["head_dim"])
        if hp["head_dim"] != hp["n_embd"] // hp["n_head"]:
            writer.add_key_length(hp["head_dim"])
            writer.add_value_length(hp["head_dim"])
        if hp["rope"].get("rope_type", hp["rope"].get("type")) == "linear":
            writer.add_rope_scaling_type(g.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(hp["rope"]["factor"]))
        writer.add_vocab_size(vocab_size)
        writer.add_file_type(_file_type(counts))
        writer.add_quantization_version(g.GGML_QUANT_VERSION)
        if source_gguf is None:
            _tokenizer_from_hf(writer, tokenizer, vocab_size, tokenizer_pre)
        for tname, data, qtype in tensors:
            writer.add_tensor(tname, data, raw_dtype=_ggml_type(qtype) if qtype in ggml.GGML_TYPES else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return {
        "path": str(out_path),
        "file_size_bytes": out_path.stat().st_size,
        "tensor_bytes": int(sum(d.nbytes for _, d, _ in tensors)),
        "n_tensors": len(tensors),
        "tensor_types": dict(sorted(counts.items())),
        "file_type": int(_file_type(counts)),
        "tied": _is_tied(model),
        "seconds": time.perf_counter() - t0,
    }


def check_gguf(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, Any]:
    """Open `path` and refuse it, with the reason, when it is truncated, not llama, or not `model`'s.

    Returns {"arch", "n_layer", "n_embd", "n_head", "n_head_kv", "vocab_size", "tensor_types"} of the file.
    """
    g = _gguf()
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    try:
        reader = g.GGUFReader(path)
    except Exception as err:  # the header or metadata runs past the end, or it is not GGUF at all
        raise GGUFError(f"{path} is not a readable GGUF file ({size} bytes; truncated or corrupt): {err}") from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise GGUFError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}; export it again")

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    info = {
        "arch": arch,
        "n_layer": value(f"{arch}.block_count"),
        "n_embd": value(f"{arch}.embedding_length"),
        "n_head": value(f"{arch}.attention.head_count"),
        "n_head_kv": value(f"{arch}.attention.head_count_kv"),
        "vocab_size": len(tokens.data) if (tokens := reader.fields.get("tokenizer.ggml.tokens")) else None,
        "tensor_types": dict(Counter(t.tensor_type.name.lower() for t in reader.tensors)),
    }
    if model is not None:
        hp = _hparams(_check_arch(model))
        want = {"arch": ARCH, "n_layer": hp["n_layer"], "n_embd": hp["n_embd"], "n_head": hp["n_head"],
                "n_head_kv": hp["n_head_kv"], "vocab_size": model.get_input_embeddings().weight.shape[0]}
        bad = [f"{k}: file {info[k]!r}, model {v!r}" for k, v in want.items() if info[k] != v]
        if bad:
            raise GGUFError(f"{path} does not match the model ({'; '.join(bad)})")
    return info


def read_gguf_tensors(
    path: str | os.PathLike, names: list[str] | None = None, *, unpermute: bool = True
) -> dict[str, torch.Tensor]:
    """Tensors of a GGUF file (all, or `names`) dequantized to float32 in HF's layout (q/k rows un-permuted).

    What llama.cpp computes with; tests compare it with the student's fake-quantized weights.
    """
    g = _gguf()
    reader = g.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    missing = [n for n in names or [] if n not in by_name]
    if missing:
        raise KeyError(f"{path} has no tensor(s) {missing}")
    arch = reader.fields["general.architecture"].contents()
    heads = {k: int(reader.fields[f"{arch}.attention.{k}"].contents()) for k in ("head_count", "head_count_kv")}
    out = {}
    for name in names or list(by_name):
        t = by_name[name]
        w = np.asarray(g.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = torch.from_numpy(w.reshape([int(n) for n in reversed(t.shape)]).copy())
        if unpermute and name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            w = ggml.unpermute_rope_rows(w, heads["head_count" if ".attn_q." in name else "head_count_kv"])
        out[name] = w
    return out


def read_gguf_tensor(path: str | os.PathLike, name: str, *, unpermute: bool = True) -> torch.Tensor:
    """One tensor of `read_gguf_tensors`."""
    return read_gguf_tensors(path, [name], unpermute=unpermute)[name]


def gguf_tensor_types(path: str | os.PathLike) -> dict[str, str]:
    """{tensor name: type name} of a GGUF file (e.g. "blk.0.attn_q.weight": "q4_0")."""
    g = _gguf()
    return {t.name: t.tensor_type.name.lower() for t in g.GGUFReader(path).tensors}
