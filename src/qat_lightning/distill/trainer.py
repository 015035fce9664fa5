"""The `train` stage: student from the `init` method, Lightning Trainer (strategy, callbacks), fit, save.

It receives the run's context (teacher, data, logger) and builds nothing the run owns: the logger is the
run's (`run/loggers.py`), the data is the run's DataModule. The student is saved as `<run dir>/student/`
(`student_io.py`) so `evaluate` and `export`, in this run or a later one, rebuild it without the checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from torch import nn

from qat_lightning.distill.ema import StudentEMA
from qat_lightning.distill.module import DistillationModule
from qat_lightning.distill.student_io import save_student

log = logging.getLogger("qat_lightning")



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


def build_callbacks(cfg, run_dir: Path) -> list[Callback]:
    cc = cfg.callbacks
    callbacks: list[Callback] = []
    if cc.ema_decay is not None:
        callbacks.append(StudentEMA(cc.ema_decay, cc.ema_start_step))
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


def train_student(ctx) -> DistillationModule:
    import warnings

    # the teacher is in eval mode on purpose
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    from qat_lightning.quant import quantize_model

    cfg = ctx.cfg
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    teacher, _ = ctx.teacher()
    dm = ctx.datamodule()
    # where QAT starts: the teacher, or a post-training method's FP rewrite of it (`init=<method>`), e.g.
    # smoothquant (the paper's "LLM-QAT + SmoothQuant"), gptq (step 0 is ~the GPTQ baseline), kvsmooth
    method = cfg.method(cfg.init)
    scored_later = "evaluate" in cfg.stages and any(
        m in cfg.methods and cfg.method(m) == method for m in cfg.evaluate.methods)  # kept, not redone
    base = ctx.transformed(method, keep=scored_later)
    student = method.finish_student(quantize_model(base, cfg.quant, inplace=base is not teacher))
    student.requires_grad_(True).train()  # the copy inherits the frozen teacher's flags
    module = DistillationModule(
        teacher, student, cfg.loss, cfg.optim,
        shard_teacher=cfg.strategy.shard_teacher,
        reshard_after_forward=cfg.strategy.reshard_after_forward,
        gradient_checkpointing=cfg.strategy.gradient_checkpointing,
    )
    run_dir = ctx.run_dir
    callbacks = build_callbacks(cfg, run_dir)
    trainer = L.Trainer(
        **cfg.trainer.kwargs(),
        strategy=build_strategy(cfg),
        logger=ctx.logger(),  # the run's logger: W&B writes from rank 0 only; stays open for evaluate/export
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        enable_checkpointing=cfg.callbacks.checkpoint,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=resolve_ckpt_path(cfg, run_dir))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    results = {"steps": trainer.global_step}
    ema = [c for c in callbacks if isinstance(c, StudentEMA)]
    if ema and ema[0].copy_to(module):  # the student is the average from here on (saved, evaluated, exported)
        results["ema_decay"] = cfg.callbacks.ema_decay
    for key, value in metrics.items():
        split, _, name = key.partition("/")
        name = name.removesuffix("_step").removesuffix("_epoch")
        if split in ("train", "val") and name:
            results[name if split == "train" else f"val_{name}"] = value
    ctx.record("train", "student", results)

    state = full_state_dict(module.student)
    if trainer.is_global_zero:
        from qat_lightning.rotate.absorb import rotation_of

        ctx.trained_path = save_student(state, cfg.quant, run_dir / "student", rotation=rotation_of(module.student))
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
        ctx.trained_student = module.student.eval()
    return module


