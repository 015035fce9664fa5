"""`RunContext`: what the stages of one run share (config, run dir, models loaded once, corpus, results).

Stages and the trainer receive it; it imports neither, so the flow stays one way:
`__main__` -> `stages` -> (`distill.trainer`, `eval`, `export`, `baselines`) -> `run.context`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from qat_lightning.config import RunConfig
from qat_lightning.results import Results

log = logging.getLogger("qat_lightning")

__all__ = ["RunContext", "global_rank", "world_size"]


def global_rank() -> int:
    """This process's rank, whoever launched it (torchrun sets RANK; Lightning's launcher LOCAL_RANK)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def teacher_device(cfg: RunConfig) -> torch.device:
    """`model.device` resolved: `auto` is this rank's GPU when the trainer runs on GPUs and torch sees one.

    Why: generation, GPTQ/rotations and evaluation follow the teacher's device; left on the CPU of a GPU
    machine they would take longer than the training itself.
    """
    want = cfg.model.device
    gpu_trainer = str(cfg.trainer.accelerator) in ("gpu", "cuda", "auto")
    if want == "cpu" or (want == "auto" and not (gpu_trainer and torch.cuda.is_available())):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device` (moved only when its first parameter is elsewhere)."""
    param = next(model.parameters(), None)
    if param is not None and param.device != device:
        model.to(device)
    return model


class RunContext:
    """One run's shared state. `trained_student` is set only by the train stage (or loaded from
    `student_path`): an untrained student is never taken for a trained one."""

    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike, resolved_cfg: dict | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resolved_cfg = resolved_cfg or {}
        self.rank = global_rank()
        self.results = Results(self.run_dir) if self.rank == 0 else None
        self._teacher: nn.Module | None = None
        self._tokenizer = None
        self.trained_student: nn.Module | None = None
        self.trained_path: Path | None = None  # where the train stage saved it (reloaded after sharded training)
        self.corpus_path: Path | None = None
        self.deployed_gguf: Path | None = None  # the GGUF the export stage wrote (its run commands are printed)
        self._datamodule = None
        self._calib: list[dict] | None = None
        self._transformed: dict[str, nn.Module] = {}  # init's FP rewrite, kept for evaluate (`transformed`)
        self._logger = None  # built on first use; one per run, shared by train, evaluate and export
        self.device = teacher_device(cfg)

    # ---- logging and results ----------------------------------------------------------------------
    def logger(self):
        """The run's logger (W&B, CSV, or False for none): every stage's results go to it, not only train's."""
        if self._logger is None:
            from qat_lightning.run.loggers import build_logger

            self._logger = build_logger(self.cfg, self.run_dir, self.resolved_cfg)
        return self._logger

    def close_logger(self) -> None:
        from qat_lightning.run.loggers import close_logger

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

    # ---- models ------------------------------------------------------------------------------------
    def teacher(self):
        """(teacher, tokenizer), loaded once per run, frozen, in eval mode, on `model.device`.

        Checked on every call: Lightning's teardown moves the modules it trained (teacher included) to the CPU.
        """
        if self._teacher is None:
            from qat_lightning.models import load_model

            self._teacher, self._tokenizer = load_model(self.cfg.model)
            self._teacher.requires_grad_(False).eval()
        _to_device(self._teacher, self.device)
        return self._teacher, self._tokenizer

    def student(self) -> nn.Module:
        """The trained student: this run's (in memory) or the one at `student_path` (checked at start-up)."""
        if self.trained_student is not None:
            return _to_device(self.trained_student, self.device)
        path = self.trained_path or self.cfg.student_path
        if not path:
            raise RuntimeError("no trained student: the train stage did not run and student_path is not set")
        from qat_lightning.distill.student_io import load_saved_student

        teacher, _ = self.teacher()
        self.trained_student = _to_device(load_saved_student(teacher, path), self.device)
        return self.trained_student

    def transformed(self, method, keep: bool = False) -> nn.Module:
        """`method.transform` of the teacher on this run's calibration batches: a new model the caller owns.

        Why: a learned rotation or GPTQ is minutes of work, and a run that starts QAT from a method
        (`init=spinquant`) and also scores it (`evaluate.methods=[spinquant]`) needs the same rewrite twice.
        `keep=True` (the train stage, when evaluate will ask) keeps a copy for the next call, which takes it.
        """
        import copy
        import json

        key = json.dumps(method.identity(), sort_keys=True, default=str)
        if key in self._transformed:
            return self._transformed.pop(key)
        teacher, _ = self.teacher()
        calib = self.calib_batches() if method.needs_calibration else None
        method.check_calibration(calib)
        base = method.transform(teacher, self.cfg.quant, calib)
        if keep and base is not teacher:
            self._transformed[key] = copy.deepcopy(base)
        return base

    def drop_models(self) -> None:
        self._teacher = None
        self.trained_student = None
        self._transformed.clear()

    # ---- data --------------------------------------------------------------------------------------
    def datamodule(self):
        """The DataModule of the configured source (the generated corpus must exist: `ensure_corpus`)."""
        if self._datamodule is None:
            from qat_lightning.data import build_datamodule
            from qat_lightning.data.corpus import ensure_corpus

            cfg = self.cfg
            _, tokenizer = self.teacher()
            generated = ensure_corpus(self) if cfg.data.source in ("generated", "mixed") else None
            self._datamodule = build_datamodule(cfg.data, tokenizer, generated_path=generated,
                                                num_sequences=cfg.generation.num_sequences)
        return self._datamodule

    def calib_batches(self) -> list[dict[str, torch.Tensor]]:
        """The first `calib_batches` training batches: calibration for every post-training method and init."""
        if self._calib is None:
            self._calib = sample_batches(self.datamodule(), "train", self.cfg.calib_batches)
        return self._calib


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
