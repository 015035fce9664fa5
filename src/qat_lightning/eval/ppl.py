"""Perplexity in the GPTQ convention: tokenize once, non-overlapping `seq_len` windows, mean token NLL, exp.

This is the convention the LLM-QAT, GPTQ and AWQ papers report WikiText-2/C4 numbers in, so our numbers
compare with theirs when `seq_len` matches (they use 2048). The tail shorter than a window is dropped.
NLL sums are accumulated in float64 so thousands of windows don't lose precision.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of ids, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL per position: logits (B, T, V), input_ids (B, T) -> (B, T-1)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    return -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seq_len: int,
    batch_size: int = 1,
    max_windows: int | None = None,
) -> dict[str, float]:
    """Perplexity of `model` on `token_ids` cut into non-overlapping windows of `seq_len` tokens.

    Each window is scored independently; its first token has no context and is not predicted, so a window
    contributes `seq_len - 1` tokens (as in GPTQ's shifted HF loss).

    Returns:
        {"ppl", "nll" (mean per token), "num_tokens" (predicted tokens), "num_windows", "seq_len"}.
    """
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D (the whole tokenized text), got shape {tuple(token_ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if batch_size < 1 or (max_windows is not None and max_windows < 1):
        raise ValueError("batch_size and max_windows must be >= 1")
    num_windows = token_ids.numel() // seq_len
    if num_windows == 0:
        raise ValueError(f"the text has {token_ids.numel()} tokens < seq_len={seq_len}: use a smaller seq_len")
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    windows = token_ids[: num_windows * seq_len].view(num_windows, seq_len)  # (N, T)
    device = model_device(model)
    nll_sum = torch.zeros((), dtype=torch.float64)
    for start in range(0, num_windows, batch_size):
        batch = windows[start : start + batch_size].to(device)  # (B, T)
        logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
        nll_sum += token_nll(logits, batch).double().sum().cpu()
    num_tokens = num_windows * (seq_len - 1)
    nll = nll_sum.item() / num_tokens
    return {"ppl": math.exp(nll), "nll": nll, "num_tokens": num_tokens, "num_windows": num_windows, "seq_len": seq_len}


def text_perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    seq_len: int,
    batch_size: int = 1,
    max_windows: int | None = None,
) -> dict[str, float]:
    """`perplexity` of a raw text, tokenized once as a whole."""
    return perplexity(model, tokenize_text(tokenizer, text), seq_len, batch_size, max_windows)
