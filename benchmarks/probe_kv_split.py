"""Probe (#15, 2026-12-02): which half of llama.cpp's q4_0 KV cache costs the F16 teacher its 1.45 ppl?

The F16 teacher (`export_gguf(dtype="f16")`, as `bench_llamacpp.py` writes it) is scored on WikiText-2
512 x 16 with keys q4_0 and values f16, then the other way round (flash attention on in both, as for any
quantized cache), with perplexity and KL(teacher || engine) as `bench_llamacpp.py --quality` computes them.

    python benchmarks/probe_kv_split.py
    python benchmarks/probe_kv_split.py outputs/q40_8192_1100/export/model.gguf   # any GGUF of SmolLM2, e.g. a student
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from qat_lightning.eval import corpus_ids
from qat_lightning.export.gguf import GGUFError, check_gguf, export_gguf
from qat_lightning.export.llamacpp import _ggml_type, _llama_cpp, score_windows
from qat_lightning.models import load_model
from qat_lightning.models.smollm2 import smollm2_gguf_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", nargs="?", help="the file to score (default: the F16 teacher, written if absent)")
    args = ap.parse_args()
    if args.gguf and not Path(args.gguf).is_file():
        sys.exit(f"probe_kv_split: no such file {args.gguf}")
    torch.set_num_threads(2)
    teacher, tok = load_model({"source": "smollm2"})
    path = Path(args.gguf or "/tmp/qat_llamacpp/smollm2-f16.gguf")
    if not args.gguf and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_gguf(teacher, tok, path, source_gguf=smollm2_gguf_path(), dtype="f16")
    try:
        check_gguf(path, teacher)  # a truncated file or another model's is refused here, with one clear message
    except GGUFError as err:
        sys.exit(f"probe_kv_split: {err}")
    ids = corpus_ids(tok, "wikitext2")
    w = ids[: (ids.numel() // 512) * 512].view(-1, 512)[:16]

    def teacher_fn(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return teacher(input_ids=x, use_cache=False).logits.float()

    for k, v in (("q4_0", "f16"), ("f16", "q4_0")) if not args.gguf else (("f16", "f16"), ("q4_0", "f16"),
                                                                           ("f16", "q4_0"), ("q4_0", "q4_0")):
        llm = _llama_cpp().Llama(str(path), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2, n_threads_batch=2,
                                 logits_all=True, flash_attn=True, type_k=_ggml_type(k), type_v=_ggml_type(v),
                                 verbose=False)
        r = score_windows(llm, w, teacher_fn)
        llm.close()
        print(f"K {k} V {v}: ppl {r['ppl']:.2f} KL {r['kl']:.4f} top-1 {r['top1_agreement']:.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
