"""The run's config schema: one dataclass per Hydra group, checked before any model is loaded.

Hydra composes plain YAML (so `+exp=NAME` and sweeps stay flexible); `validate_config` then merges each
section into its dataclass, which type-checks every value and runs the dataclass's own checks. A bad
value becomes one `ConfigError` line naming the key, and `__main__` exits with code 2.
"""

from __future__ import annotations

import dataclasses
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
# init names that read better than their method's: QAT from the teacher (fp), from the rotated teacher (quarot)
INIT_ALIASES = {"teacher": "fp", "rotate": "quarot"}


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
    seed: int = 0  # the run's randomness: the training order (data.shuffle_seed) and a tiny model's init
    ckpt_path: str | None = None  # "last" resumes from <run dir>/checkpoints/last.ckpt
    student_path: str | None = None  # a saved student (for evaluate/export without train)
    # the FP weights QAT starts from: "teacher", or any post-training method's transform (`methods.<name>`)
    init: str = "teacher"
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
    # every post-training method with its parameters (`methods.gptq.percdamp=0.05`), by name: the nodes are
    # the registered dataclasses of `baselines/` (see `register_configs`); validated into `Method` objects
    methods: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; valid stages: {', '.join(STAGES)}")
        if self.calib_batches < 1:
            raise ValueError(f"calib_batches must be >= 1, got {self.calib_batches}")
        if self.data.shuffle_seed is None:  # as conf's `data.shuffle_seed: ${seed}`: the run's seed orders the data
            self.data = dataclasses.replace(self.data, shuffle_seed=self.seed)

    def method(self, name: str):
        """The configured `Method` object called `name` (or an alias of `INIT_ALIASES`)."""
        return self.methods[INIT_ALIASES.get(name, name)]


_SECTIONS = {f.name: f for f in fields(RunConfig)}


def _section_schema(name: str) -> Any:
    """The dataclass backing section `name`, or None for plain keys (and `methods`, built separately)."""
    factory = getattr(_SECTIONS[name], "default_factory", None)
    return factory if dataclasses.is_dataclass(factory) else None


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (`schema/<group>`, for docs and `--cfg` users) and every
    registered method's dataclass as the `methods` node (`methods/all`, in config.yaml's defaults), so each
    method parameter has one default, its dataclass's, and is overridable as `methods.<name>.<param>=...`."""
    from qat_lightning.baselines import available_methods

    cs = ConfigStore.instance()
    for name in _SECTIONS:
        if (schema := _section_schema(name)) is not None:
            cs.store(group="schema", name=name, node=schema)
    methods = available_methods()
    cs.store(group="methods", name="all", node={name: methods[name]() for name in sorted(methods)})


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
        factory = _section_schema(name)
        if factory is not None:  # a section backed by its own dataclass
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
    top.methods = _build_methods(plain.get("methods") or {})
    _check_across_sections(top)
    return top


def _build_methods(nodes: dict[str, Any]) -> dict[str, Any]:
    """Every registered method as an object, with the parameters the config gives it."""
    from qat_lightning.baselines import available_methods, build_method

    if not isinstance(nodes, dict):
        raise ConfigError(f"methods must be a mapping of method name to parameters, got {type(nodes).__name__}")
    known = available_methods()
    unknown = sorted(set(nodes) - set(known))
    if unknown:
        raise ConfigError(f"methods: unknown method(s) {unknown}; valid: {', '.join(sorted(known))}")
    out = {}
    for name in sorted(known):
        params = nodes.get(name) or {}
        try:
            out[name] = build_method(name, params)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"methods.{name}: {_one_line(err)}") from None
    return out


def _check_across_sections(cfg: RunConfig) -> None:
    """Checks that need several sections at once (each section validates itself)."""
    from qat_lightning.eval.config import ENGINE_BASELINES, TRAINED_METHODS

    valid = [*sorted(cfg.methods), *TRAINED_METHODS, *ENGINE_BASELINES]
    bad = [m for m in cfg.evaluate.methods if m not in valid]
    if bad:
        raise ConfigError(f"unknown evaluate method(s) {bad}; valid: {', '.join(valid)}")
    if any(m in ENGINE_BASELINES for m in cfg.evaluate.methods):
        from qat_lightning.export.llamacpp import engine_types

        try:
            engine_types(cfg.quant)
        except ValueError as err:
            raise ConfigError(f"evaluate.methods has {[m for m in cfg.evaluate.methods if m in ENGINE_BASELINES]}"
                              f": {_one_line(err)}") from None
    if INIT_ALIASES.get(cfg.init, cfg.init) not in cfg.methods:
        choices = ", ".join([*INIT_ALIASES, *sorted(cfg.methods)])
        raise ConfigError(f"init must be one of {choices}; got {cfg.init!r}")
    _check_trained_student(cfg)
    if cfg.callbacks.ema_decay is not None and cfg.strategy.name == "fsdp":
        raise ConfigError("callbacks.ema_decay averages the whole student on each rank: it needs a single-process "
                          "or DDP run, not strategy=fsdp (FSDP2 shards the student)")
    if cfg.model.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("model.device=cuda, but torch sees no CUDA device here (model.device=auto picks one "
                              "when there is)")
    for scored in ("export", "gguf"):
        if scored not in cfg.evaluate.methods or "evaluate" not in cfg.stages:
            continue
        # an export is scored from disk: something must have written it before evaluate
        if "export" in cfg.stages and cfg.stages.index("export") > cfg.stages.index("evaluate"):
            raise ConfigError(f"evaluate.methods has '{scored}' but the export stage runs after evaluate: "
                              "list it first, e.g. stages=[generate,train,export,evaluate]")
        if "export" not in cfg.stages and not cfg.export.out_dir:
            raise ConfigError(f"evaluate.methods has '{scored}' but nothing is exported: add 'export' before "
                              "'evaluate' in stages, or set export.out_dir=<an export folder>")
        if scored == "gguf" and "export" in cfg.stages and not cfg.export.is_gguf:
            raise ConfigError("evaluate.methods has 'gguf' but the export stage writes export.format="
                              f"{cfg.export.format}: set export.format=gguf")
        if scored == "export" and "export" in cfg.stages and cfg.export.is_gguf:
            raise ConfigError("evaluate.methods has 'export' (our safetensors layout) but export.format=gguf: "
                              "score the GGUF with evaluate.methods=[...,gguf]")
        if scored == "export" and "export" in cfg.stages and cfg.export.is_compressed_tensors:
            raise ConfigError("evaluate.methods has 'export' (our safetensors layout) but export.format="
                              "compressed-tensors: score the student with evaluate.methods=[...,qat]")
    _check_compressed_tensors(cfg)
    _check_no_eval_leak(cfg)


def _check_compressed_tensors(cfg: RunConfig) -> None:
    """export.format=compressed-tensors holds W4A16 / W8A16 / W8A8 students only: refuse the rest now."""
    if "export" not in cfg.stages or not cfg.export.is_compressed_tensors:
        return
    from qat_lightning.export.hf_compressed import compressed_tensors_scheme

    try:
        compressed_tensors_scheme(cfg.quant, rotation=cfg.method(cfg.init))
    except ValueError as err:
        raise ConfigError(_one_line(err)) from None


def _check_trained_student(cfg: RunConfig) -> None:
    """A `qat` score or an export must come from a trained student: this run's train stage, or student_path."""
    def trained_before(stage: str) -> bool:
        return "train" in cfg.stages and cfg.stages.index("train") < cfg.stages.index(stage)

    needs = []
    if "evaluate" in cfg.stages and "qat" in cfg.evaluate.methods and not trained_before("evaluate"):
        needs.append("evaluate.methods has 'qat'")
    if "export" in cfg.stages and not trained_before("export"):
        needs.append("the export stage exports the trained student")
    if needs and not cfg.student_path:
        raise ConfigError(f"{needs[0]} but nothing is trained: add 'train' before it in stages, or set "
                          f"student_path=<run dir>/student (an untrained student is the rtn method)")
    if cfg.student_path:
        from qat_lightning.distill.student_io import check_saved_student

        try:
            check_saved_student(cfg.student_path)
        except FileNotFoundError as err:
            raise ConfigError(f"student_path: {_one_line(err)}") from None


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
    return {n for n in _SECTIONS if _section_schema(n) is None and n != "methods"}
