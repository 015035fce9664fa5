"""Evaluation: perplexity (WikiText-2, C4, any text), the paper's eight zero-shot tasks, KL/top-1, lm-eval tasks.

`evaluate_model` (harness.py) is what the `evaluate` stage calls once per method; every method is scored the
same way. Names are imported lazily so that reading the config schema (`qat_lightning.eval.config`, which
`qat_lightning.config` needs to check a command line) does not pull in torch, torchmetrics and transformers.
"""

from __future__ import annotations

from qat_lightning.lazy import lazy_exports

_EXPORTS = {
    "EvalConfig": "config",
    "HellaSwagItem": "hellaswag",
    "QATLM": "lm_eval_adapter",
    "TokenKL": "agreement",
    "Top1Agreement": "agreement",
    "ZEROSHOT_TASKS": "zeroshot",
    "check_eval_data": "sources",
    "corpus_ids": "harness",
    "evaluate_model": "harness",
    "kl_and_agreement": "agreement",
    "load_hellaswag": "hellaswag",
    "load_text": "sources",
    "multiple_choice_accuracy": "hellaswag",
    "parse_hellaswag": "hellaswag",
    "perplexity": "ppl",
    "resolve_path": "sources",
    "run_lm_eval": "lm_eval_adapter",
    "score_zeroshot": "zeroshot",
    "text_perplexity": "ppl",
    "tokenize_text": "ppl",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
