"""Let lm-evaluation-harness (0.4.x, an optional extra) score any in-memory model + tokenizer.

lm-eval's own `hf` model loads from a path; our students are fake-quantized modules that only exist in
memory, so this adapter implements lm-eval's `LM` interface directly on top of `model(input_ids).logits`.
Tokenization, the empty-context prefix and the rolling windows follow lm-eval's `hf` model (`HFLM`), so
the FP teacher scores the same here as with `lm_eval --model hf`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.eval.perplexity import model_device

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

MISSING = "lm-eval is not installed: pip install 'qat-lightning[eval]'"
DEFAULT_MAX_LENGTH = 2048  # HFLM's fallback when the model config names no context length

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)

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
    """lm-eval `LM` over a causal LM whose forward returns `.logits` (B, T, V); greedy generation only.

    `max_length` defaults to the model's `max_position_embeddings` (else 2048), as in HFLM.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        batch_size: int = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
    ) -> None:
        _require()
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)
        config_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_length = int(max_length or config_length or DEFAULT_MAX_LENGTH)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.eot_token_id = eos if eos is not None else bos
        # HFLM conditions an empty context (and the first rolling window) on BOS, else EOS
        self.prefix_token_id = bos if bos is not None else eos
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eot_token_id or 0)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_pair(self, context: str, continuation: str) -> Pair:
        """lm-eval's split: trailing spaces of the context belong to the continuation; the continuation's ids
        are what the whole string adds to the context's (so merges across the boundary are kept)."""
        if not context:
            cont = self._encode(continuation)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            if not context:  # a context of spaces only: condition on the prefix token like an empty one
                return self._encode_pair("", continuation)
        ctx = self._encode(context)
        return ctx, self._encode(context + continuation)[len(ctx) :]

    @torch.inference_mode()
    def _score(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        """(sum log-prob of `cont` given `ctx`, whether `cont` is the greedy continuation) per (ctx, cont) ids.

        Rows are right-padded, so each row's positions and causal attention are those of its own sequence.
        """
        rows = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in pairs]  # the last token is a target
        input_ids = torch.full((len(rows), max(map(len, rows))), self.pad_token_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros_like(input_ids)  # (B, L)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        device = model_device(self.model)
        logits = self.model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
        ).logits  # (B, L, V)
        out = []
        for i, (row, (_, cont)) in enumerate(zip(rows, pairs)):
            cont = cont[-len(row) :]  # a continuation longer than the window is scored on its tail
            steps = F.log_softmax(logits[i, len(row) - len(cont) : len(row)].float(), dim=-1)  # (C, V)
            target = torch.tensor(cont, dtype=torch.long, device=steps.device)  # (C,)
            ll = steps.gather(-1, target[:, None]).sum().item()
            out.append((ll, bool((steps.argmax(-1) == target).all())))
        return out

    def _score_all(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        """`_score` in batches of `batch_size`, longest first (less padding), results in the input order.

        An empty continuation has log-prob 0 and is trivially greedy; it never reaches the model.
        """
        order = sorted((i for i, (_, cont) in enumerate(pairs) if cont), key=lambda i: -len(pairs[i][0] + pairs[i][1]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, result in zip(chunk, self._score([pairs[i] for i in chunk])):
                results[i] = result
        return results

    def loglikelihood(self, requests: Sequence[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """`Instance.args = (context, continuation)` -> (log-prob of the continuation, is it greedy)."""
        return self._score_all([self._encode_pair(*request.args) for request in requests])

    def loglikelihood_rolling(self, requests: Sequence[Instance], disable_tqdm: bool = False) -> list[float]:
        """`Instance.args = (text,)` -> total log-prob of the text after the prefix token.

        lm-eval's windows: every token is scored once, in windows of `max_length` tokens; the last window
        keeps a full `max_length` context instead of starting fresh.
        """
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for request in requests:
            windows = get_rolling_token_windows(
                token_list=self._encode(request.args[0]),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            results.append(sum(ll for ll, _ in self._score_all([make_disjoint_window(w) for w in windows])))
        return results

    @torch.inference_mode()
    def generate_until(self, requests: Sequence[Instance], disable_tqdm: bool = False) -> list[str]:
        """`Instance.args = (context, gen_kwargs)`: greedy decoding until a stop string, EOS or `max_gen_toks`.

        Sampling settings in `gen_kwargs` are ignored: quantized models are compared on greedy outputs.
        """
        outputs = []
        device = model_device(self.model)
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self._encode(context) or [self.prefix_token_id]
            generated: list[int] = []
            for _ in range(max_new):
                window = torch.tensor([(ids + generated)[-self.max_length :]], device=device)  # (1, L)
                next_id = int(self.model(input_ids=window, use_cache=False).logits[0, -1].argmax())
                if next_id == self.tokenizer.eos_token_id:
                    break
                generated.append(next_id)
                if until and any(stop in self.tokenizer.decode(generated) for stop in until):
                    break
            text = self.tokenizer.decode(generated)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's `results` -> {"<task>_<metric>": value}; the filter is appended unless it is "none".

    Only `"metric,filter"` keys are metrics (`sample_len`, `alias`, ... are not); stderr entries are dropped.
    """
    metrics = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            suffix = "" if filter_name == "none" else f"_{filter_name}"
            metrics[f"{task}_{metric}{suffix}"] = float(value)
    return metrics


def run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | None = None,
    batch_size: int = 1,
    include_path: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Run lm-eval `tasks` on an in-memory model; returns {"<task>_<metric>": value} without stderr entries.

    `include_path`: a folder of extra task YAMLs (e.g. a task over a local JSON-lines file, so nothing is
    downloaded); the built-in tasks stay available. Stderrs are not bootstrapped since they are dropped.
    """
    lm_eval = _require()
    if not tasks:
        raise ValueError("run_lm_eval needs at least one task name, e.g. ['arc_easy']")
    extra: dict[str, Any] = {}
    if include_path is not None:
        from lm_eval.tasks import TaskManager

        extra["task_manager"] = TaskManager(include_path=str(include_path))
    out = lm_eval.simple_evaluate(
        model=QATLM(model, tokenizer, batch_size=batch_size), tasks=list(tasks), limit=limit, bootstrap_iters=0, **extra
    )
    return flatten_results(out["results"])
