"""A post-training method is an object: its parameters are a dataclass, its interface is two calls.

    transform(model, qcfg, calib) -> FP model        what QAT starts from (`init=<name>`)
    build(model, qcfg, calib)     -> student         what `evaluate` scores (`evaluate.methods=[<name>]`)

`build` is "transform, then the student's quantizers" unless a method says otherwise (GPTQ's weights are
already on the grid, so its baseline turns the weight quantizer off). Every method module registers its
dataclass with `@register`; its fields are the Hydra node `methods.<name>` (e.g.
`methods.gptq.percdamp=0.05`), and the resolved node is the method's identity in caches. Adding a method is
one module in `baselines/` (discovered by `available_methods`) plus its test.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

__all__ = ["Method", "available_methods", "build_method", "method_class", "register"]

_REGISTRY: dict[str, type[Method]] = {}
_DISCOVERED = False


@dataclass
class Method:
    """Base of every post-training method; subclasses are dataclasses of their parameters."""

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    def transform(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None) -> nn.Module:
        """The FP model the student is quantized from (a new model; `model` untouched)."""
        return model

    def student_config(self, qcfg: Any) -> Any:
        """The `QuantConfig` the evaluated student applies on top of `transform`'s model."""
        return qcfg

    def build(self, model: nn.Module, qcfg: Any, calib_batches: list[dict] | None = None,
              base: nn.Module | None = None) -> nn.Module:
        """The student `evaluate` scores: the student's quantizers on the transformed model (`base`, when the
        run already has this method's `transform` of `model`; it becomes the student)."""
        from qat_lightning.quant import as_quant_config, quantize_model

        if base is None:
            self.check_calibration(calib_batches)
            base = self.transform(model, qcfg, calib_batches)
        student = quantize_model(base, as_quant_config(self.student_config(qcfg)), inplace=base is not model)
        return self.finish_student(student)

    def finish_student(self, student: nn.Module) -> nn.Module:
        """Last touches on a student quantized from `transform`'s model (QAT's too), e.g. online rotations."""
        return student

    def check_calibration(self, calib_batches: list[dict] | None) -> None:
        if self.needs_calibration and not calib_batches:
            raise ValueError(f"method {self.name!r} needs calib_batches (a list of dicts with 'input_ids')")

    def identity(self) -> dict[str, Any]:
        """What decides this method's result: its name and parameters (a cache key part)."""
        return {"method": self.name, **dataclasses.asdict(self)}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` reachable as `methods.<cls.name>` and by name in `init=` / `evaluate`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two methods are called {cls.name!r}: {_REGISTRY[cls.name].__name__} and {cls.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every module of `qat_lightning.baselines`, so each registers its method (once)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    import qat_lightning.baselines as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    _DISCOVERED = True


def available_methods() -> dict[str, type[Method]]:
    """Every registered post-training method, by name."""
    _discover()
    return dict(_REGISTRY)


def method_class(name: str) -> type[Method]:
    methods = available_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(methods)}")
    return methods[name]


def build_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """The method `name` with `params` (unknown parameter names are an error, never silently dropped)."""
    cls = method_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params or {}) - known)
    if unknown:
        raise ValueError(f"method {name!r} has no parameter(s) {unknown}; valid: {sorted(known) or 'none'}")
    return cls(**(params or {}))
