"""HellaSwag: the shared file's reader (`load_hellaswag`) and a small stand-alone scorer.

The `hellaswag` evaluate task is lm-evaluation-harness's own task over this file (`eval/zeroshot.py`), so
its prompt (the harness's preprocessing, `ctx_b` capitalised) and its `acc_norm` (per character) are the
published ones. `multiple_choice_accuracy` here scores the file's context as it is, `acc_norm` per UTF-8
byte: a dependency-free check (no lm-eval), not the number to report.
"""

from __future__ import annotations

import bz2
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.eval.ppl import model_device
from qat_lightning.eval.sources import hellaswag_source

LINES_PER_ITEM = 6  # "activity_label: ctx", gold label, 4 endings


@dataclass(frozen=True)
class HellaSwagItem:
    """One question: the context, the index of the right ending, and the 4 endings."""

    context: str
    label: int
    endings: tuple[str, ...]


def parse_hellaswag(lines: Iterable[str]) -> list[HellaSwagItem]:
    """Items from the text format of the shared file: 6 lines per item (context, label 0-3, 4 endings)."""
    lines = [line.rstrip("\r\n") for line in lines]
    while lines and not lines[-1]:
        lines.pop()  # a trailing blank line is harmless
    if len(lines) % LINES_PER_ITEM:
        raise ValueError(f"HellaSwag file has {len(lines)} lines, not a multiple of {LINES_PER_ITEM}: is it truncated?")
    items = []
    for start in range(0, len(lines), LINES_PER_ITEM):
        context, label, *endings = lines[start : start + LINES_PER_ITEM]
        if label.strip() not in ("0", "1", "2", "3"):
            raise ValueError(f"HellaSwag line {start + 2}: label must be 0-3, got {label!r}")
        items.append(HellaSwagItem(context, int(label), tuple(endings)))
    return items


def load_hellaswag(path: str | os.PathLike | None = None, limit: int | None = None) -> list[HellaSwagItem]:
    """The HellaSwag validation items (first `limit`), from `path`, `$QAT_DATA_DIR` or HF `datasets`."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    source = hellaswag_source(path)
    if isinstance(source, Path):
        opener = bz2.open if source.suffix == ".bz2" else open
        with opener(source, "rt", encoding="utf-8") as f:
            items = parse_hellaswag(f)
    else:
        items = [HellaSwagItem(ctx, label, tuple(endings)) for ctx, label, endings in source]
    return items[:limit] if limit is not None else items


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def ending_logprobs(model: nn.Module, tokenizer: Any, items: Sequence[HellaSwagItem]) -> list[torch.Tensor]:
    """Sum of log-probs of each item's endings given its context: one (num_endings,) float64 tensor per item.

    Context and ending are tokenized separately (the ending as " " + ending) and the ids concatenated, so
    the ending's tokens are exactly the ones scored. All endings of all `items` go in one right-padded batch.
    """
    rows, spans = [], []  # spans: (ctx_len, ending_len) per row
    for item in items:
        ctx = _encode(tokenizer, item.context)
        if not ctx:
            raise ValueError("a HellaSwag context tokenized to nothing: the first ending token has no context")
        for ending in item.endings:
            end = _encode(tokenizer, " " + ending)
            rows.append(ctx + end)
            spans.append((len(ctx), len(end)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (R, L)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (R, L)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    device = model_device(model)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
    scores = []
    for i, (ctx_len, end_len) in enumerate(spans):
        targets = input_ids[i, ctx_len : ctx_len + end_len].to(logits.device)  # (E,)
        # only the ending's positions go through log_softmax: (E, V), position t predicts token t+1
        predicted = F.log_softmax(logits[i, ctx_len - 1 : ctx_len + end_len - 1].float(), dim=-1)
        scores.append(predicted.gather(-1, targets[:, None]).double().sum().cpu())
    per_item, start = [], 0
    for item in items:
        per_item.append(torch.stack(scores[start : start + len(item.endings)]))
        start += len(item.endings)
    return per_item


def multiple_choice_accuracy(
    model: nn.Module, tokenizer: Any, items: Sequence[HellaSwagItem], batch_size: int = 1
) -> dict[str, float]:
    """{"acc", "acc_norm"} over `items`; `batch_size` items (4 rows each) per forward."""
    if not items:
        raise ValueError("no HellaSwag items to score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    correct = correct_norm = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        for item, logprobs in zip(chunk, ending_logprobs(model, tokenizer, chunk)):
            num_bytes = torch.tensor([max(len(e.encode("utf-8")), 1) for e in item.endings], dtype=torch.float64)
            correct += int(logprobs.argmax().item() == item.label)
            correct_norm += int((logprobs / num_bytes).argmax().item() == item.label)
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items)}
