"""One entry point for every post-training baseline, by name (what the `evaluate` stage loops over)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from qat_lightning.baselines.awq import awq
from qat_lightning.baselines.gptq import gptq
from qat_lightning.baselines.kv_smooth import kv_smooth
from qat_lightning.baselines.rtn import rtn
from qat_lightning.baselines.smoothquant import smoothquant

__all__ = ["BASELINE_METHODS", "CALIBRATED_METHODS", "build_baseline"]

BASELINE_METHODS = ("fp", "rtn", "smoothquant", "gptq", "awq", "kvsmooth")
_CALIBRATED: dict[str, Callable[..., nn.Module]] = {
    "smoothquant": smoothquant, "gptq": gptq, "awq": awq, "kvsmooth": kv_smooth,
}
CALIBRATED_METHODS = tuple(_CALIBRATED)  # the baselines that need calibration batches
# Options of each calibrated method (everything after teacher, qcfg, calib_batches).
_OPTIONS = {m: tuple(inspect.signature(f).parameters)[3:] for m, f in _CALIBRATED.items()}


def build_baseline(
    method: str, teacher: nn.Module, qcfg: Any, calib_batches: list[dict] | None = None, **kwargs: Any
) -> nn.Module:
    """The model `method` evaluates: `fp` is the teacher itself; the others are new students (teacher untouched).

    Args:
        method: one of `BASELINE_METHODS`.
        teacher: the FP HF causal LM.
        qcfg: the student's `QuantConfig` (or a mapping / DictConfig of its fields); ignored by `fp`.
        calib_batches: list of dicts with ``input_ids (B, T)``; required by smoothquant, gptq and awq.
        **kwargs: method options (alpha, smooth_vo; block_size, percdamp, act_order; grid). Each method takes
            the ones it knows, so one call site can pass options for several methods; a name no method
            knows raises ValueError.
    """
    if method not in BASELINE_METHODS:
        raise ValueError(f"unknown baseline method {method!r}; valid: {', '.join(BASELINE_METHODS)}")
    known = {o for opts in _OPTIONS.values() for o in opts}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown baseline options {unknown}; valid: {sorted(known)}")
    if method == "fp":
        return teacher
    if method == "rtn":
        return rtn(teacher, qcfg)
    if calib_batches is None:
        raise ValueError(f"baseline {method!r} needs calib_batches (a list of dicts with 'input_ids')")
    options = {k: v for k, v in kwargs.items() if k in _OPTIONS[method]}
    return _CALIBRATED[method](teacher, qcfg, calib_batches, **options)
