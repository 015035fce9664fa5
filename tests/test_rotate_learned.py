"""Learned rotations (rotate/learned.py, SpinQuant-style): FP function kept, quantized KL lowered, a method."""

from __future__ import annotations

import pytest
import torch

from qat_lightning.models import build_tiny_config, build_tiny_model
from qat_lightning.quant import QuantConfig, quantize_model
from qat_lightning.rotate import rotate_model, rotation_of
from qat_lightning.rotate.learned import learn_rotations

QCFG = QuantConfig(w_bits=4, a_bits=4, kv_bits=4)
# 2-bit weights: on a tiny random model the W4A4 error is at the noise level of a few steps (KL ~5e-4 that
# 100 steps move by +-30 %), while W2 gives a signal a broken gradient could not reduce (245e-4 -> 20e-4)
W2 = QuantConfig(w_bits=2, a_bits=16, kv_bits=16)


@torch.no_grad()
def outlier_teacher(arch: str = "llama") -> torch.nn.Module:
    """A tiny model with random norm scales and two outlier residual channels (what rotations are for)."""
    model = build_tiny_model(build_tiny_config(arch=arch, tie_word_embeddings=True))
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.model.embed_tokens.weight[:, [3, 17]] *= 20
    return model.eval()


def batches(n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 256, (2, 32), generator=g)} for _ in range(n)]


@torch.no_grad()
def quantized_kl(model: torch.nn.Module, teacher: torch.nn.Module, data: list[dict], qcfg: QuantConfig) -> float:
    from qat_lightning.distill.losses import soft_cross_entropy

    student = quantize_model(model, qcfg)
    kls = [soft_cross_entropy(student(input_ids=b["input_ids"], use_cache=False).logits,
                              teacher(input_ids=b["input_ids"], use_cache=False).logits)[1] for b in data]
    return float(torch.stack(kls).mean())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_learned_rotations_keep_fp_logits_and_lower_the_quantized_kl(arch):
    teacher = outlier_teacher(arch)
    data = batches()
    learned, kl = learn_rotations(teacher, W2, data, steps=60, lr=1e-3, seed=0)
    ids = data[0]["input_ids"]
    with torch.no_grad():
        ref = teacher(input_ids=ids, use_cache=False).logits
        out = learned(input_ids=ids, use_cache=False).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4  # still the teacher's FP function
    quarot = rotate_model(teacher, seed=0)  # the Hadamard it started from
    assert kl[0] == pytest.approx(quantized_kl(quarot, teacher, data[:1], W2), rel=1e-4)  # step 0: that start
    start = quantized_kl(quarot, teacher, data, W2)
    end = quantized_kl(learned, teacher, data, W2)
    assert end < 0.5 * start, (start, end)
    rec = rotation_of(learned)
    assert rec["r1"] and rec["r2"] and rec["learned"]["steps"] == 60


def test_learned_rotations_refuse_bad_settings():
    teacher = outlier_teacher()
    with pytest.raises(ValueError, match="steps >= 1"):
        learn_rotations(teacher, QCFG, batches(), steps=0)
    with pytest.raises(ValueError, match="calibration batches"):
        learn_rotations(teacher, QCFG, [], steps=1)
    lsq = QuantConfig(w_bits=4, a_bits=4, kv_bits=4, lsq=True)
    with pytest.raises(ValueError, match="LSQ"):
        learn_rotations(teacher, lsq, batches(), steps=1)


def test_init_spinquant_starts_qat_from_the_learned_rotation(tmp_path, monkeypatch):
    """`init=spinquant` and `evaluate.methods=[spinquant]` through a run: with a vanishing lr the trained
    student is the spinquant baseline's student, the learned rotation differs from QuaRot's start, and the
    rotation is learned once for both (the run keeps init's rewrite for evaluate)."""
    import qat_lightning.rotate.learned as learned

    calls = []
    real = learned.learn_rotations
    monkeypatch.setattr(learned, "learn_rotations", lambda *a, **k: calls.append(1) or real(*a, **k))
    from conftest import compose, tiny_overrides
    from qat_lightning.config import validate_config
    from qat_lightning.results import load_results
    from qat_lightning.run.context import RunContext
    from qat_lightning.stages import run_stages

    cfg = validate_config(compose(["+exp=tiny_w4a8kv4", *tiny_overrides(tmp_path), "stages=[train,evaluate]",
                                   "init=spinquant", "methods.spinquant.steps=8", "methods.spinquant.lr=1e-2",
                                   "trainer.max_steps=1", "optim.lr=1e-12", "logger=none",
                                   "evaluate.methods=[quarot,spinquant,qat]", "evaluate.tasks=[kl]"]))
    run_stages(RunContext(cfg, tmp_path / "run"))
    results = load_results(tmp_path / "run")
    kl = {m: results[f"evaluate/{m}/kl"] for m in ("quarot", "spinquant", "qat")}
    assert kl["qat"] == pytest.approx(kl["spinquant"], rel=1e-5), kl
    assert abs(kl["spinquant"] - kl["quarot"]) > 1e-3 * kl["quarot"], kl
    assert len(calls) == 1


def test_spinquant_gptq_is_gptq_on_the_learned_rotation():
    """`spinquant_gptq` = the spinquant rotation (same seed, steps, lr) + GPTQ's weights: its student is
    closer to the teacher than spinquant's RTN student, and it keeps the learned rotation's record."""
    from qat_lightning.baselines import build_method

    teacher = outlier_teacher()
    data = batches()
    params = {"steps": 20, "lr": 1e-3}
    rtn_student = build_method("spinquant", params).build(teacher, W2, data)
    gptq_method = build_method("spinquant_gptq", params)
    gptq_student = gptq_method.build(teacher, W2, data)
    assert rotation_of(gptq_student)["learned"]["steps"] == 20
    assert gptq_method.student_config(W2) != W2  # the weights are already on the grid: no second rounding

    def kl(student):
        from qat_lightning.distill.losses import soft_cross_entropy

        with torch.no_grad():
            return float(torch.stack([soft_cross_entropy(student(input_ids=b["input_ids"], use_cache=False).logits,
                                                         teacher(input_ids=b["input_ids"], use_cache=False).logits)[1]
                                      for b in data]).mean())

    assert kl(gptq_student) < 0.9 * kl(rtn_student), (kl(gptq_student), kl(rtn_student))
    with pytest.raises(ValueError, match="percdamp|block_size"):
        build_method("spinquant_gptq", {"percdamp": -1.0})
