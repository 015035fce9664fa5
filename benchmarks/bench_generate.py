"""Data-free corpus generation: our batched KV-cache generator vs the reference's batch-1 `model.generate`.

The reference makes each sequence with two `generate` calls at batch 1: `max_new_tokens=k, do_sample=False`
(the greedy prefix) then `do_sample=True` up to the full length. We generate `--batch` sequences at once
with one KV cache. EOS stopping is off on both sides so every sequence has exactly `--max-length` tokens;
throughput counts generated tokens (the start token excluded). Both run in one process, same threads.

    python benchmarks/bench_generate.py [--model smollm2|tiny] [--max-length 128] [--batch 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from qat_lightning.data.config import GenerationConfig
from qat_lightning.data.generate import eos_token_id, generate_batch, start_candidates, start_tokens


def load_teacher(name: str):
    """SmolLM2-135M through the project's loader, or a tiny random Llama."""
    if name == "tiny":
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                                          eos_token_id=2)
        return transformers.LlamaForCausalLM(config), None
    from qat_lightning.models import load_model

    return load_model({"source": "smollm2"})


@torch.inference_mode()
def hf_reference(model, firsts: list[int], ks: list[int], max_length: int, seed: int) -> tuple[int, float]:
    """The reference's way: per sequence, greedy k tokens then sampling to max_length, batch 1."""
    torch.manual_seed(seed)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    tokens, t0 = 0, time.perf_counter()
    for first, k in zip(firsts, ks):
        ids = torch.tensor([[first]])
        ids = model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=pad)
        rest = max_length - ids.shape[1]
        ids = model.generate(ids, max_new_tokens=rest, min_new_tokens=rest, do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, pad_token_id=pad)
        assert ids.shape[1] == max_length, ids.shape
        tokens += ids.shape[1] - 1
    return tokens, time.perf_counter() - t0


def batched(model, firsts, ks, cfg: GenerationConfig, eos, seed: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    seqs = generate_batch(model, firsts, ks, cfg, torch.Generator().manual_seed(seed), eos)
    assert all(len(s) == cfg.max_length for s in seqs)
    return sum(len(s) - 1 for s in seqs), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hf-seqs", type=int, default=2, help="batch-1 reference sequences per round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the CPU is shared: noise hits both)")
    parser.add_argument("--threads", type=int, default=1, help="1 avoids OpenMP spin-waits on an oversubscribed CPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_teacher(args.model)
    model = model.eval()  # fp32 on CPU (the GGUF is dequantized on load)
    cfg = GenerationConfig(num_sequences=args.batch, max_length=args.max_length, batch_size=args.batch,
                           stop_at_eos=False, seed=args.seed)
    candidates, eos = start_candidates(model, tokenizer), eos_token_id(model, tokenizer)
    warm = GenerationConfig(num_sequences=args.batch, max_length=4, k_choices=[1], batch_size=args.batch,
                            stop_at_eos=False)
    firsts, ks = start_tokens(warm, candidates, 0, args.batch, torch.Generator().manual_seed(args.seed))
    batched(model, firsts, ks, warm, eos, args.seed)  # warm-up: allocator, first-call overheads
    hf_reference(model, firsts[:1].tolist(), [1], 4, args.seed)

    our_tok = our_s = hf_tok = hf_s = 0.0
    for r in range(args.rounds):
        firsts, ks = start_tokens(cfg, candidates, 0, args.batch, torch.Generator().manual_seed(args.seed + r))
        tok, sec = hf_reference(model, firsts[: args.hf_seqs].tolist(), ks[: args.hf_seqs].tolist(),
                                args.max_length, args.seed + r)
        hf_tok, hf_s = hf_tok + tok, hf_s + sec
        tok2, sec2 = batched(model, firsts, ks, cfg, eos, args.seed + r)
        our_tok, our_s = our_tok + tok2, our_s + sec2
        ours_r, ref_r = tok2 / sec2, tok / sec
        print(f"round {r}: batched {ours_r:.1f} tok/s, hf {ref_r:.1f} tok/s, ratio {ours_r / ref_r:.1f}x", flush=True)
    ours, ref = our_tok / our_s, hf_tok / hf_s
    print(f"generation batched(B={args.batch})/hf_generate(B=1) = {ours / ref:.1f}x "
          f"(batched {ours:.1f} tok/s, hf {ref:.1f} tok/s, max_length {args.max_length}, model {args.model}, "
          f"{args.threads} thread(s); {our_tok:.0f} vs {hf_tok:.0f} tokens in {our_s:.0f} s vs {hf_s:.0f} s)")


if __name__ == "__main__":
    main()
