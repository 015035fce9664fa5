"""Where the teacher's corpus of a run lives, and making sure it is complete before anything reads it.

A corpus folder is keyed by every generation setting except `num_sequences` (a bigger corpus of the same
settings extends the same folder) and by the model. A run whose corpus is already complete skips generation
but still records what it found, so every run's `results.json` says which corpus it trained on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

from qat_lightning.fingerprint import digest

log = logging.getLogger("qat_lightning")

__all__ = ["corpus_dir", "ensure_corpus", "reference_corpus_datamodule"]


def corpus_dir(cfg) -> Path:
    """The corpus folder of `cfg` (a `RunConfig`): `generation.out_dir`, or keyed by model and settings."""
    if cfg.generation.out_dir:
        return Path(cfg.generation.out_dir).expanduser()
    gen = asdict(cfg.generation)
    gen.pop("num_sequences", None)  # a bigger corpus of the same settings extends the same folder
    gen.pop("out_dir", None)
    model = {k: v for k, v in cfg.model.identity().items() if k != "dtype"}
    key = digest([gen, model])
    return Path(cfg.paths.data_dir).expanduser() / "generated" / cfg.model.name / f"{cfg.generation.strategy}-{key}"


def ensure_corpus(ctx) -> Path:
    """The run's corpus path, generating the missing shards first (once per run); records `generate/teacher/*`."""
    if ctx.corpus_path is not None:
        return ctx.corpus_path
    from qat_lightning.data.generate import generate_corpus
    from qat_lightning.data.shards import corpus_is_complete
    from qat_lightning.run.context import world_size

    cfg = ctx.cfg
    path = corpus_dir(cfg)
    log.info("generated corpus: %s", path)
    if corpus_is_complete(path, cfg.generation):
        log.info("corpus complete (%d sequences): skipping generation", cfg.generation.num_sequences)
        stats = {"num_sequences": cfg.generation.num_sequences, "skipped": 1}
    else:
        teacher, tokenizer = ctx.teacher()
        out = generate_corpus(teacher, tokenizer, cfg.generation, path, model_name=cfg.model.name,
                              rank=ctx.rank, world_size=world_size())
        stats = {k: out[k] for k in ("num_sequences", "num_tokens", "tokens_per_s")} | {"skipped": 0}
    if world_size() > 1:
        _wait_for_corpus(path, cfg.generation)  # other ranks write their own shards
    ctx.corpus_path = path
    ctx.record("generate", "teacher", stats)
    return path


def _wait_for_corpus(path: Path, gen, timeout_s: float = 24 * 3600) -> None:
    """Ranks generate disjoint shards without a process group yet: wait until every shard is there."""
    from qat_lightning.data.shards import corpus_is_complete

    start = time.monotonic()
    while not corpus_is_complete(path, gen):
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"the corpus at {path} is still incomplete after {timeout_s:.0f} s: did a rank fail?")
        time.sleep(2)


def reference_corpus_datamodule(ctx):
    """The paper's hybrid corpus (k in {3,4,5}) of this run's size and generation settings, as a DataModule.

    Why: runs trained on different data (the data-source and k ablations) hold out different blocks; KL on
    one fixed held-out set (`evaluate.kl_data=hybrid`) makes their KL comparable. Generated if missing.
    """
    from qat_lightning.data.datamodules import build_datamodule
    from qat_lightning.data.generate import generate_corpus
    from qat_lightning.data.shards import corpus_is_complete

    cfg = ctx.cfg
    gen = replace(cfg.generation, strategy="hybrid", k_choices=[3, 4, 5], out_dir=None)
    path = corpus_dir(replace(cfg, generation=gen))
    teacher, tokenizer = ctx.teacher()
    if not corpus_is_complete(path, gen):
        generate_corpus(teacher, tokenizer, gen, path, model_name=cfg.model.name)
    data = replace(cfg.data, source="generated")
    return build_datamodule(data, tokenizer, generated_path=path, num_sequences=gen.num_sequences)
