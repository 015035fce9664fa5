"""llama.cpp as the judge: load a GGUF through llama-cpp-python, score it on our windows, time it.

Why: a number measured in our PyTorch harness is a claim about llama.cpp; this module measures llama.cpp
itself. Perplexity uses exactly the windows of `eval.ppl` (the text tokenized once by our HF
tokenizer, non-overlapping `seq_len` windows, first token of each unpredicted), fed to llama.cpp as token
ids, so the two harnesses differ only in the engine. KL and top-1 agreement are against teacher logits
computed by PyTorch on the same windows.

llama-cpp-python is optional (the `engine` extra): importing this module works without it, calling
anything that needs the engine raises `EngineUnavailable` with how to install it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qat_lightning.export.gguf import check_gguf

__all__ = [
    "KV_TYPES",
    "EngineUnavailable",
    "engine_has_amx",
    "engine_ptq",
    "engine_types",
    "how_to_run",
    "kv_type_of",
    "kv_cache_bytes",
    "llamacpp_available",
    "llamacpp_logits",
    "llamacpp_quantize",
    "llamacpp_scores",
    "llamacpp_speed",
    "load_gguf",
    "logits_fn",
    "score_windows",
]

KV_TYPES = ("f16", "q8_0", "q4_0")
KV_TYPE_OF_BITS = {16: "f16", 8: "q8_0", 4: "q4_0"}  # llama.cpp's KV cache types by width (>= 16: f16)
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
INSTALL = (f"CMAKE_ARGS=\"-DGGML_NATIVE=ON '-DCMAKE_C_FLAGS={NO_AMX}' '-DCMAKE_CXX_FLAGS={NO_AMX}'\" "
           "pip install --no-cache-dir llama-cpp-python==0.3.36  (or: make install)")
ALLOW_AMX = "QAT_LLAMACPP_ALLOW_AMX"  # =1: load GGUFs in an AMX build anyway (where its kernels do not crash)


class EngineUnavailable(ImportError):
    """llama-cpp-python is not installed, or its build cannot run our files (AMX, see `engine_has_amx`)."""


def llamacpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as err:
        raise EngineUnavailable(f"llama.cpp's Python bindings are not installed: {INSTALL}") from err
    return llama_cpp


def engine_has_amx() -> bool:
    """Whether the installed llama.cpp was compiled with ggml's AMX kernels (its system info: AMX_INT8 = 1).

    Why: those kernels segfault on every Q4_0/Q8_0 file at the first decode on some AMX machines
    (llama.cpp#20824; a native build on this project's sandboxes), which kills the Python process with no
    message. A pip wheel cached from such a build is reused silently, so the build is checked, not trusted.
    """
    return "AMX_INT8 = 1" in _llama_cpp().llama_print_system_info().decode(errors="replace")


def _refuse_amx_build() -> None:
    if engine_has_amx() and os.environ.get(ALLOW_AMX) != "1":
        raise EngineUnavailable(
            "the installed llama.cpp was built with AMX kernels, which segfault on Q4_0/Q8_0 files on some "
            f"machines (llama.cpp#20824): rebuild it without them: {INSTALL}; or set {ALLOW_AMX}=1 to load anyway"
        )


def _ggml_type(name: str) -> int:
    lc = _llama_cpp()
    table = {"f16": lc.GGML_TYPE_F16, "f32": lc.GGML_TYPE_F32, "q8_0": lc.GGML_TYPE_Q8_0, "q4_0": lc.GGML_TYPE_Q4_0,
             "q6_k": lc.GGML_TYPE_Q6_K}
    if name not in table:
        raise ValueError(f"unknown ggml type {name!r}; expected one of {sorted(table)}")
    return table[name]


def load_gguf(
    path: str | os.PathLike,
    *,
    n_ctx: int = 512,
    kv_type: str = "f16",
    n_threads: int = 2,
    logits_all: bool = True,
    flash_attn: bool | None = None,
    model: torch.nn.Module | None = None,
) -> Any:
    """A `llama_cpp.Llama` on `path` (checked first: a truncated or mismatched file is refused clearly).

    Args:
        n_ctx: context (and batch) size: the longest window scored at once.
        kv_type: the KV cache's type, f16 | q8_0 | q4_0 (llama.cpp's -ctk/-ctv; quantized V needs flash
            attention, which is then switched on).
        n_threads: threads for decode and prompt processing (2: this project's CPU budget).
        logits_all: keep every position's logits (scoring); False for timing.
        flash_attn: None = on exactly when the KV cache is quantized.
        model: when given, the file must match its architecture (layers, widths, heads, vocab).
    """
    lc = _llama_cpp()
    if kv_type not in KV_TYPES:
        raise ValueError(f"kv_type must be one of {KV_TYPES}, got {kv_type!r}")
    check_gguf(path, model)
    _refuse_amx_build()
    fa = kv_type != "f16" if flash_attn is None else flash_attn
    return lc.Llama(
        str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
        logits_all=logits_all, flash_attn=fa, type_k=_ggml_type(kv_type), type_v=_ggml_type(kv_type),
        verbose=False,
    )


def llamacpp_logits(llm: Any, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Logits (T, V) float32 of one window of token ids, from an empty KV cache."""
    ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    if len(ids) > llm.n_ctx():
        raise ValueError(f"a window of {len(ids)} tokens does not fit n_ctx={llm.n_ctx()}")
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))  # (T, V), copied


def _windows(token_ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """(N, seq_len) windows exactly as `eval.ppl.perplexity` cuts them."""
    n = token_ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the text has {token_ids.numel()} tokens < seq_len={seq_len}: use a smaller seq_len")
    if max_windows is not None:
        n = min(n, max_windows)
    return token_ids[: n * seq_len].view(n, seq_len)


TeacherFn = Callable[[torch.Tensor], torch.Tensor]  # ids (1, T) -> logits (1, T, V)


def logits_fn(teacher: torch.nn.Module | TeacherFn | None) -> TeacherFn | None:
    """A model as a function ids (1, T) -> float32 logits (1, T, V) on the CPU, run under inference mode."""
    if teacher is None or not isinstance(teacher, torch.nn.Module):
        return teacher

    @torch.inference_mode()
    def run(ids: torch.Tensor) -> torch.Tensor:
        device = next(teacher.parameters()).device
        return teacher(input_ids=ids.to(device), use_cache=False).logits.float().cpu()

    return run


def score_windows(
    llm: Any, windows: torch.Tensor, teacher: torch.nn.Module | TeacherFn | None = None
) -> dict[str, Any]:
    """NLL / perplexity of llama.cpp on windows (N, T); with a teacher also KL(teacher‖llama.cpp) and top-1.

    Token conventions are `eval.ppl`'s (T-1 predicted tokens per window) and `eval.agreement`'s
    (KL and agreement over all T positions of each window). ``window_nll`` keeps each window's mean NLL, so
    two files scored on the same windows can be compared pair by pair (a standard error over windows).
    """
    teacher = logits_fn(teacher)
    nll_sum, kl_sum, agree, n_pos = 0.0, 0.0, 0, 0
    window_nll: list[float] = []
    for w in windows:
        logits = llamacpp_logits(llm, w)  # (T, V)
        logp = F.log_softmax(logits, dim=-1)
        nll = -logp[:-1].gather(-1, w[1:, None]).double().sum().item()
        nll_sum += nll
        window_nll.append(nll / (w.numel() - 1))
        if teacher is not None:
            t_logp = F.log_softmax(teacher(w[None])[0].float(), dim=-1)  # (T, V)
            kl_sum += (t_logp.exp() * (t_logp - logp)).sum(-1).double().sum().item()
            agree += int((t_logp.argmax(-1) == logp.argmax(-1)).sum())
            n_pos += w.numel()
    num_tokens = windows.shape[0] * (windows.shape[1] - 1)
    out: dict[str, Any] = {"nll": nll_sum / num_tokens, "num_tokens": num_tokens, "num_windows": windows.shape[0],
                           "window_nll": window_nll}
    out["ppl"] = math.exp(out["nll"])
    if teacher is not None:
        out["kl"], out["top1_agreement"] = kl_sum / n_pos, agree / n_pos
    return out


def llamacpp_scores(
    gguf_path: str | os.PathLike,
    tokenizer: Any,
    eval_cfg: Any,
    *,
    kv_type: str = "f16",
    teacher: torch.nn.Module | TeacherFn | None = None,
    n_threads: int = 2,
    model: torch.nn.Module | None = None,
) -> dict[str, float]:
    """llama.cpp's scores of a GGUF on the perplexity tasks of `eval_cfg` (an `EvalConfig` or its mapping).

    Returns ``{"<task>_ppl": ...}`` for each of wikitext2 / c4 / text in `eval_cfg.tasks` (same windows as
    `evaluate_model`), plus ``<task>_kl`` and ``<task>_top1_agreement`` against `teacher` on the first
    corpus' windows when a teacher (a model, or a function ids (1, T) -> logits (1, T, V)) is given (named
    apart from the other methods' ``kl``, which is measured on held-out generated batches). The evaluate
    stage stores them as ``evaluate/gguf/<metric>``.
    """
    from qat_lightning.eval import corpus_ids
    from qat_lightning.eval.config import EvalConfig

    cfg = eval_cfg if isinstance(eval_cfg, EvalConfig) else EvalConfig(**dict(eval_cfg))
    paths = {"wikitext2": cfg.wikitext2_path, "c4": cfg.c4_path, "text": cfg.text_path}
    tasks = [t for t in cfg.tasks if t in paths]
    llm = load_gguf(gguf_path, n_ctx=cfg.seq_len, kv_type=kv_type, n_threads=n_threads, model=model)
    metrics: dict[str, float] = {}
    try:
        for i, task in enumerate(tasks):
            windows = _windows(corpus_ids(tokenizer, task, paths[task]), cfg.seq_len, cfg.max_windows)
            result = score_windows(llm, windows, teacher if i == 0 else None)
            metrics[f"{task}_ppl"] = float(result["ppl"])
            if "kl" in result:
                metrics[f"{task}_kl"] = float(result["kl"])
                metrics[f"{task}_top1_agreement"] = float(result["top1_agreement"])
    finally:
        llm.close()
    return metrics


def llamacpp_quantize(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    ftype: str = "q4_0",
    *,
    output_type: str | None = None,
    token_embd_type: str | None = None,
    n_threads: int = 2,
) -> dict[str, Any]:
    """llama.cpp's own post-training quantization (llama-quantize) of an F16/F32 GGUF: the in-engine PTQ baseline.

    `output_type` / `token_embd_type` are llama-quantize's --output-tensor-type / --token-embedding-type
    (None: llama.cpp's choice; for Q4_0 that is Q6_K for output.weight, Q8_0 when the hidden size is not a
    multiple of 256, like SmolLM2's). Returns {"path", "file_size_bytes", "seconds"}.
    """
    lc = _llama_cpp()
    ftypes = {"q4_0": lc.LLAMA_FTYPE_MOSTLY_Q4_0, "q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0, "f16": lc.LLAMA_FTYPE_MOSTLY_F16}
    if ftype not in ftypes:
        raise ValueError(f"ftype must be one of {sorted(ftypes)}, got {ftype!r}")
    check_gguf(src)
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    params = lc.llama_model_quantize_default_params()
    params.nthread = n_threads
    params.ftype = ftypes[ftype]
    if output_type is not None:
        params.output_tensor_type = _ggml_type(output_type)
    if token_embd_type is not None:
        params.token_embedding_type = _ggml_type(token_embd_type)
    t0 = time.perf_counter()
    try:
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # llama-quantize logs every tensor to stderr
            rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) failed with code {rc}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(dst), "file_size_bytes": dst.stat().st_size, "seconds": time.perf_counter() - t0}


def kv_type_of(quant_cfg: Any) -> str:
    """llama.cpp's KV cache type (-ctk/-ctv) that runs a student of `quant_cfg` as it was trained."""
    bits = min(int(quant_cfg.kv_bits), 16)
    if bits not in KV_TYPE_OF_BITS or (bits < 16 and getattr(quant_cfg, "estimator", None) != "ggml"):
        raise ValueError(f"no llama.cpp KV cache type for kv_bits={bits} with estimator {quant_cfg.estimator!r}")
    return KV_TYPE_OF_BITS[bits]


def engine_types(quant_cfg: Any) -> tuple[str, str]:
    """llama.cpp's (file type, KV cache type) nearest a setting: the in-engine baseline of any student.

    Weights of <= 4 bits map to Q4_0, <= 8 bits to Q8_0, more to F16; the KV cache of 4 / 8 / >= 16 bits to
    q4_0 / q8_0 / f16 (llama.cpp has no other KV types, so other KV widths are refused).
    """
    w_bits, kv_bits = int(quant_cfg.w_bits), min(int(quant_cfg.kv_bits), 16)
    ftype = "q4_0" if w_bits <= 4 else "q8_0" if w_bits <= 8 else "f16"
    if kv_bits not in KV_TYPE_OF_BITS:
        raise ValueError(f"llama.cpp has no KV cache type for kv_bits={kv_bits} (it has q4_0, q8_0, f16)")
    return ftype, KV_TYPE_OF_BITS[kv_bits]


def engine_ptq(
    teacher: torch.nn.Module,
    tokenizer: Any,
    work_dir: str | os.PathLike,
    ftype: str = "q4_0",
    *,
    source_gguf: str | os.PathLike | None = None,
    output_type: str | None = None,
    token_embd_type: str | None = None,
) -> Path:
    """llama.cpp's own PTQ of the teacher: its F16 GGUF (written once) quantized by llama-quantize to `ftype`.

    Returns the quantized file (`<work_dir>/teacher-<ftype>.gguf`); both files are reused when present.
    """
    from qat_lightning.export.gguf import export_gguf

    work = Path(work_dir)
    f16 = work / "teacher-f16.gguf"
    if not f16.exists():
        export_gguf(teacher, tokenizer, f16, source_gguf=source_gguf, dtype="f16")
    if ftype == "f16":
        return f16
    out = work / f"teacher-{ftype}.gguf"
    if not out.exists():
        llamacpp_quantize(f16, out, ftype, output_type=output_type, token_embd_type=token_embd_type)
    return out


def kv_cache_bytes(n_ctx: int, n_layer: int, n_kv_heads: int, head_dim: int, kv_type: str) -> int:
    """Bytes of llama.cpp's K and V caches for `n_ctx` tokens (blocks of 32 along the head dim when quantized)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    types = {"f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
    qtype = types[kv_type]
    block, size = GGML_QUANT_SIZES[qtype]
    row = n_kv_heads * head_dim
    return 2 * n_layer * n_ctx * (row // block) * size


def llamacpp_speed(
    gguf_path: str | os.PathLike,
    *,
    kv_type: str = "f16",
    context: int = 512,
    n_gen: int = 64,
    n_threads: int = 2,
    prompt_ids: Sequence[int] | None = None,
    llm: Any = None,
) -> dict[str, float]:
    """Prompt tokens/s (one batch of `context - n_gen` tokens) and decode tokens/s (batch 1, greedy) up to `context`.

    Decode runs after the prompt, so the attention reads a cache of about `context` tokens by the end.
    Pass `llm` (from `load_gguf(..., logits_all=False)`) to time a loaded model repeatedly.
    """
    lc = _llama_cpp()
    own = llm is None
    if own:
        llm = load_gguf(gguf_path, n_ctx=context, kv_type=kv_type, n_threads=n_threads, logits_all=False)
    try:
        n_prompt = context - n_gen
        if prompt_ids is None:
            rng = np.random.default_rng(0)
            prompt_ids = rng.integers(3, llm.n_vocab(), size=n_prompt).tolist()
        prompt = [int(i) for i in prompt_ids[:n_prompt]]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t_prompt = time.perf_counter() - t0
        n_vocab = llm.n_vocab()
        tok = int(np.argmax(np.ctypeslib.as_array(lc.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))
        t0 = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([tok])
            tok = int(np.argmax(np.ctypeslib.as_array(lc.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))
        t_gen = time.perf_counter() - t0
    finally:
        if own:
            llm.close()
    return {"prompt_tokens_per_s": len(prompt) / t_prompt, "decode_tokens_per_s": n_gen / t_gen,
            "prompt_tokens": len(prompt), "decode_tokens": n_gen}


def scores_key(method: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """``evaluate/<method>/<metric>`` keys, as results.json stores the other methods."""
    return {f"evaluate/{method}/{k}": v for k, v in metrics.items()}


def how_to_run(gguf_path: str | os.PathLike, kv_type: str = "f16", n_threads: int = 2) -> str:
    """The commands that run an exported GGUF as it was trained (its KV cache type): printed after an export.

    Ollama sets the KV cache type on its server, not per model: hence the `ollama serve` line.
    """
    path = Path(gguf_path)
    kv = "" if kv_type == "f16" else f" -fa on -ctk {kv_type} -ctv {kv_type}"
    serve = "" if kv_type == "f16" else f"OLLAMA_FLASH_ATTENTION=1 OLLAMA_KV_CACHE_TYPE={kv_type} ollama serve & "
    return "\n".join([
        f"Run {path} (KV cache {kv_type}, as trained; docs/GGUF.md):",
        f"  llama.cpp:  llama-cli -m {path}{kv} -t {n_threads} -cnv",
        f"  Ollama:     {serve}ollama create qat -f {path.parent / 'Modelfile'} && ollama run qat",
        "  Python:     from qat_lightning.export.llamacpp import load_gguf; "
        f"llm = load_gguf('{path}', kv_type='{kv_type}'); "
        "print(llm.create_completion('The capital of France is', max_tokens=32)['choices'][0]['text'])",
    ])
