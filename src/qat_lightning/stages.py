"""The stages a run chains: quantize → generate → train → evaluate → export.

Each stage reads the validated `RunConfig` and a `RunContext` (models loaded once, the corpus path, the
trained student) and adds `"<stage>/<method>/<metric>"` numbers to the run's `results.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from qat_lightning.baselines.registry import CALIBRATED_METHODS
from qat_lightning.config import RunConfig
from qat_lightning.results import Results

log = logging.getLogger("qat_lightning")


def global_rank() -> int:
    """This process's rank, whoever launched it (torchrun sets RANK; Lightning's launcher LOCAL_RANK)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


class RunContext:
    """What stages share within one run: the config, the run dir, loaded models and the results file."""

    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike, resolved_cfg: dict | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resolved_cfg = resolved_cfg or {}
        self.rank = global_rank()
        self.results = Results(self.run_dir) if self.rank == 0 else None
        self._teacher: nn.Module | None = None
        self._tokenizer = None
        self.student: nn.Module | None = None
        self.corpus_path: Path | None = None
        self._logger = None  # built on first use; one per run, shared by train, evaluate and export

    def logger(self):
        """The run's logger (W&B, CSV, or False for none): every stage's results go to it, not only train's."""
        if self._logger is None:
            from qat_lightning.distill.trainer import build_logger

            self._logger = build_logger(self.cfg, self.run_dir, self.resolved_cfg)
        return self._logger

    def close_logger(self) -> None:
        from qat_lightning.distill.trainer import close_logger

        close_logger(self._logger)
        self._logger = None

    def record(self, stage: str, method: str, metrics: dict[str, float]) -> None:
        if self.results is not None:
            values = self.results.prefixed(stage, method, metrics)
            self.results.update(values)
            self.log(values)

    def log(self, values: dict[str, float | None]) -> None:
        """Send `<stage>/<method>/<metric>` values to the logger (rank 0), e.g. evaluate/qat/wikitext2_ppl."""
        logger = self.logger() if self.rank == 0 else None
        finite = {k: float(v) for k, v in values.items() if v is not None}
        if logger and finite:
            logger.log_metrics(finite)

    def teacher(self):
        """(teacher, tokenizer), loaded once per run, frozen and in eval mode."""
        if self._teacher is None:
            from qat_lightning.models import load_model

            self._teacher, self._tokenizer = load_model(self.cfg.model)
            self._teacher.requires_grad_(False).eval()
        return self._teacher, self._tokenizer

    def drop_models(self) -> None:
        self._teacher = None
        self.student = None


# ---- quantize ------------------------------------------------------------------------------------
def stage_quantize(ctx: RunContext) -> None:
    """Build the student and report what was quantized and how."""
    from qat_lightning.quant import quant_summary, quantize_model

    teacher, _ = ctx.teacher()
    student = quantize_model(teacher, ctx.cfg.quant)
    summary = quant_summary(student)
    log.info("student %s: %s", ctx.cfg.quant.setting, json.dumps(summary, default=str))
    ctx.record("quantize", "student", {k: v for k, v in summary.items() if isinstance(v, (int, float))})
    ctx.student = student


# ---- generate ------------------------------------------------------------------------------------
def corpus_dir(cfg: RunConfig) -> Path:
    """Where the teacher's corpus lives: configured, or keyed by model and generation settings."""
    if cfg.generation.out_dir:
        return Path(cfg.generation.out_dir).expanduser()
    gen = asdict(cfg.generation)
    gen.pop("num_sequences", None)  # a bigger corpus of the same settings extends the same folder
    gen.pop("out_dir", None)
    model = {k: v for k, v in asdict(cfg.model).items() if k not in ("cache_dir", "dtype")}
    digest = hashlib.sha256(json.dumps([gen, model], sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(cfg.paths.data_dir).expanduser() / "generated" / cfg.model.name / f"{cfg.generation.strategy}-{digest}"


def stage_generate(ctx: RunContext) -> None:
    """The teacher writes its own training corpus (skipped when the corpus is already complete)."""
    from qat_lightning.data import corpus_is_complete, generate_corpus

    cfg = ctx.cfg
    path = corpus_dir(cfg)
    ctx.corpus_path = path
    log.info("generated corpus: %s", path)
    if corpus_is_complete(path, cfg.generation):
        log.info("corpus complete (%d sequences): skipping generation", cfg.generation.num_sequences)
        stats = None
    else:
        teacher, tokenizer = ctx.teacher()
        stats = generate_corpus(
            teacher, tokenizer, cfg.generation, path, model_name=cfg.model.name,
            rank=ctx.rank, world_size=world_size(),
        )
    if world_size() > 1:
        _wait_for_corpus(path, cfg)  # other ranks write their own shards
    if stats is not None:
        ctx.record("generate", "teacher", {
            "num_sequences": stats["num_sequences"],
            "num_tokens": stats["num_tokens"],
            "tokens_per_s": stats["tokens_per_s"],
        })


def _wait_for_corpus(path: Path, cfg: RunConfig, timeout_s: float = 24 * 3600) -> None:
    """Ranks generate disjoint shards without a process group yet: wait until every shard is there."""
    import time

    from qat_lightning.data import corpus_is_complete

    start = time.monotonic()
    while not corpus_is_complete(path, cfg.generation):
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"the corpus at {path} is still incomplete after {timeout_s:.0f} s: did a rank fail?")
        time.sleep(2)


# ---- data helpers --------------------------------------------------------------------------------
def build_data(ctx: RunContext):
    """The DataModule for the configured source (generating the corpus first when it is needed)."""
    from qat_lightning.data import build_datamodule

    cfg = ctx.cfg
    _, tokenizer = ctx.teacher()
    generated = None
    if cfg.data.source in ("generated", "mixed"):
        if ctx.corpus_path is None:
            stage_generate(ctx)
        generated = ctx.corpus_path
    dm = build_datamodule(cfg.data, tokenizer, generated_path=generated, num_sequences=cfg.generation.num_sequences)
    return dm


def sample_batches(dm, split: str, n: int) -> list[dict[str, torch.Tensor]]:
    """The first `n` batches of a split (calibration for baselines, held-out data for KL)."""
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) >= n:
            break
    return batches


# ---- train ---------------------------------------------------------------------------------------
def stage_train(ctx: RunContext) -> None:
    from qat_lightning.distill.trainer import train_student

    train_student(ctx)


# ---- evaluate ------------------------------------------------------------------------------------
def load_student(ctx: RunContext, path: str | os.PathLike) -> nn.Module:
    """Rebuild a student saved by `train` (its quant config + safetensors weights)."""
    from qat_lightning.distill.trainer import load_saved_student

    teacher, _ = ctx.teacher()
    return load_saved_student(teacher, path)


def _export_dir(ctx: RunContext) -> Path:
    return Path(ctx.cfg.export.out_dir) if ctx.cfg.export.out_dir else ctx.run_dir / "export"


def _method_model(ctx: RunContext, method: str, calib: list[dict]) -> nn.Module:
    cfg = ctx.cfg
    teacher, _ = ctx.teacher()
    if method == "export":  # what a user deploys: integer codes from disk, scored like everything else
        from qat_lightning.export import load_exported

        param = next(teacher.parameters())
        return load_exported(_export_dir(ctx), device=param.device, dtype=param.dtype, weights="dequantized")
    if method == "qat":
        if ctx.student is not None:
            return ctx.student
        path = cfg.student_path or (ctx.run_dir / "student")
        if not Path(path).exists():
            raise FileNotFoundError(
                f"no trained student at {path}: add 'train' to stages or set student_path=<run dir>/student"
            )
        return load_student(ctx, path)
    from qat_lightning.baselines import build_baseline

    return build_baseline(method, teacher, cfg.quant, calib_batches=calib, alpha=cfg.smoothquant_alpha,
                          strength=cfg.kvsmooth_strength, v_alpha=cfg.kvsmooth_v_alpha)


def stage_evaluate(ctx: RunContext) -> dict[str, dict[str, float]]:
    """Score the teacher, the QAT student and every configured baseline the same way; print the table."""
    from qat_lightning.eval import evaluate_model

    cfg = ctx.cfg
    teacher, tokenizer = ctx.teacher()
    needs_data = "kl" in cfg.evaluate.tasks or any(m in CALIBRATED_METHODS for m in cfg.evaluate.methods)
    heldout, calib = None, []
    if needs_data:
        dm = build_data(ctx)
        if "kl" in cfg.evaluate.tasks:
            kl_dm = dm if cfg.evaluate.kl_data == "own" else _reference_corpus_data(ctx)
            heldout = sample_batches(kl_dm, "val", cfg.evaluate.kl_batches)
        calib = sample_batches(dm, "train", cfg.calib_batches)
    table: dict[str, dict[str, float]] = {}
    for method in cfg.evaluate.methods:
        metrics = _cached_scores(ctx, method, calib, heldout)
        if metrics is None:
            model = _method_model(ctx, method, calib)
            model.eval()
            metrics = evaluate_model(model, tokenizer, cfg.evaluate, teacher=teacher, heldout_batches=heldout)
        table[method] = metrics
        ctx.record("evaluate", method, metrics)
        log.info("evaluate %s: %s", method, metrics)
    text = format_table(table, title=f"{cfg.name} ({cfg.quant.setting})")
    print(text, flush=True)
    if ctx.rank == 0:
        (ctx.run_dir / "results.md").write_text(text + "\n")
    return table


def _reference_corpus_data(ctx: RunContext):
    """The paper's hybrid corpus (k in {3,4,5}) of this run's size and generation settings, as a DataModule.

    Why: runs trained on different data (the data-source and k ablations) hold out different blocks; KL on
    one fixed held-out set (`evaluate.kl_data=hybrid`) makes their KL comparable. Generated if missing.
    """
    from dataclasses import replace

    from qat_lightning.data import build_datamodule, corpus_is_complete, generate_corpus

    cfg = ctx.cfg
    gen = replace(cfg.generation, strategy="hybrid", k_choices=[3, 4, 5], out_dir=None)
    ref = replace(cfg, generation=gen)
    path = corpus_dir(ref)
    if not corpus_is_complete(path, gen):
        teacher, tokenizer = ctx.teacher()
        generate_corpus(teacher, tokenizer, gen, path, model_name=cfg.model.name)
    _, tokenizer = ctx.teacher()
    data = replace(cfg.data, source="generated")
    return build_datamodule(data, tokenizer, generated_path=path, num_sequences=gen.num_sequences)


def _cached_scores(ctx: RunContext, method: str, calib: list[dict], heldout: list[dict] | None) -> dict | None:
    """Scores of a training-free method from `evaluate.cache`, computing (and storing) the missing tasks.

    None when the method is not cached (QAT, export, lm-eval tasks, or the cache is off).
    """
    from dataclasses import replace

    from qat_lightning.eval import evaluate_model
    from qat_lightning.eval.cache import CACHEABLE_METHODS, EvalCache, batches_digest, task_parts

    cfg = ctx.cfg
    if not cfg.evaluate.cache or method not in CACHEABLE_METHODS or cfg.evaluate.lm_eval_tasks:
        return None
    cache = EvalCache(Path(cfg.paths.data_dir) / "eval_cache")
    model_cfg = {k: v for k, v in asdict(cfg.model).items() if k != "cache_dir"}
    base = {"method": method, "model": model_cfg}
    if method != "fp":
        base["quant"] = asdict(cfg.quant)
    if method in CALIBRATED_METHODS:
        base.update(calib=batches_digest(calib), alpha=cfg.smoothquant_alpha)
    if method == "kvsmooth":
        base.update(strength=cfg.kvsmooth_strength, v_alpha=cfg.kvsmooth_v_alpha)
    teacher, tokenizer = ctx.teacher()
    model = None
    metrics: dict[str, float] = {}
    for task in cfg.evaluate.tasks:
        parts = {**base, **task_parts(cfg.evaluate, task, heldout)}
        hit = cache.get(parts)
        if hit is None:
            if model is None:
                model = _method_model(ctx, method, calib)
                model.eval()
            one_task = replace(cfg.evaluate, tasks=[task], lm_eval_tasks=[])
            hit = evaluate_model(model, tokenizer, one_task, teacher=teacher, heldout_batches=heldout)
            if hit:  # an empty result (kl without held-out data) is not a score
                cache.put(parts, hit)
        else:
            log.info("evaluate %s/%s: cached", method, task)
        metrics.update(hit)
    return metrics


def format_table(table: dict[str, dict[str, float]], title: str = "") -> str:
    metrics: list[str] = []
    for row in table.values():
        metrics += [m for m in row if m not in metrics]
    lines = [f"### {title}", ""] if title else []
    lines.append("| method | " + " | ".join(metrics) + " |")
    lines.append("|---|" + "---|" * len(metrics))
    for method, row in table.items():
        cells = [f"{row[m]:.4g}" if m in row and row[m] is not None else "-" for m in metrics]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- export --------------------------------------------------------------------------------------
def stage_export(ctx: RunContext) -> None:
    from qat_lightning.export import export_student

    cfg = ctx.cfg
    student = _method_model(ctx, "qat", [])
    _, tokenizer = ctx.teacher()
    out = _export_dir(ctx)
    stats = export_student(
        student, out, tokenizer=tokenizer, extra_meta={"experiment": cfg.name},
        scale_dtype=cfg.export.scale_dtype, fp_dtype=cfg.export.fp_dtype,
    )
    log.info("exported to %s: %s", out, stats)
    ctx.record("export", "student", {k: v for k, v in stats.items() if isinstance(v, (int, float))})


STAGE_FUNCTIONS = {
    "quantize": stage_quantize,
    "generate": stage_generate,
    "train": stage_train,
    "evaluate": stage_evaluate,
    "export": stage_export,
}


def run_stages(ctx: RunContext) -> None:
    try:
        for stage in ctx.cfg.stages:
            log.info("stage %s", stage)
            STAGE_FUNCTIONS[stage](ctx)
            if stage == "train" and ctx.rank != 0:
                return  # extra ranks exist for training; rank 0 evaluates and exports
    finally:
        ctx.close_logger()
