"""Let lm-evaluation-harness (0.4.x, an optional extra) score any in-memory model + tokenizer.

lm-eval's own `hf` model loads from a path; our students are fake-quantized modules that only exist in
memory, so this adapter implements lm-eval's `LM` interface directly on top of `model(input_ids).logits`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.eval.perplexity import model_device

MISSING = "lm-eval is not installed: pip install 'qat-lightning[eval]'"

try:  # the base class only matters when lm-eval is installed; `_require` raises the clear error otherwise
    from lm_eval.api.model import LM as _LMBase
except ImportError:
    _LMBase = object


def _require() -> Any:
    """The `lm_eval` module, or the one clear ImportError saying how to install it."""
    try:
        return importlib.import_module("lm_eval")
    except ImportError as err:
        raise ImportError(MISSING) from err


class QATLM(_LMBase):
    """lm-eval `LM` over a causal LM whose forward returns `.logits` (B, T, V); greedy generation only."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, batch_size: int = 1, max_length: int = 2048, max_gen_toks: int = 256
    ) -> None:
        _require()
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
        eot = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        self.eot_token_id = eot
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eot or 0)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log-prob of `cont` given `ctx`, whether `cont` is the greedy continuation) per (ctx, cont) ids."""
        rows = []
        for ctx, cont in pairs:
            row = (ctx + cont)[-(self.max_length + 1) :][:-1]  # inputs: the last token is only a target
            rows.append((row, cont))
        width = max(len(r) for r, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros_like(input_ids)  # (B, L)
        for i, (row, _) in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        device = model_device(self.model)
        logits = self.model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
        ).logits  # (B, L, V)
        out = []
        for i, (row, cont) in enumerate(rows):
            cont = cont[-len(row) :]  # a continuation longer than the window is scored on its tail
            steps = F.log_softmax(logits[i, len(row) - len(cont) : len(row)].float(), dim=-1)  # (C, V)
            target = torch.tensor(cont, device=steps.device)  # (C,)
            ll = steps.gather(-1, target[:, None]).sum().item()
            out.append((ll, bool((steps.argmax(-1) == target).all())))
        return out

    def _batched(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        results = []
        for start in range(0, len(pairs), self.batch_size):
            results.extend(self._score(pairs[start : start + self.batch_size]))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """`Instance.args = (context, continuation)`; an empty context is replaced by the end-of-text token."""
        pairs = []
        for request in requests:
            context, continuation = request.args
            ctx = self._encode(context) if context else [self.eot_token_id]
            pairs.append((ctx, self._encode(continuation)))
        return self._batched(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        """`Instance.args = (text,)`: total log-prob of the text in disjoint windows of `max_length` tokens."""
        results = []
        for request in requests:
            tokens = self._encode(request.args[0])
            shifted = [self.eot_token_id, *tokens]  # the token before each target
            pairs = []
            for start in range(0, len(tokens), self.max_length):
                targets = tokens[start : start + self.max_length]
                pairs.append((shifted[start : start + 1], targets))  # one token of context, then the window
            results.append(sum(ll for ll, _ in self._batched(pairs)))
        return results

    @torch.inference_mode()
    def generate_until(self, requests) -> list[str]:
        """`Instance.args = (context, gen_kwargs)`: greedy decoding until a stop string, EOS or `max_gen_toks`."""
        outputs = []
        device = model_device(self.model)
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self._encode(context)[-self.max_length :]
            generated: list[int] = []
            for _ in range(max_new):
                window = torch.tensor([(ids + generated)[-self.max_length :]], device=device)  # (1, L)
                next_id = int(self.model(input_ids=window, use_cache=False).logits[0, -1].argmax())
                if next_id == self.tokenizer.eos_token_id:
                    break
                generated.append(next_id)
                text = self.tokenizer.decode(generated)
                if any(stop in text for stop in until):
                    break
            text = self.tokenizer.decode(generated)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def run_lm_eval(
    model: nn.Module, tokenizer: Any, tasks: Sequence[str], limit: int | None = None, batch_size: int = 1
) -> dict[str, float]:
    """Run lm-eval `tasks` on an in-memory model; returns {"<task>_<metric>": value} without stderr entries."""
    lm_eval = _require()
    if not tasks:
        raise ValueError("run_lm_eval needs at least one task name, e.g. ['arc_easy']")
    out = lm_eval.simple_evaluate(model=QATLM(model, tokenizer, batch_size=batch_size), tasks=list(tasks), limit=limit)
    metrics = {}
    for task, values in out["results"].items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key:
                metrics[f"{task}_{key.split(',')[0]}"] = float(value)
    return metrics
