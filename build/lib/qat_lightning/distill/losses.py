"""Distillation losses: the paper's soft-label cross-entropy and the ablations it found worse.

All terms are normalised per (non-padded) token, so the loss does not grow with sequence length or batch
size (the reference's `kl_div(..., reduction="batchmean")` on (B, T, V) divides by B only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from qat_lightning.distill.config import LossConfig


def _masked_token_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    # per_token: (B, T); mask: (B, T) of 0/1
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of student log-probs against teacher probs at every position, and the KL (detached).

    The CE and KL(teacher || student) differ by the teacher's entropy, a constant for the student, so
    their gradients are equal; CE is what the paper optimises, KL is the interpretable number to log.
    With temperature T the loss is scaled by T^2 (Hinton et al.) so gradient magnitudes stay comparable.

    Args:
        student_logits: (B, T, V)
        teacher_logits: (B, T, V)
        mask: (B, T), 1 for real tokens.
    Returns:
        (loss, kl), both scalars, per-token means.
    """
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    log_p_s = F.log_softmax(s, dim=-1)  # (B, T, V)
    log_p_t = F.log_softmax(t, dim=-1)  # (B, T, V)
    p_t = log_p_t.exp()
    ce = -(p_t * log_p_s).sum(-1)  # (B, T)
    with torch.no_grad():
        neg_entropy = (p_t * log_p_t).sum(-1)  # (B, T)
        kl = _masked_token_mean(ce.detach() + neg_entropy, mask)
    return _masked_token_mean(ce, mask) * temperature**2, kl


def label_cross_entropy(student_logits: Tensor, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Next-token CE on the corpus tokens (the hard-label ablation)."""
    logits = student_logits[:, :-1].float()  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    per_token = per_token.view_as(targets)
    target_mask = None if mask is None else (mask[:, 1:] * mask[:, :-1])
    return _masked_token_mean(per_token, target_mask)


def hidden_mse(student_hidden: tuple[Tensor, ...], teacher_hidden: tuple[Tensor, ...], mask: Tensor | None) -> Tensor:
    """Mean over layers of the per-token MSE between hidden states (embedding output excluded)."""
    losses = []
    for hs, ht in zip(student_hidden[1:], teacher_hidden[1:]):
        per_token = (hs.float() - ht.float()).pow(2).mean(-1)  # (B, T)
        losses.append(_masked_token_mean(per_token, mask))
    return torch.stack(losses).mean()


def attention_kl(student_attn: tuple[Tensor, ...], teacher_attn: tuple[Tensor, ...], mask: Tensor | None) -> Tensor:
    """Mean over layers and heads of KL(teacher || student) between attention rows (per query token)."""
    losses = []
    for a_s, a_t in zip(student_attn, teacher_attn):
        # a_*: (B, nh, T, T), rows are distributions over keys
        a_t = a_t.float()
        kl = (a_t * (a_t.clamp_min(1e-12).log() - a_s.float().clamp_min(1e-12).log())).sum(-1)  # (B, nh, T)
        losses.append(_masked_token_mean(kl.mean(1), mask))
    return torch.stack(losses).mean()


@dataclass
class LossOutput:
    loss: Tensor
    terms: dict[str, Tensor]


class DistillationLoss:
    """Weighted sum of the configured terms; tells the caller which model outputs it needs."""

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    @property
    def needs_hidden_states(self) -> bool:
        return self.cfg.hidden > 0

    @property
    def needs_attentions(self) -> bool:
        return self.cfg.attention > 0

    @property
    def needs_teacher(self) -> bool:
        return self.cfg.logits > 0 or self.cfg.hidden > 0 or self.cfg.attention > 0

    def __call__(self, student_out, teacher_out, input_ids: Tensor, mask: Tensor | None) -> LossOutput:
        cfg = self.cfg
        terms: dict[str, Tensor] = {}
        total = student_out.logits.new_zeros((), dtype=torch.float32)
        if teacher_out is not None:
            ce, kl = soft_cross_entropy(student_out.logits, teacher_out.logits, mask, cfg.temperature)
            terms["kl"] = kl
            if cfg.logits > 0:
                terms["logits"] = ce
                total = total + cfg.logits * ce
        if cfg.label > 0:
            terms["label"] = label_cross_entropy(student_out.logits, input_ids, mask)
            total = total + cfg.label * terms["label"]
        if cfg.hidden > 0:
            terms["hidden"] = hidden_mse(student_out.hidden_states, teacher_out.hidden_states, mask)
            total = total + cfg.hidden * terms["hidden"]
        if cfg.attention > 0:
            terms["attention"] = attention_kl(student_out.attentions, teacher_out.attentions, mask)
            total = total + cfg.attention * terms["attention"]
        return LossOutput(total, terms)
