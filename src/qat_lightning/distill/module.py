"""`DistillationModule`: the frozen full-precision teacher and the fake-quantized student, trained by KD.

The module receives ready-made models (the student comes from `quant.quantize_model`), so the same class
trains any HF causal LM; sharding happens in `configure_model` (FSDP2), after the LSQ scales were
initialised from the full, unsharded weights.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from torch import nn

from qat_lightning.distill.config import LossConfig, OptimConfig
from qat_lightning.distill.losses import DistillationLoss


class NonFiniteLossError(RuntimeError):
    """Raised (on every rank) when the loss is NaN/inf: the run stops before any checkpoint is written."""


class DistillationModule(L.LightningModule):
    """KD quantization-aware training of `student` against the frozen `teacher`."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        loss: LossConfig,
        optim: OptimConfig,
        shard_teacher: bool = True,
        reshard_after_forward: bool = True,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.loss_cfg = loss
        self.optim_cfg = optim
        self.criterion = DistillationLoss(loss)
        self.shard_teacher = shard_teacher
        self.reshard_after_forward = reshard_after_forward
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        if self.criterion.needs_attentions:
            # attention maps are only returned by the eager implementation
            for model in (self.teacher, self.student):
                model.set_attn_implementation("eager")
        if gradient_checkpointing:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # the teacher is frozen and reloadable: checkpoints hold the student only
        self.strict_loading = False
        self._last_step_time: float | None = None

    # ---- sharding -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """FSDP2 under `ModelParallelStrategy`: shard each decoder layer, then the root, of both models."""
        if self._device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        models = [self.student] + ([self.teacher] if self.shard_teacher else [])
        for model in models:
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
            fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward)

    # ---- steps ----------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # Lightning flips the whole module to train(); the teacher never leaves eval
        return self

    def _forward_both(self, batch: dict[str, torch.Tensor]):
        input_ids = batch["input_ids"]  # (B, T)
        mask = batch.get("attention_mask")  # (B, T)
        kwargs = dict(
            attention_mask=mask,
            output_hidden_states=self.criterion.needs_hidden_states,
            output_attentions=self.criterion.needs_attentions,
            use_cache=False,
        )
        # the teacher runs even for the label-only ablation: KL and agreement are always logged
        with torch.no_grad():
            teacher_out = self.teacher(input_ids, **kwargs)
        student_out = self.student(input_ids, **kwargs)
        out = self.criterion(student_out, teacher_out, input_ids, mask)
        with torch.no_grad():
            agree = (student_out.logits.argmax(-1) == teacher_out.logits.argmax(-1)).float()  # (B, T)
            m = mask.float() if mask is not None else torch.ones_like(agree)
            out.terms["top1_agreement"] = (agree * m).sum() / m.sum().clamp_min(1)
        return out, int(m.sum().item())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out, num_tokens = self._forward_both(batch)
        finite = bool(torch.isfinite(out.loss).item())
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLossError(
                f"non-finite KD loss at step {self.global_step} ({out.loss.item()}): stopping; the last good "
                "checkpoint is kept. Lower optim.lr, raise the bits, or enable gradient clipping."
            )
        now = time.perf_counter()
        if self._last_step_time is not None:
            tokens = num_tokens * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / max(now - self._last_step_time, 1e-9), on_step=True)
        self._last_step_time = now
        self.log("train/loss", out.loss, on_step=True, prog_bar=True, sync_dist=False)
        for name, value in out.terms.items():
            self.log(f"train/{name}", value, on_step=True, prog_bar=name == "kl")
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out, num_tokens = self._forward_both(batch)
        bs = batch["input_ids"].size(0)
        self.log("val/loss", out.loss, on_epoch=True, sync_dist=True, batch_size=bs, prog_bar=True)
        for name, value in out.terms.items():
            self.log(f"val/{name}", value, on_epoch=True, sync_dist=True, batch_size=bs)

    # ---- optimisation ---------------------------------------------------------------------------
    def _total_steps(self) -> int:
        if self.optim_cfg.total_steps:
            return self.optim_cfg.total_steps
        trainer = self.trainer
        loader_was_built = trainer.train_dataloader is not None
        steps = max(1, int(trainer.estimated_stepping_batches))
        if not loader_was_built and trainer.ckpt_path is not None:
            # Lightning built the train loader just now, before it restores the checkpoint's loop progress, so
            # that loader cannot skip what the interrupted epoch trained on and would replay it from batch 0
            # (it did, in #15's resumed runs). Dropping it makes `fit_loop.setup_data` build it again after the
            # restore (tests/test_train.py::test_resume_in_the_middle_of_an_epoch_is_exact[schedule_from_the_data]).
            trainer.fit_loop._combined_loader = None
        return steps

    def configure_optimizers(self):
        cfg = self.optim_cfg
        named = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        scales = [p for n, p in named if n.endswith("weight_scale")]  # LSQ steps: their own lr, no decay
        params: list = [p for n, p in named if not n.endswith("weight_scale")]
        if scales:
            lr = cfg.lr if cfg.scale_lr is None else cfg.scale_lr
            params = [{"params": params}, {"params": scales, "lr": lr, "weight_decay": 0.0}]
        impl = cfg.implementation
        if impl == "auto":
            # foreach where fused is not safe: FSDP2's DTensor shards, and AMP ("*-mixed"), whose grad clipping
            # Lightning refuses for optimizers that unscale internally
            precision = str(self._trainer.precision) if self._trainer is not None else ""
            impl = "foreach" if self._device_mesh is not None or "mixed" in precision else "fused"
        kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[impl]
        optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps, **kernel
        )
        if cfg.scheduler == "constant" and cfg.warmup_steps == 0:
            return optimizer
        # transformers' schedulers (linear warmup from 0, then constant or a cosine down to min_lr_ratio * lr)
        from transformers.optimization import (
            get_constant_schedule_with_warmup,
            get_cosine_with_min_lr_schedule_with_warmup,
        )

        if cfg.scheduler == "constant":
            scheduler = get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
        else:
            scheduler = get_cosine_with_min_lr_schedule_with_warmup(
                optimizer, cfg.warmup_steps, self._total_steps(), min_lr_rate=cfg.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._device_mesh is not None:
            return  # a sharded (FSDP2) checkpoint is loaded against the full module: keep the teacher shards
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            for key in [k for k in state if k.startswith("teacher.")]:
                del state[key]
