"""Validated configs of the `train` stage: loss, optimizer, trainer, strategy, logger, callbacks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

LOSS_TERMS = ("logits", "label", "hidden", "attention")


@dataclass
class LossConfig:
    """Weights of the distillation terms; the paper's recipe is logits=1, everything else 0.

    `logits`: cross-entropy of student log-probs against teacher probabilities at every position.
    `label`: next-token cross-entropy on the corpus tokens. `hidden`: MSE between hidden states of every
    layer. `attention`: KL between teacher and student attention maps (forces eager attention).
    """

    name: str = "logits"
    logits: float = 1.0
    label: float = 0.0
    hidden: float = 0.0
    attention: float = 0.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        weights = {t: getattr(self, t) for t in LOSS_TERMS}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"loss weights must be >= 0, got {weights}")
        if sum(weights.values()) <= 0:
            raise ValueError(f"at least one loss weight ({', '.join(LOSS_TERMS)}) must be > 0")
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")


@dataclass
class OptimConfig:
    """AdamW with a cosine schedule; LLaMA experiments use the paper's lr 2e-5, wd 0."""

    lr: float = 1e-4  # the defaults are conf/optim/small.yaml (the CPU default); the paper: optim=paper
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    scheduler: str = "cosine"  # cosine | constant
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    total_steps: int | None = None  # None: trainer.max_steps, else estimated from the data
    # AdamW kernel: "fused" (one kernel over all tensors; faster than the per-tensor loop torch uses by
    # default on CPU: 0.68 -> 0.10 s per AdamW.step on SmolLM2's shapes in a one-off 1-thread check),
    # "foreach", "loop", or "auto" (fused; foreach for sharded DTensor params and AMP)
    implementation: str = "auto"
    # lr of learned (LSQ) weight scales, no weight decay; null: `lr`. Adam moves every parameter by about
    # lr a step, so a scale (e.g. a Q4_0 block's d, ~5e-3) needs a smaller lr than the weights it scales
    scale_lr: float | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.scale_lr is not None and self.scale_lr <= 0:
            raise ValueError(f"optim.scale_lr must be > 0 or null, got {self.scale_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.scheduler not in ("cosine", "constant"):
            raise ValueError(f"optim.scheduler must be 'cosine' or 'constant', got {self.scheduler!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.implementation not in ("auto", "fused", "foreach", "loop"):
            raise ValueError(
                f"optim.implementation must be auto, fused, foreach or loop, got {self.implementation!r}"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass
class StrategyConfig:
    """How ranks share the work. `fsdp` is FSDP2 (`fully_shard` per decoder layer, student AND teacher)."""

    name: str = "auto"  # auto | ddp | ddp_spawn | fsdp
    shard_teacher: bool = True
    reshard_after_forward: bool = True
    gradient_checkpointing: bool = False
    process_group_backend: str | None = None  # None: nccl on GPUs, gloo on CPU

    def __post_init__(self) -> None:
        if self.name not in ("auto", "ddp", "ddp_spawn", "fsdp"):
            raise ValueError(f"strategy.name must be one of auto, ddp, ddp_spawn, fsdp; got {self.name!r}")


@dataclass
class TrainerConfig:
    """The subset of `lightning.Trainer` arguments we expose (all passed through as is)."""

    accelerator: str = "cpu"  # conf/trainer/cpu.yaml; trainer=gpu for GPUs
    devices: Any = 1
    num_nodes: int = 1
    precision: str = "32-true"
    max_steps: int = -1
    max_epochs: int | None = 1
    max_time: str | None = None  # "DD:HH:MM:SS": stop training there (then evaluate/export what was trained)
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 5
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    num_sanity_val_steps: int = 0
    deterministic: bool = False
    enable_progress_bar: bool = True
    benchmark: bool | None = None

    def __post_init__(self) -> None:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"trainer.max_steps must be -1 (use max_epochs) or > 0, got {self.max_steps}")
        if self.max_time is not None and not re.fullmatch(r"\d{2}:\d{2}:\d{2}:\d{2}", str(self.max_time)):
            raise ValueError(f"trainer.max_time must be DD:HH:MM:SS (e.g. 00:02:30:00), got {self.max_time!r}")
        if self.accumulate_grad_batches < 1:
            raise ValueError(f"trainer.accumulate_grad_batches must be >= 1, got {self.accumulate_grad_batches}")
        valid = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
        if str(self.precision) not in valid:
            raise ValueError(f"trainer.precision must be one of {', '.join(valid)}; got {self.precision!r}")

    def kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None or k in ("max_epochs",)}


@dataclass
class LoggerConfig:
    """W&B offline by default (no account needed); `offline=false` logs online."""

    name: str = "wandb"  # wandb | csv | none
    project: str = "qat-lightning"
    entity: str | None = None
    offline: bool = True
    group: str | None = None  # None: the experiment name
    tags: list[str] = field(default_factory=list)
    log_model: bool = False

    def __post_init__(self) -> None:
        if self.name not in ("wandb", "csv", "none"):
            raise ValueError(f"logger.name must be wandb, csv or none; got {self.name!r}")


@dataclass
class CallbacksConfig:
    checkpoint: bool = True
    checkpoint_every_n_steps: int = 50
    save_last: bool = True
    lr_monitor: bool = True
    # an exponential moving average of the student's weights (distill/ema.py), the trained student when set;
    # it starts at the first optimizer step >= ema_start_step (as a copy) and averages every step after
    ema_decay: float | None = None
    ema_start_step: int = 0

    def __post_init__(self) -> None:
        if self.checkpoint_every_n_steps < 1:
            raise ValueError(f"callbacks.checkpoint_every_n_steps must be >= 1, got {self.checkpoint_every_n_steps}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"callbacks.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.ema_start_step < 0:
            raise ValueError(f"callbacks.ema_start_step must be >= 0, got {self.ema_start_step}")
