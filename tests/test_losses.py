"""KD loss numerics against hand computations and torch's own kl_div / cross_entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from qat_lightning.distill.config import LossConfig
from qat_lightning.distill.losses import label_cross_entropy, soft_cross_entropy


def test_soft_ce_hand_computed_two_token_vocab():
    # one position, vocab 2: teacher probs (0.75, 0.25), student probs (0.5, 0.5)
    t = torch.tensor([[[math.log(3.0), 0.0]]])
    s = torch.zeros(1, 1, 2)
    loss, kl = soft_cross_entropy(s, t)
    expected_ce = -(0.75 * math.log(0.5) + 0.25 * math.log(0.5))
    expected_kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert loss.item() == pytest.approx(expected_ce, abs=1e-6)
    assert kl.item() == pytest.approx(expected_kl, abs=1e-6)


def test_kl_matches_torch_kl_div_per_token_and_does_not_grow_with_length():
    torch.manual_seed(0)
    s, t = torch.randn(2, 7, 11), torch.randn(2, 7, 11)
    _, kl = soft_cross_entropy(s, t)
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / (2 * 7)
    assert kl.item() == pytest.approx(ref.item(), rel=1e-5)
    # repeating the sequence doubles T: a per-token loss stays the same (batchmean would double)
    _, kl2 = soft_cross_entropy(torch.cat([s, s], 1), torch.cat([t, t], 1))
    assert kl2.item() == pytest.approx(kl.item(), rel=1e-5)


def test_soft_ce_ignores_padding_and_gradient_equals_kl_gradient():
    torch.manual_seed(1)
    s = torch.randn(1, 4, 5, requires_grad=True)
    t = torch.randn(1, 4, 5)
    mask = torch.tensor([[1, 1, 0, 0]])
    loss, _ = soft_cross_entropy(s, t, mask)
    loss_trunc, _ = soft_cross_entropy(s[:, :2], t[:, :2])
    assert loss.item() == pytest.approx(loss_trunc.item(), rel=1e-6)
    loss.backward()
    g = s.grad.clone()
    s.grad = None
    kl = F.kl_div(F.log_softmax(s[:, :2], -1), F.log_softmax(t[:, :2], -1), log_target=True, reduction="sum") / 2
    kl.backward()
    torch.testing.assert_close(g, s.grad)
    assert g[:, 2:].abs().sum() == 0


def test_temperature_scales_by_t_squared_at_identity_logits():
    s = torch.randn(1, 3, 4)
    loss1, kl1 = soft_cross_entropy(s, s, temperature=2.0)
    assert kl1.item() == pytest.approx(0.0, abs=1e-6)
    entropy = -(F.softmax(s / 2, -1) * F.log_softmax(s / 2, -1)).sum(-1).mean()
    assert loss1.item() == pytest.approx(4 * entropy.item(), rel=1e-5)


def test_label_ce_matches_hf_shifted_loss():
    torch.manual_seed(2)
    logits = torch.randn(2, 6, 9)
    ids = torch.randint(0, 9, (2, 6))
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 9), ids[:, 1:].reshape(-1))
    assert label_cross_entropy(logits, ids).item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [dict(logits=-1.0), dict(logits=0.0), dict(temperature=0.0)],
)
def test_bad_loss_configs_rejected(kwargs):
    with pytest.raises(ValueError):
        LossConfig(**kwargs)
