"""The run's config schema: one dataclass per Hydra group, checked before any model is loaded.

Hydra composes plain YAML (so `+exp=NAME` and sweeps stay flexible); `validate_config` then merges each
section into its dataclass, which type-checks every value and runs the dataclass's own checks. A bad
value becomes one `ConfigError` line naming the key, and `__main__` exits with code 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qat_lightning.data.config import DataConfig, GenerationConfig
from qat_lightning.distill.config import (
    CallbacksConfig,
    LoggerConfig,
    LossConfig,
    OptimConfig,
    StrategyConfig,
    TrainerConfig,
)
from qat_lightning.eval.config import EvalConfig
from qat_lightning.export.config import ExportConfig
from qat_lightning.models.config import ModelConfig
from qat_lightning.quant.spec import QuantConfig

STAGES = ("quantize", "generate", "train", "evaluate", "export")
INITS = ("teacher", "smoothquant", "gptq", "kvsmooth")


class ConfigError(ValueError):
    """A bad config value; its message is the one line the user sees."""


@dataclass
class PathsConfig:
    """Where things go. `data_dir`: generated and real corpora; `cache_dir`: converted models."""

    root_dir: str = "."
    data_dir: str = "data"
    cache_dir: str = "~/.cache/qat_lightning"
    output_dir: str = "."


@dataclass
class RunConfig:
    name: str = "smollm2_w4a8kv4"
    stages: list[str] = field(default_factory=lambda: ["generate", "train", "evaluate"])
    seed: int = 42
    ckpt_path: str | None = None  # "last" resumes from <run dir>/checkpoints/last.ckpt
    student_path: str | None = None  # a saved student (for evaluate/export without train)
    init: str = "teacher"  # teacher | smoothquant | gptq | kvsmooth (see conf/config.yaml)
    smoothquant_alpha: float = 0.5
    kvsmooth_strength: float = 1.0  # how far key channel ranges are equalised (init=kvsmooth, kvsmooth baseline)
    kvsmooth_v_alpha: float | None = None  # also smooth V against o_proj with this alpha; null leaves V alone
    calib_batches: int = 8
    # reuse the results of an identical finished run (same resolved config but logger/paths/name) instead of
    # running it again: sweeps that share a baseline run train it once (run_memo.py)
    memo: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; valid stages: {', '.join(STAGES)}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}; got {self.init!r}")
        for key in ("smoothquant_alpha", "kvsmooth_strength", "kvsmooth_v_alpha"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be in [0, 1]; got {value}")


_SECTIONS = {f.name: f for f in fields(RunConfig)}


def _section_schema(name: str) -> Any:
    return _SECTIONS[name].default_factory  # type: ignore[misc]


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (`schema/<group>`), for docs and `--cfg` users."""
    cs = ConfigStore.instance()
    for name, f in _SECTIONS.items():
        factory = getattr(f, "default_factory", None)
        if isinstance(factory, type):
            cs.store(group="schema", name=name, node=factory)


def _one_line(err: Exception) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return msg


def validate_config(cfg: DictConfig | dict) -> RunConfig:
    """Type-check and validate every section; raise `ConfigError` with one clear line on the first problem."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    plain.pop("hydra", None)
    unknown = [k for k in plain if k not in _SECTIONS]
    if unknown:
        raise ConfigError(f"unknown top-level config key(s) {unknown}")
    values: dict[str, Any] = {}
    for name, value in plain.items():
        f = _SECTIONS[name]
        factory = getattr(f, "default_factory", None)
        if isinstance(factory, type):  # a section backed by its own dataclass
            try:
                node = OmegaConf.merge(OmegaConf.structured(factory), value or {})
                values[name] = OmegaConf.to_object(node)
            except (OmegaConfBaseException, ValueError, TypeError) as err:
                key = getattr(err, "full_key", None) or getattr(err, "key", None)
                where = f"{name}.{key}" if key and not str(key).startswith(name) else (key or name)
                raise ConfigError(f"{where}: {_one_line(err)}") from None
        else:
            values[name] = value
    try:
        node = OmegaConf.merge(OmegaConf.structured(RunConfig), {k: v for k, v in values.items() if k in _plain()})
        top = OmegaConf.to_object(node)
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        raise ConfigError(_one_line(err)) from None
    for name, value in values.items():
        if name not in _plain():
            setattr(top, name, value)
    _check_across_sections(top)
    return top


def _check_across_sections(cfg: RunConfig) -> None:
    """Checks that need several sections at once (each section validates itself)."""
    if "export" in cfg.evaluate.methods and "evaluate" in cfg.stages:
        # the exported integer model is scored from disk: something must have written it before evaluate
        if "export" in cfg.stages and cfg.stages.index("export") > cfg.stages.index("evaluate"):
            raise ConfigError("evaluate.methods has 'export' but the export stage runs after evaluate: "
                              "list it first, e.g. stages=[generate,train,export,evaluate]")
        if "export" not in cfg.stages and not cfg.export.out_dir:
            raise ConfigError("evaluate.methods has 'export' but nothing is exported: add 'export' before "
                              "'evaluate' in stages, or set export.out_dir=<an export folder>")
    _check_no_eval_leak(cfg)


def _check_no_eval_leak(cfg: RunConfig) -> None:
    """Training on the text that perplexity is measured on would score the student on its own training data."""
    from qat_lightning.eval.sources import resolve_path

    if cfg.data.source not in ("text", "mixed") or not cfg.data.text_path or "evaluate" not in cfg.stages:
        return
    if "wikitext2" not in cfg.evaluate.tasks:
        return
    train_file = Path(cfg.data.text_path).expanduser()
    try:
        eval_file = resolve_path("wikitext2", cfg.evaluate.wikitext2_path)
    except FileNotFoundError:
        return  # reported by the evaluate stage with its own message
    if eval_file is None or not train_file.is_file() or not os.path.samefile(train_file, eval_file):
        return
    windows = cfg.evaluate.max_windows
    evaluated = None if windows is None else cfg.evaluate.seq_len * windows
    if evaluated is None or cfg.data.text_offset_tokens < evaluated:
        need = "all of it is evaluated (evaluate.max_windows=null)" if evaluated is None else (
            f"set data.text_offset_tokens >= {evaluated} (seq_len x max_windows)")
        raise ConfigError(f"data.text_path is the WikiText-2 file that evaluate scores: training would see the "
                          f"evaluated text; {need}, or train on other text")


def _plain() -> set[str]:
    return {n for n, f in _SECTIONS.items() if not isinstance(getattr(f, "default_factory", None), type)}
