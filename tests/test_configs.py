"""Every experiment composes, validates and runs a few steps on a tiny model of its family."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONF_DIR, REPO, compose, tiny_overrides
from qat_lightning.config import ConfigError, validate_config
from qat_lightning.results import load_results
from qat_lightning.stages import RunContext, run_stages

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "exp").glob("*.yaml"))


def test_default_config_is_the_embedded_experiment():
    cfg = validate_config(compose([]))
    assert cfg.name == "smollm2_w4a8kv4"
    assert cfg.model.source == "smollm2"
    assert (cfg.quant.w_bits, cfg.quant.a_bits, cfg.quant.kv_bits) == (4, 8, 4)
    assert cfg.stages == ["generate", "train", "evaluate"]


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes_and_validates(exp):
    cfg = validate_config(compose([f"+exp={exp}", "paths.root_dir=/tmp/x", "paths.output_dir=/tmp/x/run"]))
    assert cfg.name == exp
    if any(f"_{t}" in exp for t in ("q4_0", "q8_0")):
        return  # named by llama.cpp's file type, not W-A-KV (tests/test_ggml.py checks those presets)
    setting = exp.split("_")[1].upper()  # smollm2_w4a8kv4_recipe -> W4A8KV4
    # the name states exactly what is quantized: w4a4 keeps KV at 16, w4 keeps A and KV at 16
    bits = {"W": cfg.quant.w_bits, "A": cfg.quant.a_bits, "KV": cfg.quant.kv_bits}
    for key in ("KV", "A", "W"):
        if key in setting:
            value, setting = setting.rsplit(key, 1)[1], setting.rsplit(key, 1)[0]
            assert bits.pop(key) == int(value), exp
    assert all(b >= 16 for b in bits.values()), f"{exp} quantizes something its name does not state: {bits}"
    if exp.startswith("llama"):
        assert cfg.model.source == "hub" and "llama" in cfg.model.name_or_path
        assert cfg.strategy.name == "fsdp" and cfg.trainer.devices == 8
        assert cfg.optim.lr == 2e-5 and cfg.optim.weight_decay == 0.0


def test_q4_0_kv4_recipe_is_the_command_its_figures_came_from():
    """The recipe's scores (docs/BENCHMARKS.md, "AWQ-down" and "Key centering") were measured with command-line
    overrides on smollm2_q4_0_kv4 (the export stage with its key centering rerun on the saved students); the
    experiment must compose to that same config, or the figures are not its own."""
    from omegaconf import OmegaConf

    measured = ["+exp=smollm2_q4_0_kv4", "init=awq", "methods.awq.down=true", "generation.num_sequences=8192",
                "generation.batch_size=64", "optim.lr=1.4e-4", "optim.min_lr_ratio=0", "optim.warmup_steps=20",
                "trainer.max_steps=1100", "trainer.max_epochs=3", "stages=[generate,train,export]",
                "export.format=gguf", "export.key_center_pairs=4"]
    recipe = OmegaConf.to_container(compose(["+exp=smollm2_q4_0_kv4_recipe"]))
    command = OmegaConf.to_container(compose(measured))
    assert recipe.pop("name") == "smollm2_q4_0_kv4_recipe"
    command.pop("name")
    assert recipe == command


# llama13b_* / llama30b_* differ from llama7b_* only in the hub model, which the tiny stand-in replaces: their
# tiny runs repeat llama7b's settings, so they run with the slow tests (they still compose and validate above)
RUN_EXPERIMENTS = [pytest.param(e, marks=pytest.mark.slow) if e.startswith(("llama13b", "llama30b")) else e
                   for e in EXPERIMENTS]


@pytest.mark.parametrize("exp", RUN_EXPERIMENTS)
def test_every_experiment_runs_on_a_tiny_model_of_its_family(exp, tmp_path):
    overrides = [f"+exp={exp}", *tiny_overrides(tmp_path), "trainer.max_steps=2", "trainer.precision=32-true",
                 "trainer.accelerator=cpu", "trainer.devices=1", "evaluate.methods=[fp,rtn,qat]",
                 "callbacks.checkpoint=false",
                 "trainer.val_check_interval=null", "generation.num_sequences=8",
                 # the byte tokenizer of tiny models cannot go into a GGUF: the deploy experiment's export and
                 # llama.cpp rows run in tests/test_gguf_llamacpp.py on a tiny model with SmolLM2's tokenizer
                 "stages=[generate,train,evaluate]"]
    cfg = validate_config(compose(overrides))
    ctx = RunContext(cfg, tmp_path / "run")
    run_stages(ctx)
    results = load_results(tmp_path / "run")
    assert results["train/student/steps"] == 2
    for method in ("fp", "rtn", "qat"):
        assert results[f"evaluate/{method}/kl"] is not None
    assert results["evaluate/fp/kl"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("quant.w_bits=3x", "quant.w_bits"),
        ("quant.w_bits=12", "w_bits"),
        ("quant.a_granularity=bogus", "granularity"),
        ("generation.strategy=beam", "strategy"),
        ("generation.k_choices=[3,200]", "max_length"),
        ("data.source=ftp", "source"),
        ("stages=[train,deploy]", "deploy"),
        ("optim.lr=-1", "lr"),
        ("model.source=nowhere", "source"),
        ("init=random", "init"),
        ("methods.kvsmooth.strength=2", "methods.kvsmooth"),
        ("methods.kvsmooth.v_alpha=-0.5", "v_alpha"),
        ("methods.smoothquant.alpha=1.5", "methods.smoothquant"),
        ("methods.gptq.percdamp=1.0", "percdamp"),
        ("methods.awq.grid=0", "grid"),
        ("+methods.omniquant.bits=3", "omniquant"),
        ("evaluate.methods=[fp,omniquant]", "omniquant"),
        ("model.device=tpu", "model.device"),
        ("trainer.max_time=7min", "trainer.max_time must be DD:HH:MM:SS"),
        ("callbacks.ema_decay=1.0", "callbacks.ema_decay must be in (0, 1)"),
    ],
)
def test_bad_values_fail_validation_with_one_clear_line(override, needle):
    with pytest.raises(ConfigError) as info:
        validate_config(compose(["+exp=tiny_w4a8kv4", "paths.output_dir=/tmp/x", override]))
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_cli_bad_value_exits_2_before_loading_anything(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qat_lightning", "+exp=tiny_w4a8kv4", "quant.kv_bits=1",
         f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "kv_bits" in lines[-1]
    assert not (Path(tmp_path) / "run" / "results.json").exists()


def test_cli_missing_eval_data_exits_2_before_training(tmp_path):
    """The evaluate stage runs last: its missing data must stop the run before generation and training."""
    env = {k: v for k, v in os.environ.items() if k != "QAT_DATA_DIR"}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    proc = subprocess.run(
        [sys.executable, "-m", "qat_lightning", "+exp=tiny_w4a8kv4", "evaluate.tasks=[kl,wikitext2]",
         f"hydra.run.dir={tmp_path}/run", f"paths.data_dir={tmp_path}/data", f"paths.cache_dir={tmp_path}/cache"],
        cwd=REPO, capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: no wikitext2 data found") and "QAT_DATA_DIR" in lines[-1]
    assert not (tmp_path / "data" / "generated").exists()  # nothing generated
    assert not (tmp_path / "run" / "student").exists()  # nothing trained


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_model_device_cuda_without_a_gpu_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="model.device=cuda, but torch sees no CUDA device"):
        validate_config(compose(["+exp=tiny_w4a8kv4", "model.device=cuda"]))


@pytest.mark.parametrize(
    ("device", "accelerator", "cuda", "expected"),
    [
        ("auto", "cpu", True, "cpu"),  # a CPU run keeps its teacher on the CPU even where a GPU exists
        ("auto", "gpu", False, "cpu"),
        ("auto", "gpu", True, "cuda:1"),  # this rank's GPU (LOCAL_RANK=1)
        ("cpu", "gpu", True, "cpu"),
        ("cuda", "cpu", True, "cuda:1"),
    ],
)
def test_model_device_resolves_to_this_ranks_gpu_only_when_asked_or_training_there(
        device, accelerator, cuda, expected, monkeypatch):
    import torch

    from qat_lightning.run.context import teacher_device

    cfg = validate_config(compose(["+exp=tiny_w4a8kv4", f"trainer.accelerator={accelerator}"]))
    cfg.model.device = device  # set after validation: validating model.device=cuda needs a real GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert teacher_device(cfg) == torch.device(expected)
