"""The stages a run chains: quantize → generate → train → evaluate → export.

Each stage reads the validated `RunConfig` and a `RunContext` (models loaded once, the corpus path, the
trained student) and adds `"<stage>/<method>/<metric>"` numbers to the run's `results.json`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from torch import nn

from qat_lightning.data.corpus import corpus_dir, ensure_corpus, reference_corpus_datamodule
from qat_lightning.run.context import RunContext, global_rank, sample_batches, world_size

__all__ = ["STAGE_FUNCTIONS", "RunContext", "corpus_dir", "global_rank", "run_stages", "world_size"]

log = logging.getLogger("qat_lightning")


# ---- quantize ------------------------------------------------------------------------------------
def stage_quantize(ctx: RunContext) -> None:
    """Build the (untrained) student and report what was quantized and how."""
    from qat_lightning.quant import quant_summary, quantize_model

    teacher, _ = ctx.teacher()
    summary = quant_summary(quantize_model(teacher, ctx.cfg.quant))
    log.info("student %s: %s", ctx.cfg.quant.setting, json.dumps(summary, default=str))
    ctx.record("quantize", "student", {k: v for k, v in summary.items() if isinstance(v, (int, float))})


# ---- generate ------------------------------------------------------------------------------------
def stage_generate(ctx: RunContext) -> None:
    """The teacher writes its own training corpus (skipped, but recorded, when it is already complete)."""
    ensure_corpus(ctx)


# ---- train ---------------------------------------------------------------------------------------
def stage_train(ctx: RunContext) -> None:
    from qat_lightning.distill.trainer import train_student

    train_student(ctx)


# ---- evaluate ------------------------------------------------------------------------------------
def _export_dir(ctx: RunContext) -> Path:
    return Path(ctx.cfg.export.out_dir) if ctx.cfg.export.out_dir else ctx.run_dir / "export"


def _method_model(ctx: RunContext, name: str) -> nn.Module:
    """The model `evaluate` scores as `name`: a trained student, an export, or a post-training method's."""
    teacher, _ = ctx.teacher()
    if name == "export":  # what a user deploys: integer codes from disk, scored like everything else
        from qat_lightning.export import load_exported

        param = next(teacher.parameters())
        return load_exported(_export_dir(ctx), device=param.device, dtype=param.dtype, weights="dequantized")
    if name == "qat":
        return ctx.student()
    method = ctx.cfg.method(name)
    return method.build(teacher, ctx.cfg.quant, base=ctx.transformed(method))


def stage_evaluate(ctx: RunContext) -> dict[str, dict[str, float]]:
    """Score the teacher, the QAT student and every configured baseline the same way; print the table."""
    from qat_lightning.eval import evaluate_model
    from qat_lightning.eval.config import ENGINE_METHODS

    cfg = ctx.cfg
    teacher, tokenizer = ctx.teacher()
    heldout = None
    if "kl" in cfg.evaluate.tasks:
        kl_dm = ctx.datamodule() if cfg.evaluate.kl_data == "own" else reference_corpus_datamodule(ctx)
        heldout = sample_batches(kl_dm, "val", cfg.evaluate.kl_batches)
    table: dict[str, dict[str, float]] = {}
    items: dict[str, dict[str, list[float]]] = {}  # per method, each zero-shot task's per-item scores
    for name in cfg.evaluate.methods:
        got: dict[str, list[float]] = {}
        metrics = _gguf_scores(ctx, name) if name in ENGINE_METHODS else _cached_scores(ctx, name, heldout, got)
        if metrics is None:
            model = _method_model(ctx, name)
            model.eval()
            metrics = evaluate_model(model, tokenizer, cfg.evaluate, teacher=teacher, heldout_batches=heldout,
                                     zeroshot_items=got)
        table[name] = metrics
        if got:
            items[name] = got
        ctx.record("evaluate", name, metrics)
        log.info("evaluate %s: %s", name, metrics)
    _paired_zeroshot(ctx, table, items)
    text = format_table(table, title=f"{cfg.name} ({cfg.quant.setting})")
    print(text, flush=True)
    if ctx.rank == 0:
        from qat_lightning.atomic import write_text_atomic

        write_text_atomic(ctx.run_dir / "results.md", text + "\n")
    return table


def _paired_zeroshot(ctx: RunContext, table: dict[str, dict[str, float]], items: dict[str, dict]) -> None:
    """Each method's zero-shot average minus fp's on the same items, with the paired stderr; items kept on disk.

    Adds `evaluate/<method>/zeroshot_avg_minus_fp` (+ `_stderr`) when fp and the method were scored on all
    eight tasks in this run (a score read from `evaluate.cache` has no per-item record: no difference).
    """
    from qat_lightning.eval.zeroshot import paired_difference

    if not items or ctx.rank != 0:
        return
    from qat_lightning.atomic import write_json_atomic

    write_json_atomic(ctx.run_dir / "zeroshot_items.json", items)
    if "fp" not in items:
        return
    for name, got in items.items():
        diff = paired_difference(got, items["fp"]) if name != "fp" else {}
        if diff:
            extra = {"zeroshot_avg_minus_fp": diff["zeroshot_avg_diff"],
                     "zeroshot_avg_minus_fp_stderr": diff["zeroshot_avg_diff_stderr"]}
            table[name].update(extra)
            ctx.record("evaluate", name, extra)


def _cached_scores(ctx: RunContext, name: str, heldout: list[dict] | None,
                   items: dict[str, list[float]] | None = None) -> dict | None:
    """Scores of a post-training method from `evaluate.cache`, computing (and storing) the missing tasks.

    The key is what decides the score: the method's resolved node (name + parameters), the model and quant
    configs, the calibration batches' bytes, per task its settings and data, and the package's source hash
    (`eval/cache.py`). None when the method is not cacheable (QAT, export, lm-eval tasks) or the cache is off.
    """
    from dataclasses import replace

    from qat_lightning.eval import evaluate_model
    from qat_lightning.eval.cache import EvalCache, batches_digest, task_parts

    cfg = ctx.cfg
    if not cfg.evaluate.cache or name not in cfg.methods or cfg.evaluate.lm_eval_tasks:
        return None
    method = cfg.method(name)
    cache = EvalCache(Path(cfg.paths.data_dir) / "eval_cache")
    base = {"method": method.identity(), "model": cfg.model.identity()}
    if name != "fp":
        base["quant"] = asdict(cfg.quant)
    if method.needs_calibration:
        base["calib"] = batches_digest(ctx.calib_batches())
    teacher, tokenizer = ctx.teacher()
    model = None
    metrics: dict[str, float] = {}
    for task in cfg.evaluate.tasks:
        parts = {**base, **task_parts(cfg.evaluate, task, heldout)}
        hit = cache.get(parts)
        if hit is None:
            if model is None:
                model = _method_model(ctx, name)
                model.eval()
            one_task = replace(cfg.evaluate, tasks=[task], lm_eval_tasks=[])
            hit = evaluate_model(model, tokenizer, one_task, teacher=teacher, heldout_batches=heldout,
                                 zeroshot_items=items)
            if hit:  # an empty result (kl without held-out data) is not a score
                cache.put(parts, hit)
        else:
            log.info("evaluate %s/%s: cached", name, task)
        metrics.update(hit)
    return metrics


def format_table(table: dict[str, dict[str, float]], title: str = "") -> str:
    """The printed table; standard errors and item counts stay in results.json (experiments/collect.py shows
    the paper's zero-shot layout)."""
    metrics: list[str] = []
    for row in table.values():
        metrics += [m for m in row if m not in metrics and not m.endswith(("_stderr", "_n", "_n_total"))]
    lines = [f"### {title}", ""] if title else []
    lines.append("| method | " + " | ".join(metrics) + " |")
    lines.append("|---|" + "---|" * len(metrics))
    for method, row in table.items():
        cells = [f"{row[m]:.4g}" if m in row and row[m] is not None else "-" for m in metrics]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- export --------------------------------------------------------------------------------------
def stage_export(ctx: RunContext) -> None:
    """Write the trained student as real integers: our safetensors layout, or a llama.cpp GGUF."""
    cfg = ctx.cfg
    student = ctx.student()
    _, tokenizer = ctx.teacher()
    out = _export_dir(ctx)
    if cfg.export.is_gguf:
        from qat_lightning.export.gguf import export_gguf

        if cfg.export.key_center_pairs:
            student = _key_centered(ctx, student)
        stats = export_gguf(student, tokenizer, out / cfg.export.gguf_file, source_gguf=_source_gguf(ctx),
                            dtype=cfg.export.gguf_dtype, tokenizer_pre=cfg.export.gguf_tokenizer_pre)
        ctx.deployed_gguf = Path(stats["path"])
        if ctx.rank == 0:  # Ollama's recipe for the file (docs/GGUF.md has a chat template to add)
            from qat_lightning.atomic import write_text_atomic

            write_text_atomic(out / "Modelfile", f"FROM ./{cfg.export.gguf_file}\n")
    elif cfg.export.is_compressed_tensors:  # transformers / vLLM checkpoint (docs/COMPRESSED_TENSORS.md)
        from qat_lightning.export.hf_compressed import export_compressed_tensors

        stats = export_compressed_tensors(student, out, tokenizer=tokenizer)
    else:
        from qat_lightning.export import export_student

        stats = export_student(
            student, out, tokenizer=tokenizer, extra_meta={"experiment": cfg.name},
            scale_dtype=cfg.export.scale_dtype, fp_dtype=cfg.export.fp_dtype,
        )
    log.info("exported to %s: %s", out, stats)
    ctx.record("export", "student", {k: v for k, v in stats.items() if isinstance(v, (int, float))
                                     and not isinstance(v, bool)})


def _key_centered(ctx: RunContext, student: nn.Module) -> nn.Module:
    """A copy of `student` whose keys are centered on the corpus (`export/key_center.py`); the student stays."""
    import copy

    from qat_lightning.data.shards import load_generated
    from qat_lightning.export.key_center import center_keys, describe

    exp = ctx.cfg.export
    n = min(exp.key_center_sequences, ctx.cfg.generation.num_sequences)  # a small corpus lends all it has
    sequences = load_generated(ensure_corpus(ctx), n)
    centered = copy.deepcopy(student)
    info = center_keys(centered, sequences, exp.key_center_pairs)
    log.info(describe(info))
    ctx.record("export", "key_center", {k: v for k, v in info.items() if isinstance(v, (int, float))})
    return centered


def _source_gguf(ctx: RunContext) -> str | None:
    """The GGUF whose tokenizer an export copies: configured, or the embedded model's file."""
    if ctx.cfg.export.gguf_source:
        return ctx.cfg.export.gguf_source
    if ctx.cfg.model.source == "smollm2":
        from qat_lightning.models import smollm2_gguf_path

        return str(smollm2_gguf_path())
    return None


def _kv_type(ctx: RunContext) -> str:
    """llama.cpp's KV cache type for this run's student (f16 when its KV is not in a llama.cpp format)."""
    from qat_lightning.export.llamacpp import kv_type_of

    try:
        return kv_type_of(ctx.cfg.quant)
    except ValueError:
        return "f16"


def _gguf_scores(ctx: RunContext, name: str = "gguf") -> dict[str, float]:
    """A GGUF scored by llama.cpp itself on the perplexity tasks (KL/top-1 to the teacher too).

    "gguf" is this run's export with the KV type it trained for; "gguf_f16" / "gguf_ptq" are the teacher's F16
    file and llama.cpp's own quantization of it to the run's weight type, with the run's KV type
    (`engine_types`). The teacher's files are written once per model under <paths.data_dir>/gguf/.
    """
    from qat_lightning.export.llamacpp import engine_ptq, engine_types, llamacpp_scores

    teacher, tokenizer = ctx.teacher()
    if name == "gguf":
        path, kv_type = _export_dir(ctx) / ctx.cfg.export.gguf_file, _kv_type(ctx)
    else:
        ftype, kv_type = engine_types(ctx.cfg.quant)
        path = engine_ptq(teacher, tokenizer, _engine_dir(ctx), "f16" if name == "gguf_f16" else ftype,
                          source_gguf=_source_gguf(ctx))
    log.info("evaluate %s: %s in llama.cpp, KV cache %s", name, path, kv_type)
    return llamacpp_scores(path, tokenizer, ctx.cfg.evaluate, kv_type=kv_type, teacher=teacher)


def _engine_dir(ctx: RunContext) -> Path:
    """Where the teacher's GGUF files live: one folder per model config (they do not depend on the run)."""
    from qat_lightning.fingerprint import digest

    model = ctx.cfg.model.identity()
    return Path(ctx.cfg.paths.data_dir).expanduser() / "gguf" / f"{ctx.cfg.model.name}-{digest(model)}"


STAGE_FUNCTIONS = {
    "quantize": stage_quantize,
    "generate": stage_generate,
    "train": stage_train,
    "evaluate": stage_evaluate,
    "export": stage_export,
}


def run_stages(ctx: RunContext) -> None:
    """Run `cfg.stages` in order; every finished run leaves its `results.json` (even with nothing to add)."""
    try:
        for stage in ctx.cfg.stages:
            log.info("stage %s", stage)
            STAGE_FUNCTIONS[stage](ctx)
            if stage == "train" and ctx.rank != 0:
                return  # extra ranks exist for training; rank 0 evaluates and exports
    finally:
        if ctx.results is not None:
            ctx.results.write()
        ctx.close_logger()
    if ctx.deployed_gguf is not None and ctx.rank == 0:
        from qat_lightning.export.llamacpp import how_to_run

        print(how_to_run(ctx.deployed_gguf, _kv_type(ctx)), flush=True)
