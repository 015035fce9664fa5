"""The `train` stage: build teacher, student, data, Lightning Trainer (strategy, logger, callbacks), fit, save.

The student is saved as `<run dir>/student/` (safetensors + quant config) so `evaluate` and `export`
(in this run or a later one) rebuild it without the Lightning checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from torch import nn

from qat_lightning.distill.module import DistillationModule

log = logging.getLogger("qat_lightning")

STUDENT_WEIGHTS = "student.safetensors"
STUDENT_QUANT = "quant_config.json"


def build_strategy(cfg):
    """`fsdp` is FSDP2 through `ModelParallelStrategy` (works on CPU/gloo and GPUs alike)."""
    s = cfg.strategy
    if s.name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        devices = cfg.trainer.devices
        dp = devices if isinstance(devices, int) and devices > 0 else "auto"
        return ModelParallelStrategy(
            data_parallel_size=dp, tensor_parallel_size=1, process_group_backend=s.process_group_backend
        )
    if s.name in ("ddp", "ddp_spawn"):
        from lightning.pytorch.strategies import DDPStrategy

        start = "spawn" if s.name == "ddp_spawn" else "popen"
        return DDPStrategy(start_method=start, process_group_backend=s.process_group_backend)
    return "auto"


def wandb_tags(cfg) -> list[str]:
    """Tags that let one W&B view group an ablation: the W-A-KV setting, the loss, the data source."""
    q = cfg.quant
    tags = [q.setting, f"w{q.w_bits}", f"a{q.a_bits}", f"kv{q.kv_bits}", f"loss:{cfg.loss.name}",
            f"data:{cfg.data.source}", f"gen:{cfg.generation.strategy}", f"model:{cfg.model.name}"]
    return tags + list(cfg.logger.tags)


def build_logger(cfg, run_dir: Path, resolved_cfg: dict):
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


def build_callbacks(cfg, run_dir: Path) -> list[Callback]:
    cc = cfg.callbacks
    callbacks: list[Callback] = []
    if cc.checkpoint:
        # step-based saving: a checkpoint written in on_train_epoch_end resumes one epoch too far
        # (Lightning 2.6), one written after a step resumes exactly at an epoch boundary
        callbacks.append(ModelCheckpoint(
            dirpath=str(run_dir / "checkpoints"), save_last=cc.save_last, save_top_k=0 if cc.save_last else 1,
            every_n_train_steps=cc.checkpoint_every_n_steps, save_on_train_epoch_end=False,
        ))
    if cc.lr_monitor and cfg.logger.name != "none":
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks


def resolve_ckpt_path(cfg, run_dir: Path) -> str | None:
    if cfg.ckpt_path is None:
        return None
    if cfg.ckpt_path == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.exists():
            raise FileNotFoundError(f"ckpt_path=last but {last} does not exist: resume with hydra.run.dir=<old run>")
        return str(last)
    if not Path(cfg.ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path {cfg.ckpt_path} does not exist")
    return cfg.ckpt_path


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A full CPU state dict, gathered from FSDP2 shards when the model is sharded (collective)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_student(state: dict[str, torch.Tensor], quant_cfg, out_dir: Path) -> None:
    """Write the student's weights and quant config atomically (temp dir, then rename)."""
    from safetensors.torch import save_file

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # tied weights share storage: safetensors wants distinct tensors
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(tmp / STUDENT_WEIGHTS))
    (tmp / STUDENT_QUANT).write_text(json.dumps(asdict(quant_cfg), indent=2))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def load_saved_student(teacher: nn.Module, path: str | os.PathLike) -> nn.Module:
    from safetensors.torch import load_file

    from qat_lightning.quant import QuantConfig, quantize_model

    path = Path(path)
    for name in (STUDENT_WEIGHTS, STUDENT_QUANT):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not a saved student: {name} is missing")
    qcfg = QuantConfig(**json.loads((path / STUDENT_QUANT).read_text()))
    student = quantize_model(teacher, qcfg)
    missing, unexpected = student.load_state_dict(load_file(str(path / STUDENT_WEIGHTS)), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: student weights do not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return student.eval()


def train_student(ctx) -> DistillationModule:
    import warnings

    # the teacher is in eval mode on purpose
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    from qat_lightning.quant import quantize_model
    from qat_lightning.stages import build_data, sample_batches

    cfg = ctx.cfg
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    teacher, tokenizer = ctx.teacher()
    dm = build_data(ctx)
    base = teacher
    if cfg.init == "smoothquant":
        from qat_lightning.baselines import smooth_model

        base = smooth_model(teacher, sample_batches(dm, "train", cfg.calib_batches), alpha=cfg.smoothquant_alpha)
    elif cfg.init == "kvsmooth":
        from qat_lightning.baselines import kv_smooth_model

        # flattened key channels: per-token KV quantization starts far closer to the teacher (exact in FP)
        base = kv_smooth_model(teacher, sample_batches(dm, "train", cfg.calib_batches),
                               strength=cfg.kvsmooth_strength, v_alpha=cfg.kvsmooth_v_alpha)
    elif cfg.init == "gptq":
        from qat_lightning.baselines.gptq import gptq_weights

        # QAT starts where GPTQ ends: its weights are on the student's grid, so step 0 is the GPTQ baseline
        base = gptq_weights(teacher, cfg.quant, sample_batches(dm, "train", cfg.calib_batches))
    student = quantize_model(base, cfg.quant)  # a copy: the teacher is untouched
    student.requires_grad_(True).train()  # the copy inherits the frozen teacher's flags
    module = DistillationModule(
        teacher, student, cfg.loss, cfg.optim,
        shard_teacher=cfg.strategy.shard_teacher,
        reshard_after_forward=cfg.strategy.reshard_after_forward,
        gradient_checkpointing=cfg.strategy.gradient_checkpointing,
    )
    run_dir = ctx.run_dir
    trainer = L.Trainer(
        **cfg.trainer.kwargs(),
        strategy=build_strategy(cfg),
        logger=ctx.logger(),  # the run's logger: W&B writes from rank 0 only; stays open for evaluate/export
        callbacks=build_callbacks(cfg, run_dir),
        default_root_dir=str(run_dir),
        enable_checkpointing=cfg.callbacks.checkpoint,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=resolve_ckpt_path(cfg, run_dir))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    results = {"steps": trainer.global_step}
    for key, value in metrics.items():
        split, _, name = key.partition("/")
        name = name.removesuffix("_step").removesuffix("_epoch")
        if split in ("train", "val") and name:
            results[name if split == "train" else f"val_{name}"] = value
    ctx.record("train", "student", results)

    state = full_state_dict(module.student)
    if trainer.is_global_zero:
        save_student(state, cfg.quant, run_dir / "student")
    distributed = trainer.world_size > 1
    if distributed:
        # sharded models cannot be used for single-process evaluation: rank 0 reloads them, and the
        # process group goes away so single-process metrics do not try to sync with finished ranks
        ctx.drop_models()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    else:
        ctx.student = module.student.eval()
    return module


def close_logger(logger) -> None:
    """Flush the run's logger and close its W&B run, so the next job of a sweep starts its own."""
    if not logger:
        return
    logger.finalize("success")
    if type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish()
