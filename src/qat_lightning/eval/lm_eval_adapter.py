"""Let lm-evaluation-harness (0.4.x, an optional extra) score any in-memory model + tokenizer, fast.

Why our own `LM` and not lm-eval's `HFLM(pretrained=model)`: HFLM needs a Hugging Face tokenizer (the tiny
models use `ByteTokenizer`), calls `model.tie_weights()` on the object it is given (a student's lm_head is
untied on purpose), and runs every (context, choice) pair as its own row with logits at every position.
This adapter keeps HFLM's numbers (tokenization, the empty-context prefix, left truncation, rolling windows;
tests compare the two on the same requests) and is faster on multiple-choice tasks:

- requests that share a context run the context once (`share_context`): one row holds the context and all
  of its continuations, with positions and a 4D attention mask that keep each continuation seeing only the
  context and itself, so a 4-choice ARC question costs one context plus four short continuations;
- the lm_head runs only where a continuation token is scored, not at every context position;
- rows are batched longest first (little padding), `batch_size` rows per forward.

Exact for quantizers that work per token (the default activation and KV specs); a per-tensor activation
scale sees whatever else is in the batch, with any batching, here or in HFLM.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.eval.ppl import model_device

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

MISSING = "lm-eval is not installed: pip install 'qat-lightning[eval]'"
DEFAULT_MAX_LENGTH = 2048  # HFLM's fallback when the model config names no context length
# HF causal LMs whose logits are exactly lm_head(model.model(...).last_hidden_state) (no softcapping/scaling)
SPLIT_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)
Result = tuple[float, bool]  # (log-prob of the continuation, whether it is the greedy continuation)

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


def _causal_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, lm_head) when the model is a plain HF causal LM whose decoder takes position ids."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in SPLIT_FAMILIES:
        return None
    decoder = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module):
        return None
    return (decoder, head) if "position_ids" in inspect.signature(decoder.forward).parameters else None


def _pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, L) ids and attention mask; causal attention keeps each row's real positions exact."""
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _gather(logits: torch.Tensor, conts: Sequence[Sequence[int]]) -> list[Result]:
    """Per continuation: (sum log-prob, all tokens greedy); `logits` (sum of lengths, V), rows in order."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    target = torch.tensor([t for cont in conts for t in cont], dtype=torch.long, device=logp.device)  # (N,)
    token_ll = logp.gather(-1, target[:, None]).squeeze(-1).cpu()  # (N,) float32, summed as HFLM sums
    greedy = (logp.argmax(-1) == target).cpu()  # (N,)
    out, start = [], 0
    for cont in conts:
        end = start + len(cont)
        out.append((float(token_ll[start:end].sum()), bool(greedy[start:end].all())))
        start = end
    return out


class QATLM(_LMBase):
    """lm-eval `LM` over a causal LM whose forward returns `.logits` (B, T, V); greedy generation only.

    `max_length` defaults to the model's `max_position_embeddings` (else 2048), as in HFLM. `batch_size`:
    rows (continuations) per forward. `share_context`: requests with the same context share one packed row
    (HF Llama/Qwen2/Mistral models with sdpa or eager attention; other modules run row by row, full logits).
    `tokens_forwarded` counts the (padded) input tokens run through the model, for benchmarks.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        batch_size: int = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        share_context: bool = True,
    ) -> None:
        _require()
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
        self._parts = _causal_parts(model)
        self.share_context = bool(share_context) and self._parts is not None
        self.tokens_forwarded = 0
        try:  # HFLM encodes a string that already starts with the BOS text without special tokens
            self._bos_text = tokenizer.decode([self.prefix_token_id]) if self.prefix_token_id is not None else ""
        except Exception:  # a tokenizer that cannot decode its BOS id alone
            self._bos_text = ""

    # ---- tokenization (HFLM 0.4's `tok_encode` / `_encode_pair`) -------------------------------------------
    def _encode(self, text: str) -> list[int]:
        """Ids without special tokens (generation prompts)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_many(self, texts: Sequence[str]) -> dict[str, list[int]]:
        """`tok_encode` of each distinct text in one tokenizer call: the tokenizer's default special tokens
        (HFLM 0.4.13: a BOS for Llama tokenizers, none for SmolLM2/GPT-2 style ones), none when the text
        already starts with the BOS string."""
        unique = list(dict.fromkeys(texts))
        plain = [t for t in unique if self._bos_text and t.startswith(self._bos_text)]
        default = [t for t in unique if not (self._bos_text and t.startswith(self._bos_text))]
        out: dict[str, list[int]] = {}
        for group, kwargs in ((default, {}), (plain, {"add_special_tokens": False})):
            if group:
                out.update(zip(group, (list(ids) for ids in self.tokenizer(group, **kwargs)["input_ids"])))
        return out

    def _encode_pairs(self, args: Sequence[tuple[str, str]]) -> list[Pair]:
        """lm-eval's split of each (context, continuation): trailing spaces of the context belong to the
        continuation; the continuation's ids are what the whole string adds to the context's (so merges across
        the boundary are kept); an empty context (or one of spaces only) is the prefix token."""
        split = []
        for context, continuation in args:
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            split.append((context, continuation))
        encoded = self._encode_many([t for c, k in split if c for t in (c, c + k)])
        empty = [k for c, k in split if not c]
        bare = dict(zip(empty, self.tokenizer(empty, add_special_tokens=False)["input_ids"])) if empty else {}
        pairs: list[Pair] = []
        for context, continuation in split:
            if not context:
                cont = list(bare[continuation])
                pairs.append((cont[:1], cont[1:]) if cont and cont[0] == self.prefix_token_id
                             else ([self.prefix_token_id], cont))
                continue
            ctx = encoded[context]
            pairs.append((ctx, encoded[context + continuation][len(ctx) :]))
        return pairs

    def _encode_pair(self, context: str, continuation: str) -> Pair:
        return self._encode_pairs([(context, continuation)])[0]

    # ---- scoring -----------------------------------------------------------------------------------------
    def _run_rows(self, pairs: Sequence[Pair]) -> list[Result]:
        """One forward over whole rows `(ctx + cont)[:-1]` (left-truncated to `max_length`, as HFLM)."""
        rows = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in pairs]
        conts = [cont[-len(row) :] for row, (_, cont) in zip(rows, pairs)]  # a too long one: scored on its tail
        ids, mask = _pad(rows, self.pad_token_id)
        self.tokens_forwarded += ids.numel()
        b = torch.tensor([i for i, cont in enumerate(conts) for _ in cont])
        t = torch.tensor([len(row) - len(cont) + k for row, cont in zip(rows, conts) for k in range(len(cont))])
        device = model_device(self.model)
        if self._parts is not None:
            decoder, head = self._parts
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            logits = head(hidden.last_hidden_state[b.to(device), t.to(device)])  # (N, V): scored positions only
        else:
            out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            logits = out.logits[b.to(out.logits.device), t.to(out.logits.device)]
        return _gather(logits, conts)

    def _run_packed(self, groups: Sequence[tuple[list[int], list[list[int]]]]) -> list[list[Result]] | None:
        """Each context once, packed in one row with all of its continuations (but their last tokens).

        Row of a group: ctx, then each continuation's rest, with positions continuing the context's and a
        4D mask: the context is causal, each continuation sees the context and itself (causally), not the
        other continuations. The context's last position predicts every continuation's first token. Padding
        attends to itself only. None when the attention implementation takes no custom 4D mask.
        """
        impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None) or "sdpa"
        if impl not in ("sdpa", "eager", "qat_kv_sdpa", "qat_kv_eager"):
            return None
        decoder, head = self._parts
        device = model_device(self.model)
        seqs, positions, spans = [], [], []  # spans: per group, (start, length) of each continuation's rest
        for ctx, conts in groups:
            seq, pos, group_spans = list(ctx), list(range(len(ctx))), []
            for cont in conts:
                group_spans.append((len(seq), len(cont) - 1))
                seq += cont[:-1]
                pos += range(len(ctx), len(ctx) + len(cont) - 1)
            seqs.append(seq)
            positions.append(pos)
            spans.append(group_spans)
        ids, _ = _pad(seqs, self.pad_token_id)  # (B, S)
        width = ids.shape[1]
        pos_ids = torch.zeros_like(ids)
        allowed = torch.zeros((len(seqs), width, width), dtype=torch.bool)  # (B, S, S): query attends key
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        for b, ((ctx, _), seq, group_spans) in enumerate(zip(groups, seqs, spans)):
            pos_ids[b, : len(seq)] = torch.tensor(positions[b])
            n = len(ctx)
            allowed[b, :n, :n] = causal[:n, :n]
            for start, length in group_spans:
                allowed[b, start : start + length, :n] = True
                allowed[b, start : start + length, start : start + length] = causal[:length, :length]
            pad = torch.arange(len(seq), width)
            allowed[b, pad, pad] = True
        mask = allowed[:, None]  # (B, 1, S, S)
        if "eager" in impl:  # eager attention adds its mask to the scores
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        self.tokens_forwarded += ids.numel()
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos_ids.to(device),
                         use_cache=False).last_hidden_state  # (B, S, H)
        rows, cols, conts = [], [], []
        for b, ((ctx, group_conts), group_spans) in enumerate(zip(groups, spans)):
            for cont, (start, length) in zip(group_conts, group_spans):
                rows += [b] * len(cont)
                cols += [len(ctx) - 1, *range(start, start + length)]
                conts.append(cont)
        flat = _gather(head(hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]), conts)
        results, start = [], 0
        for _, group_conts in groups:
            results.append(flat[start : start + len(group_conts)])
            start += len(group_conts)
        return results

    @torch.inference_mode()
    def _score_all(self, pairs: Sequence[Pair]) -> list[Result]:
        """Every (ctx, cont) pair's (log-prob, is greedy), in input order, `batch_size` rows per forward.

        Contexts shared by several requests go through `_run_packed`; the rest run as whole rows, longest
        first (HFLM's order). An empty continuation has log-prob 0 and is trivially greedy.
        """
        results: list[Result] = [(0.0, True)] * len(pairs)
        rows: list[int] = []
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                continue
            if self.share_context and len(ctx) + len(cont) <= self.max_length + 1:
                groups.setdefault(tuple(ctx), []).append(i)
            else:
                rows.append(i)
        shared = [g for g in groups.values() if len(g) > 1]
        rows += [g[0] for g in groups.values() if len(g) == 1]
        shared.sort(key=lambda g: -max(len(pairs[i][0]) + len(pairs[i][1]) for i in g))

        def run_shared(batch: list[list[int]]) -> None:
            scored = self._run_packed([(pairs[g[0]][0], [pairs[i][1] for i in g]) for g in batch])
            if scored is None:  # an attention implementation without custom masks: these run as rows
                rows.extend(i for g in batch for i in g)
                return
            for g, group_results in zip(batch, scored):
                for i, result in zip(g, group_results):
                    results[i] = result

        batch: list[list[int]] = []  # whole groups, until their continuations fill `batch_size` rows
        for group in shared:
            if batch and sum(map(len, batch)) + len(group) > self.batch_size:
                run_shared(batch)
                batch = []
            batch.append(group)
        if batch:
            run_shared(batch)
        rows.sort(key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            for i, r in zip(chunk, self._run_rows([pairs[i] for i in chunk])):
                results[i] = r
        return results

    def loglikelihood(self, requests: Sequence[Instance], disable_tqdm: bool = False) -> list[Result]:
        """`Instance.args = (context, continuation)` -> (log-prob of the continuation, is it greedy)."""
        return self._score_all(self._encode_pairs([request.args for request in requests]))

    def loglikelihood_rolling(self, requests: Sequence[Instance], disable_tqdm: bool = False) -> list[float]:
        """`Instance.args = (text,)` -> total log-prob of the text after the prefix token.

        lm-eval's windows: every token is scored once, in windows of `max_length` tokens; the last window
        keeps a full `max_length` context instead of starting fresh. All windows of all texts are batched.
        """
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        encoded = self._encode_many([request.args[0] for request in requests])
        windows, owner = [], []
        for k, request in enumerate(requests):
            for w in get_rolling_token_windows(token_list=encoded[request.args[0]], prefix_token=self.prefix_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self._score_all(windows)):
            totals[k] += ll
        return totals

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


def flatten_results(results: dict[str, dict[str, Any]], keep_stderr: bool = False) -> dict[str, float]:
    """lm-eval's `results` -> {"<task>_<metric>": value}; the filter is appended unless it is "none".

    Only `"metric,filter"` keys are metrics (`sample_len`, `alias`, ... are not); stderr entries
    (`<metric>_stderr`) are dropped unless `keep_stderr`, and are always dropped when not a number ("N/A").
    """
    metrics = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            if "_stderr" in metric and not keep_stderr:
                continue
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
    For the paper's eight zero-shot tasks over the local files use `evaluate.tasks=[zeroshot]` instead.
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
