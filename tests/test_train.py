"""The train stage end to end: CLI run, W&B offline, resume, NaN guard, FSDP2/DDP on CPU, sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from qat_lightning.config import validate_config
from qat_lightning.results import load_results
from qat_lightning.stages import RunContext, run_stages

FAST = ["generation.num_sequences=16", "generation.max_length=40", "generation.batch_size=8",
        "generation.shard_size=8", "data.block_size=32", "data.batch_size=2", "evaluate.kl_batches=1"]


def run_cli(args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None):
    proc = subprocess.run(
        [sys.executable, "-m", "qat_lightning", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "WANDB_MODE": "offline", **(env or {})},
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_cli_end_to_end_writes_results_wandb_checkpoint_and_student(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["+exp=tiny_w4a8kv4", f"hydra.run.dir={run_dir}", "logger=wandb",
                    "stages=[generate,train,evaluate,export]", *FAST], cwd=tmp_path)
    results = load_results(run_dir)
    for key in ("generate/teacher/num_sequences", "generate/teacher/tokens_per_s", "train/student/loss",
                "train/student/steps", "evaluate/fp/kl", "evaluate/rtn/kl", "evaluate/qat/kl"):
        assert key in results, key
    assert results["generate/teacher/num_sequences"] == 16
    assert results["train/student/steps"] == 3
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run"
    # evaluation results reach the dashboard too, not only the training curves
    (record,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"evaluate/qat/kl" in record.read_bytes() and b"evaluate/rtn/kl" in record.read_bytes()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "student" / "student.safetensors").exists()
    assert "| qat |" in proc.stdout and (run_dir / "results.md").exists()
    # the corpus path is in the log
    assert "generated corpus:" in (proc.stdout + proc.stderr)
    # the export stage wrote a real low-bit model that loads and runs
    from qat_lightning.export import load_exported

    assert 0 < results["export/student/ratio"] < 1
    model = load_exported(run_dir / "export")
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()


def _in_process(cfg_overrides, tmp_path, run="run"):
    from conftest import compose

    cfg = validate_config(compose(["+exp=tiny_w4a8kv4", *tiny_overrides(tmp_path), *cfg_overrides]))
    ctx = RunContext(cfg, tmp_path / run)
    run_stages(ctx)
    return load_results(tmp_path / run), ctx


# 6 steps over epochs of 3 batches, a checkpoint after every step
RESUME_COMMON = ["trainer.max_steps=6", "trainer.max_epochs=null", "trainer.limit_train_batches=3",
                 "trainer.limit_val_batches=1", "stages=[train]", "logger=none", "optim.total_steps=6",
                 "callbacks.checkpoint_every_n_steps=1"]


def test_resume_from_last_reaches_the_same_final_loss(tmp_path):
    # epochs of 3 batches; the interrupted run stops after epoch 0 with the schedule of the full 6 steps
    common = RESUME_COMMON
    full, _ = _in_process(common, tmp_path, run="full")
    part, _ = _in_process([*common, "trainer.max_steps=3"], tmp_path, run="resumed")
    assert part["train/student/steps"] == 3
    assert part["train/student/loss"] != pytest.approx(full["train/student/loss"], rel=1e-5, abs=1e-6)
    resumed, _ = _in_process([*common, "ckpt_path=last"], tmp_path, run="resumed")
    assert resumed["train/student/steps"] == 6
    assert resumed["train/student/loss"] == pytest.approx(full["train/student/loss"], rel=1e-5, abs=1e-6)


# The recipes' path: `max_epochs` set and `optim.total_steps` unset, so `configure_optimizers` asks Lightning for
# `estimated_stepping_batches`, which builds the train loader before the checkpoint's loop progress is restored;
# that loader must not be the one the resumed run trains on, or it replays the epoch from batch 0 (it did until
# 2026-12-06). The stopped run's own schedule is then 2 steps long (its max_steps); 3 warmup steps make its two
# lrs equal the full run's, as for a run stopped by a signal.
SCHEDULE_FROM_THE_DATA = ["trainer.max_epochs=2", "optim.total_steps=null", "optim.warmup_steps=3"]


@pytest.mark.parametrize("schedule", [[], SCHEDULE_FROM_THE_DATA], ids=["total_steps_set", "schedule_from_the_data"])
def test_resume_in_the_middle_of_an_epoch_is_exact(tmp_path, schedule):
    """Stopped at step 2 of a 3-batch epoch and resumed: the same batches, the same final loss and weights."""
    common = [*RESUME_COMMON, *schedule]
    full, _ = _in_process(common, tmp_path, run="full")
    part, _ = _in_process([*common, "trainer.max_steps=2"], tmp_path, run="resumed")
    assert part["train/student/steps"] == 2
    resumed, _ = _in_process([*common, "ckpt_path=last"], tmp_path, run="resumed")
    assert resumed["train/student/steps"] == 6
    assert resumed["train/student/loss"] == pytest.approx(full["train/student/loss"], rel=1e-5, abs=1e-6)
    full_w, resumed_w = _saved_student(tmp_path / "full"), _saved_student(tmp_path / "resumed")
    for name, w in full_w.items():
        torch.testing.assert_close(resumed_w[name], w, rtol=1e-5, atol=1e-6, msg=name)


def _saved_student(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "student" / "student.safetensors"))


def test_ema_student_is_the_average_of_the_trained_weights_and_resumes_exactly(tmp_path):
    """callbacks.ema_decay=0.5 from step 2 over 4 steps: the saved student is W2, then lerp(., W3, 0.5), then
    lerp(., W4, 0.5) of the plain runs' weights after 2, 3, 4 steps (same seed and 6-step schedule); the last
    checkpoint keeps the raw W4 to resume from, and a run stopped at step 3 and resumed ends on the same average."""
    plain = {k: _saved_student(_in_process([*RESUME_COMMON, f"trainer.max_steps={k}"], tmp_path,
                                           run=f"plain{k}")[1].run_dir) for k in (2, 3, 4)}
    ema = ["callbacks.ema_decay=0.5", "callbacks.ema_start_step=2"]
    results, ctx = _in_process([*RESUME_COMMON, *ema, "trainer.max_steps=4"], tmp_path, run="ema")
    assert results["train/student/steps"] == 4 and results["train/student/ema_decay"] == 0.5
    student = _saved_student(ctx.run_dir)
    moved = 0
    for name, w4 in plain[4].items():
        if not w4.is_floating_point():
            continue
        expected = torch.lerp(torch.lerp(plain[2][name], plain[3][name], 0.5), w4, 0.5)
        torch.testing.assert_close(student[name], expected, rtol=0, atol=1e-6, msg=name)
        moved += not torch.equal(plain[2][name], w4)
    assert moved > 0, "no weight moved in training: the test would pass for any average"
    assert not all(torch.equal(student[n], plain[4][n]) for n in plain[4]), "the student is the last weights"
    state = torch.load(ctx.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for name, w4 in plain[4].items():
        torch.testing.assert_close(state["state_dict"][f"student.{name}"], w4, rtol=0, atol=0, msg=name)
    _in_process([*RESUME_COMMON, *ema, "trainer.max_steps=3"], tmp_path, run="ema_resumed")
    _, resumed = _in_process([*RESUME_COMMON, *ema, "trainer.max_steps=4", "ckpt_path=last"], tmp_path,
                             run="ema_resumed")
    for name, value in _saved_student(resumed.run_dir).items():
        torch.testing.assert_close(value, student[name], rtol=0, atol=1e-6, msg=name)
    # the raw weights of an EMA run: its last checkpoint, "resumed" without the EMA into another run dir, trains no
    # step and saves W4 (how a goal run compares EMA with no EMA on one trajectory, docs/BENCHMARKS.md)
    raw, again = _in_process([*RESUME_COMMON, "trainer.max_steps=4",
                              f"ckpt_path={ctx.run_dir / 'checkpoints' / 'last.ckpt'}"], tmp_path, run="raw_of_ema")
    assert raw["train/student/steps"] == 4 and "ema_decay" not in str(raw)
    for name, w4 in plain[4].items():
        torch.testing.assert_close(_saved_student(again.run_dir)[name], w4, rtol=0, atol=0, msg=name)


def test_ema_is_refused_with_fsdp_at_start_up(tmp_path):
    from conftest import compose
    from qat_lightning.config import ConfigError

    with pytest.raises(ConfigError, match="not strategy=fsdp"):
        validate_config(compose(["+exp=tiny_w4a8kv4", *tiny_overrides(tmp_path), "strategy=fsdp",
                                 "callbacks.ema_decay=0.99"]))


def test_a_spent_time_budget_stops_training_and_the_run_still_evaluates(tmp_path):
    """trainer.max_time=00:00:00:00 (Lightning's Timer): no step of the 6, then evaluate scores the student."""
    common = [*RESUME_COMMON, "stages=[train,evaluate]", "evaluate.methods=[qat]", "evaluate.tasks=[kl]",
              "evaluate.kl_batches=1"]
    spent, _ = _in_process([*common, "trainer.max_time=00:00:00:00"], tmp_path, run="spent")
    assert spent["train/student/steps"] == 0
    assert spent["evaluate/qat/kl"] is not None


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    from qat_lightning.distill.module import NonFiniteLossError

    overrides = ["trainer.max_steps=5", "trainer.max_epochs=null", "stages=[train]", "logger=none",
                 "callbacks.checkpoint_every_n_steps=1"]
    from conftest import compose

    cfg = validate_config(compose(["+exp=tiny_w4a8kv4", *tiny_overrides(tmp_path), *overrides]))
    ctx = RunContext(cfg, tmp_path / "run")
    teacher, _ = ctx.teacher()
    calls = {"n": 0}

    def poison_after_two_steps(module, inputs, output):
        if module is not teacher.lm_head:  # the student is a deep copy: it inherits this hook
            return output
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 2 else output

    from qat_lightning.stages import stage_generate, stage_train

    stage_generate(ctx)  # the teacher writes its corpus before it is poisoned
    teacher.lm_head.register_forward_hook(poison_after_two_steps)
    with pytest.raises(NonFiniteLossError, match="non-finite KD loss"):
        stage_train(ctx)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"]), "teacher weights in the checkpoint"


@pytest.mark.distributed
# DDP also runs in make test through the multirun sweep test below; its own run is a slow one
@pytest.mark.parametrize("strategy", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_two_process_training_on_cpu(strategy, tmp_path):
    run_dir = tmp_path / "run"
    args = ["+exp=tiny_w4a8kv4", f"hydra.run.dir={run_dir}", f"strategy={strategy}", "trainer.devices=2",
            "logger=csv", *FAST, "evaluate.methods=[fp,qat]"]
    run_cli(args, cwd=tmp_path, timeout=400)
    results = load_results(run_dir)
    assert results["train/student/steps"] == 3
    assert results["evaluate/qat/kl"] is not None
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    if strategy == "fsdp":
        assert ckpt.is_dir() and list(ckpt.glob("*.distcp")), "FSDP2 writes a distributed checkpoint"
        # resume from the sharded checkpoint for more steps
        more = ["ckpt_path=last", "trainer.max_steps=5", "trainer.max_epochs=null", "stages=[train]"]
        run_cli([*args, *more], cwd=tmp_path, timeout=400)
        assert load_results(run_dir)["train/student/steps"] == 5


@pytest.mark.distributed
def test_multirun_sweep_one_dir_and_results_per_job_even_with_ddp(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(["-m", "+exp=tiny_w4a8kv4", "quant.w_bits=4,8", f"hydra.sweep.dir={sweep}", "strategy=ddp",
             "trainer.devices=2", "logger=csv", *FAST, "evaluate.methods=[qat]"], cwd=tmp_path, timeout=600)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"], f"unexpected sweep layout {jobs}"
    bits = []
    for job in jobs:
        results = load_results(sweep / job)
        assert results["train/student/steps"] == 3
        cfg = json.loads(json.dumps(results))
        bits.append(cfg)
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists(), "duplicate sweep dirs"
    overrides = [(sweep / j / ".hydra" / "overrides.yaml").read_text() for j in jobs]
    assert "quant.w_bits=4" in overrides[0] and "quant.w_bits=8" in overrides[1]


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_adamw_kernels_take_the_same_step_as_the_per_tensor_loop(impl):
    """`optim.implementation` only changes speed: one KD step lands on the loop implementation's weights."""
    import copy

    from qat_lightning.distill.config import LossConfig, OptimConfig
    from qat_lightning.distill.module import DistillationModule
    from qat_lightning.models.tiny import build_tiny_config, build_tiny_model
    from qat_lightning.quant import QuantConfig, quantize_model

    teacher = build_tiny_model(build_tiny_config(), seed=0).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    students = {}
    for name in ("loop", impl):
        student = quantize_model(copy.deepcopy(teacher), QuantConfig(w_bits=4, a_bits=8, kv_bits=4))
        student.requires_grad_(True)  # the module froze the shared teacher the copy was made from
        module = DistillationModule(teacher, student, LossConfig(), OptimConfig(lr=1e-3, implementation=name,
                                                                                  scheduler="constant",
                                                                                  warmup_steps=0))
        opt = module.configure_optimizers()
        assert opt.defaults["fused" if name == "fused" else "foreach"] is (name != "loop")
        with torch.no_grad():
            target = torch.log_softmax(teacher(ids).logits, -1)
        for _ in range(2):
            loss = -(target.exp() * torch.log_softmax(student(ids).logits, -1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        students[name] = student
    for (n, a), b in zip(students["loop"].named_parameters(), students[impl].parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="optim.implementation"):
        OptimConfig(implementation="adam8bit")


def test_exported_model_is_scored_by_the_same_harness(tmp_path):
    """`evaluate.methods=[qat,export]`: the integer model reloaded from disk scores like the student it came from
    (identically with fp32 storage), so deployment numbers sit beside the training ones."""
    results, _ = _in_process(["stages=[generate,train,export,evaluate]", "evaluate.methods=[qat,export]",
                              "export.scale_dtype=float32", "export.fp_dtype=float32", "evaluate.kl_batches=2"],
                             tmp_path)
    assert results["evaluate/export/kl"] > 0
    assert results["evaluate/export/kl"] == pytest.approx(results["evaluate/qat/kl"], rel=1e-5, abs=1e-7)
    assert results["evaluate/export/top1_agreement"] == results["evaluate/qat/top1_agreement"]


@pytest.mark.parametrize("stages, message", [
    ("[generate,train,evaluate,export]", "export stage runs after evaluate"),
    ("[generate,train,evaluate]", "nothing is exported"),
])
def test_scoring_an_export_that_is_not_there_yet_is_refused_up_front(tmp_path, stages, message):
    from conftest import compose
    from qat_lightning.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        validate_config(compose(["+exp=tiny_w4a8kv4", *tiny_overrides(tmp_path), f"stages={stages}",
                                 "evaluate.methods=[qat,export]"]))


@pytest.mark.parametrize("init", ["teacher", "gptq", "kvsmooth"])
def test_init_sets_where_qat_starts(init, tmp_path):
    """With a vanishing lr the trained student is its init: from the teacher it is RTN's student, from gptq
    GPTQ's (up to rows whose scale changes), from kvsmooth the kvsmooth baseline's."""
    methods = {"teacher": "rtn", "gptq": "gptq", "kvsmooth": "kvsmooth"}
    results, _ = _in_process(["stages=[train,evaluate]", f"init={init}", "trainer.max_steps=1", "optim.lr=1e-12",
                              "logger=none", "evaluate.methods=[rtn,gptq,kvsmooth,qat]", "evaluate.tasks=[kl]"],
                             tmp_path)
    kl = {m: results[f"evaluate/{m}/kl"] for m in ("rtn", "gptq", "kvsmooth", "qat")}
    want = methods[init]
    others = [m for m in ("rtn", "gptq", "kvsmooth") if m != want]
    for other in others:  # the inits are distinguishable on this model, and QAT starts at the right one
        assert abs(kl[want] - kl[other]) > 1e-3 * kl[want], kl
        assert abs(kl["qat"] - kl[want]) < abs(kl["qat"] - kl[other]), (init, kl)
    if init != "gptq":
        assert kl["qat"] == pytest.approx(kl[want], rel=1e-5), kl


def test_kvsmooth_strength_reaches_the_init_and_the_baseline(tmp_path):
    """methods.kvsmooth.strength=0 is the identity rewrite: the kvsmooth baseline and QAT's start (one object)
    are RTN's."""
    results, _ = _in_process(["stages=[train,evaluate]", "init=kvsmooth", "methods.kvsmooth.strength=0",
                              "trainer.max_steps=1", "optim.lr=1e-12", "logger=none",
                              "evaluate.methods=[rtn,kvsmooth,qat]", "evaluate.tasks=[kl]"], tmp_path)
    kl = {m: results[f"evaluate/{m}/kl"] for m in ("rtn", "kvsmooth", "qat")}
    assert kl["kvsmooth"] == pytest.approx(kl["rtn"], rel=1e-5) and kl["qat"] == pytest.approx(kl["rtn"], rel=1e-5)


def test_a_rotated_student_scored_again_from_student_path_scores_the_same(tmp_path):
    """QAT from QuaRot R1-R4: the saved student, reloaded by `student_path=`, is the trained one (its online
    R3/R4 rebuilt from the saved record; without it the reload scored KL 17 on SmolLM2 in session 24)."""
    common = ["init=quarot", "methods.quarot.r3=true", "methods.quarot.r4=true", "quant.kv_placement=post_rope",
              "logger=none", "evaluate.methods=[qat]", "evaluate.tasks=[kl]"]
    first, _ = _in_process([*common, "stages=[train,evaluate]", "trainer.max_steps=2"], tmp_path)
    assert json.loads((tmp_path / "run" / "student" / "rotation.json").read_text())["r4"] is True
    again, _ = _in_process([*common, "stages=[evaluate]", f"student_path={tmp_path / 'run' / 'student'}"],
                           tmp_path, run="again")
    assert again["evaluate/qat/kl"] == pytest.approx(first["evaluate/qat/kl"], rel=1e-5)


def test_init_from_the_best_sign_draw_trains_and_scores_the_draw_it_kept(tmp_path):
    """`methods.quarot.draws=3` through the run: the init and the `quarot` baseline are the one kept draw (QAT at a
    vanishing lr scores the baseline's KL), and the saved student's rotation record names that draw's seed."""
    results, _ = _in_process(["init=quarot", "methods.quarot.r3=true", "methods.quarot.r4=true",
                              "methods.quarot.draws=3", "quant.kv_placement=post_rope", "logger=none",
                              "stages=[train,evaluate]", "trainer.max_steps=1", "optim.lr=1e-12",
                              "evaluate.methods=[quarot,qat]", "evaluate.tasks=[kl]"], tmp_path)
    assert json.loads((tmp_path / "run" / "student" / "rotation.json").read_text())["seed"] in (0, 1000, 2000)
    assert results["evaluate/qat/kl"] == pytest.approx(results["evaluate/quarot/kl"], rel=1e-4)
