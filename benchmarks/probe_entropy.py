"""Is a lower WikiText-2 perplexity a sharper model or a better fit? Entropy beside NLL, on the harness's windows.

Why: in #15 a float model trained only through llama.cpp's q4_0 KV cache (`outputs/f16_kv4_amd`) scored 1.3-2.1 %
below its teacher's perplexity. A model that only grew more confident would lower its predictive entropy with the
NLL; one that fits the text better lowers the NLL at about the same entropy. This prints both per model (HF folders,
fp32, KV in float) on the first `--windows` windows of `seq_len` tokens, the windows `eval/ppl.py` scores.

    QAT_DATA_DIR=/work/shared/data python benchmarks/probe_entropy.py ~/.cache/qat_lightning/smollm2-135m-instruct \
        outputs/f16_kv4_amd/hf --windows 8
"""

from __future__ import annotations

import argparse
import math
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="HF model folders; the first one's tokenizer is used for all")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat_lightning.eval.ppl import tokenize_text
    from qat_lightning.eval.sources import load_text

    torch.set_num_threads(args.threads)
    ids = tokenize_text(AutoTokenizer.from_pretrained(args.models[0]), load_text("wikitext2"))
    if ids.numel() < args.windows * args.seq_len:
        print(f"probe_entropy: the text holds fewer than {args.windows} windows of {args.seq_len}", file=sys.stderr)
        return 2
    windows = ids[: args.windows * args.seq_len].view(args.windows, args.seq_len)  # (N, T)
    print("| model | entropy (nats) | NLL (nats) | ppl | top-1 accuracy |\n|---|---|---|---|---|")
    for name in args.models:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
        entropy = nll = hits = 0.0
        with torch.inference_mode():
            for w in windows:
                logp = torch.log_softmax(model(w[None], use_cache=False).logits[0, :-1].float(), -1)  # (T-1, V)
                entropy += -(logp.exp() * logp).sum().item()
                nll += -logp.gather(-1, w[1:, None]).sum().item()
                hits += (logp.argmax(-1) == w[1:]).sum().item()
        n = windows.numel() - args.windows
        print(f"| {name} | {entropy / n:.4f} | {nll / n:.4f} | {math.exp(nll / n):.2f} | {hits / n:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
