"""The run's logger (W&B offline by default, CSV, or none): built once by the run, shared by every stage.

It lives here, not in `distill/`, because evaluate and export log to it too; training only receives it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["build_logger", "close_logger", "wandb_tags"]


def wandb_tags(cfg) -> list[str]:
    """Tags that let one W&B view group an ablation: the W-A-KV setting, the loss, the data source."""
    q = cfg.quant
    tags = [q.setting, f"w{q.w_bits}", f"a{q.a_bits}", f"kv{q.kv_bits}", f"loss:{cfg.loss.name}",
            f"data:{cfg.data.source}", f"gen:{cfg.generation.strategy}", f"model:{cfg.model.name}"]
    return tags + list(cfg.logger.tags)


def build_logger(cfg, run_dir: Path, resolved_cfg: dict[str, Any] | None):
    """A Lightning logger for `cfg.logger`, or False for none."""
    lc = cfg.logger
    if lc.name == "none":
        return False
    if lc.name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv")
    os.environ.setdefault("WANDB_SILENT", "true")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(
        project=lc.project, entity=lc.entity, offline=lc.offline, save_dir=str(run_dir),
        group=lc.group or cfg.name, tags=wandb_tags(cfg), name=f"{cfg.name}-{cfg.quant.setting}",
        job_type="train", log_model=lc.log_model,
    )
    if resolved_cfg:
        logger.log_hyperparams(resolved_cfg)
    return logger


def close_logger(logger) -> None:
    """Flush the run's logger and close its W&B run, so the next job of a sweep starts its own."""
    if not logger:
        return
    logger.finalize("success")
    if type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish()
