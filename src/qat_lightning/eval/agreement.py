"""How closely a quantized student follows its teacher on held-out tokens: KL(teacher‖student) and top-1 agreement.

Perplexity mixes "the student lost the teacher's knowledge" with "the teacher was wrong anyway"; these two
metrics measure only the first, which is what data-free distillation optimizes. Both are averaged over real
(unmasked) token positions and accumulate in float64 so they sync across ranks as plain sums.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from qat_lightning.eval.ppl import model_device


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None) -> None:
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 3:
        raise ValueError(
            f"student and teacher logits must both be (B, T, V); got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if mask is not None and mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask must be (B, T) = {tuple(student_logits.shape[:2])}, got {tuple(mask.shape)}")


class TokenKL(Metric):
    """Mean over real tokens of KL(teacher‖student) = Σ_v p_t(v) (log p_t(v) - log p_s(v)), in nats."""

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("kl_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None):
        _check(student_logits, teacher_logits, mask)
        log_t = F.log_softmax(teacher_logits.float(), dim=-1)  # (B, T, V)
        log_s = F.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, T)
        if mask is not None:
            kl = kl[mask.bool()]  # (N,)
        self.kl_sum += kl.double().sum()
        self.count += kl.numel()

    def compute(self) -> torch.Tensor:
        return self.kl_sum / self.count.clamp(min=1)


class Top1Agreement(Metric):
    """Fraction of real tokens where the student's arg-max next token equals the teacher's."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("agree", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None):
        _check(student_logits, teacher_logits, mask)
        same = student_logits.argmax(-1) == teacher_logits.argmax(-1)  # (B, T)
        if mask is not None:
            same = same[mask.bool()]  # (N,)
        self.agree += same.sum()
        self.count += same.numel()

    def compute(self) -> torch.Tensor:
        return self.agree.double() / self.count.clamp(min=1)


@torch.inference_mode()
def kl_and_agreement(teacher: nn.Module, student: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """{"kl", "top1_agreement"} of `student` against `teacher` over batches with `input_ids`/`attention_mask` (B, T)."""
    t_device, s_device = model_device(teacher), model_device(student)
    kl, top1 = TokenKL().to(s_device), Top1Agreement().to(s_device)
    for batch in batches:
        if "input_ids" not in batch:
            raise ValueError(f"held-out batches need 'input_ids' (and 'attention_mask'); got keys {sorted(batch)}")
        input_ids = batch["input_ids"]  # (B, T)
        mask = batch.get("attention_mask")  # (B, T) or None
        t_logits = teacher(
            input_ids=input_ids.to(t_device), attention_mask=None if mask is None else mask.to(t_device),
            use_cache=False,
        ).logits  # (B, T, V)
        s_logits = student(
            input_ids=input_ids.to(s_device), attention_mask=None if mask is None else mask.to(s_device),
            use_cache=False,
        ).logits  # (B, T, V)
        t_logits, mask = t_logits.to(s_device), None if mask is None else mask.to(s_device)
        kl.update(s_logits, t_logits, mask)
        top1.update(s_logits, t_logits, mask)
    if kl.count.item() == 0:
        raise ValueError("no held-out tokens to compare the student with the teacher (empty batches or all masked)")
    return {"kl": kl.compute().item(), "top1_agreement": top1.compute().item()}
