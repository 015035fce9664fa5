"""The trunk's contracts: results never lie, reruns leave their results, bad input stops before loading,
configs have one source of defaults, the KV owner keeps the paper's logits, writes are atomic."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import CONF_DIR, REPO, compose, tiny_overrides
from qat_lightning.config import ConfigError, RunConfig, validate_config
from qat_lightning.results import load_results
from qat_lightning.stages import RunContext, run_stages


def _cli(args: list[str], tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qat_lightning", *args, f"hydra.run.dir={tmp_path}/run",
                           f"paths.data_dir={tmp_path}/data", f"paths.cache_dir={tmp_path}/cache", "logger=none"],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---- defect 1: a qat result comes from a trained student ------------------------------------------
@pytest.mark.parametrize("stages, methods", [
    ("[quantize,generate,evaluate]", "[rtn,qat]"),  # used to report RTN's numbers as evaluate/qat/*
    ("[quantize,export]", "[fp]"),  # used to export the untrained student as if trained
])
def test_qat_without_a_trained_student_is_refused_at_start_up(tmp_path, stages, methods):
    proc = _cli(["+exp=tiny_w4a8kv4", f"stages={stages}", f"evaluate.methods={methods}", "evaluate.tasks=[kl]"],
                tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _error_line(proc).startswith("error: ") and "nothing is trained" in _error_line(proc)
    assert not (tmp_path / "run" / "results.json").exists()


def test_qat_scores_come_from_the_trained_student_not_the_quantize_stage(tmp_path):
    """quantize, then train one step at a visible lr: qat's KL is the trained student's, not RTN's."""
    cfg = validate_config(compose(["+exp=tiny_w4a8kv4", *tiny_overrides(tmp_path), "trainer.max_steps=3",
                                   "optim.lr=1e-2", "optim.warmup_steps=0", "logger=none",
                                   "stages=[quantize,train,evaluate]", "evaluate.methods=[rtn,qat]"]))
    run_stages(RunContext(cfg, tmp_path / "run"))
    res = load_results(tmp_path / "run")
    assert res["evaluate/qat/kl"] != res["evaluate/rtn/kl"]


# ---- defect 2: every finished run writes results.json ---------------------------------------------
def test_a_rerun_with_a_complete_corpus_still_writes_its_results(tmp_path):
    for run in ("first", "second"):
        cfg = validate_config(compose(["+exp=tiny_w4a8kv4", *tiny_overrides(tmp_path), "stages=[generate]",
                                       "logger=none"]))
        run_stages(RunContext(cfg, tmp_path / run))
    first, second = load_results(tmp_path / "first"), load_results(tmp_path / "second")
    assert first["generate/teacher/skipped"] == 0 and second["generate/teacher/skipped"] == 1
    assert second["generate/teacher/num_sequences"] == first["generate/teacher/num_sequences"] == 16


# ---- defect 4: caches key on the source code -------------------------------------------------------
def test_memo_and_eval_cache_keys_change_with_the_package_source(tmp_path):
    """A copy of the package with one changed quantizer line gets new memo and eval-cache keys."""
    code = ("from qat_lightning.run_memo import memo_key; from qat_lightning.eval.cache import cache_key; "
            "print(memo_key({'quant': {'w_bits': 4}}), cache_key({'method': {'method': 'rtn'}}))")

    def keys(root: Path) -> str:
        env = {**os.environ, "PYTHONPATH": str(root)}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip()

    pkg = tmp_path / "pkg"
    shutil.copytree(REPO / "src" / "qat_lightning", pkg / "qat_lightning",
                    ignore=shutil.ignore_patterns("__pycache__"))
    before = keys(pkg)
    assert keys(pkg) == before  # deterministic
    prim = pkg / "qat_lightning" / "quant" / "primitives.py"
    prim.write_text(prim.read_text() + "\n# a changed quantizer\n")
    after = keys(pkg)
    assert after.split()[0] != before.split()[0] and after.split()[1] != before.split()[1]


def test_eval_cache_keys_on_the_methods_parameters(tmp_path):
    """The method's resolved node is its cache key: another GPTQ damping is another entry."""
    base = ["+exp=tiny_w4a8kv4", *tiny_overrides(tmp_path), "stages=[evaluate]", "logger=none",
            "evaluate.methods=[gptq]", "evaluate.cache=true"]
    for i, damp in enumerate(("0.01", "0.01", "0.5")):
        cfg = validate_config(compose([*base, f"methods.gptq.percdamp={damp}"]))
        run_stages(RunContext(cfg, tmp_path / f"run{i}"))
    entries = list((tmp_path / "data" / "eval_cache").glob("*.json"))
    assert len(entries) == 2, entries  # the repeated damping was a hit, the new one a new entry
    kls = [load_results(tmp_path / f"run{i}")["evaluate/gptq/kl"] for i in range(3)]
    assert kls[0] == kls[1] != kls[2]


# ---- defect 5: one atomic writer -------------------------------------------------------------------
def test_a_crash_while_saving_the_student_keeps_the_last_good_one(tmp_path, monkeypatch):
    import safetensors.torch

    from qat_lightning.distill.student_io import STUDENT_WEIGHTS, save_student
    from qat_lightning.quant import QuantConfig

    out = tmp_path / "student"
    save_student({"w": torch.ones(2)}, QuantConfig(), out)
    good = (out / STUDENT_WEIGHTS).read_bytes()
    (tmp_path / "student.tmp").mkdir()  # a stale temp of an old crash: never reused
    (tmp_path / "student.tmp" / "garbage").write_text("x")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_student({"w": torch.zeros(2)}, QuantConfig(), out)
    assert (out / STUDENT_WEIGHTS).read_bytes() == good
    monkeypatch.undo()
    save_student({"w": torch.zeros(2)}, QuantConfig(), out)
    assert not (out / "garbage").exists() and (out / STUDENT_WEIGHTS).read_bytes() != good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student", "student.tmp"]  # no temp left behind


def test_atomic_file_leaves_the_old_file_on_error(tmp_path):
    from qat_lightning.atomic import atomic_file, write_json_atomic

    path = tmp_path / "results.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("{half")
        raise RuntimeError("crash")
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["results.json"]


# ---- defect 6: one source of defaults --------------------------------------------------------------
def test_the_default_cli_config_is_the_python_default():
    """`python -m qat_lightning` and `RunConfig()` agree on every value (the corpus hash included)."""
    from qat_lightning.data.corpus import corpus_dir

    cli = validate_config(compose([]))
    api = RunConfig()
    for f in dataclasses.fields(RunConfig):
        if f.name in ("paths", "methods"):  # paths are interpolated per run; methods compared below
            continue
        assert getattr(cli, f.name) == getattr(api, f.name), f.name
    assert {n: m for n, m in cli.methods.items()} == {n: type(m)() for n, m in cli.methods.items()}
    api.paths = cli.paths
    assert corpus_dir(cli) == corpus_dir(api)


def test_every_field_of_every_section_can_be_set_on_the_command_line():
    """A field the composed config lacks cannot be overridden without '+': each group's YAML lists them all
    (except `model`, whose options are model families, each naming the fields its loader reads)."""
    cli = compose([])
    for f in dataclasses.fields(RunConfig):
        section = getattr(RunConfig(), f.name)
        if not dataclasses.is_dataclass(section) or f.name not in cli or f.name == "model":
            continue
        missing = [g.name for g in dataclasses.fields(section) if g.name not in cli[f.name]]
        assert not missing, f"{f.name}: {missing}"


def _group_options() -> list[tuple[str, str]]:
    return [(g.name, o.stem) for g in sorted(CONF_DIR.iterdir())
            if g.is_dir() and g.name not in ("exp", "ablation", "__pycache__") for o in sorted(g.glob("*.yaml"))]


@pytest.mark.parametrize("group, option", _group_options())
def test_every_group_option_composes_and_matches_its_schema(group, option, tmp_path):
    """Each option of each group composes onto the default experiment and validates against its dataclass;
    every key it sets is a field of that dataclass (a typo is an error, not a silently ignored key)."""
    cfg = compose([f"{group}={option}", "paths.root_dir=/tmp/x", "paths.output_dir=/tmp/x/run"])
    try:
        run = validate_config(cfg)
    except ConfigError as err:  # an option may need a companion setting; it must say so in one line
        assert "\n" not in str(err)
        pytest.skip(f"{group}={option} alone: {err}")
    section = getattr(run, group)
    assert dataclasses.is_dataclass(section)
    fields = {f.name for f in dataclasses.fields(section)}
    from omegaconf import OmegaConf

    assert set(OmegaConf.to_container(cfg[group])) <= fields


# ---- defect 7: no deprecation warnings from our own calls ------------------------------------------
def test_generation_uses_the_current_transformers_api(tmp_path):
    from qat_lightning.data.config import GenerationConfig
    from qat_lightning.data.generate import generate_batch
    from qat_lightning.models import build_tiny_config, build_tiny_model

    model = build_tiny_model(build_tiny_config())
    gen = GenerationConfig(max_length=12, batch_size=2, num_sequences=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate_batch(model, torch.tensor([1, 2]), [3, 3], gen, torch.Generator().manual_seed(0), eos_id=None)
    ours = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not ours, [str(w.message) for w in ours]


# ---- defect 8: what can be checked before loading is --------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["+exp=tiny_w4a8kv4", "stages=[evaluate]", "evaluate.methods=[qat]", "student_path=/nonexistent"],
     "student_path: /nonexistent does not exist"),
    (["+exp=tiny_w4a8kv4", "quant.w_granularity=group", "quant.w_group_size=7"], "group size 7 does not divide"),
    (["+exp=nope"], "unknown experiment 'nope'; available: "),
    (["+exp=tiny_w4a8kv4", "methods.gptq.percdamp=2"], "methods.gptq: percdamp"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_model_loads(tmp_path, args, needle):
    proc = _cli(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _error_line(proc).startswith("error: ") and needle in _error_line(proc), _error_line(proc)
    assert "Traceback" not in proc.stderr
    if "nope" in needle:
        assert "tiny_w4a8kv4" in _error_line(proc)


LAZY_PACKAGES = ("data", "eval", "export", "models", "quant")


def test_reading_the_config_schema_imports_neither_torch_nor_transformers():
    """A bad command line is refused in seconds: `qat_lightning.config` pulls in only Hydra and the schemas (the
    packages' `__init__`s import lazily; eagerly they cost ~12 s of torchmetrics and transformers here)."""
    code = ("import sys, qat_lightning.config; "
            "print(sorted(m for m in ('torch', 'transformers', 'torchmetrics', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_no_lazy_name_shadows_a_submodule(package):
    """A lazily exported function named like a submodule (`eval.perplexity` was both) comes back as the module
    once that submodule has been imported elsewhere: the import system binds the module on the package."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(f"qat_lightning.{package}")
    submodules = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
    assert not submodules & set(pkg.__all__), f"qat_lightning.{package} exports names of its submodules"
    for name in pkg.__all__:
        assert not isinstance(getattr(pkg, name), type(pkg)), f"qat_lightning.{package}.{name} is a module"


# ---- the KV owner ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pre_rope_kv_owner_gives_the_logits_of_quantized_kv_projections(arch):
    """The redesign keeps the paper's default: fake-quantizing k_proj / v_proj outputs in the linears
    themselves (the code before the KV owner) gives bit-identical logits."""
    import copy

    from qat_lightning.models import build_tiny_config, build_tiny_model
    from qat_lightning.quant import QuantConfig, QuantLinear, quantize_model

    model = build_tiny_model(build_tiny_config(arch=arch))
    cfg = QuantConfig(w_bits=4, a_bits=8, kv_bits=4)
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    old = copy.deepcopy(model)  # the previous design: out_spec on the two projections
    for name, lin in list(old.named_modules()):
        if isinstance(lin, torch.nn.Linear) and ".layers." in name:
            leaf = name.rsplit(".", 1)[-1]
            out = cfg.kv_spec(name, 16) if leaf in ("k_proj", "v_proj") else None
            old.set_submodule(name, QuantLinear.from_linear(lin, cfg.weight_spec(name), cfg.act_spec(name), out))
    with torch.no_grad():
        assert torch.equal(quantize_model(model, cfg)(ids).logits, old(ids).logits)


def test_post_rope_kv_owner_quantizes_the_keys_attention_reads():
    """post_rope: the keys handed to attention (after RoPE) lie on a per-token 4-bit grid; pre_rope: they don't."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from qat_lightning.models import build_tiny_config, build_tiny_model
    from qat_lightning.quant import QuantConfig, quantize_model

    model = build_tiny_model(build_tiny_config())
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    seen = {}
    inner = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, *args, **kwargs):
        seen.setdefault(id(module), key.detach())
        return inner(module, query, key, value, *args, **kwargs)

    def grid_error(placement: str) -> float:
        seen.clear()
        student = quantize_model(model, QuantConfig(w_bits=16, a_bits=16, kv_bits=4, kv_placement=placement))
        ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = spy
        try:
            with torch.no_grad():
                student(ids)
        finally:
            ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = inner
        k = next(iter(seen.values()))  # (B, n_kv, T, D)
        flat = k.transpose(1, 2).flatten(2)  # (B, T, n_kv * D)
        levels = flat / (flat.abs().amax(-1, keepdim=True) / 7)
        return (levels - levels.round()).abs().max().item()

    assert grid_error("post_rope") < 1e-4
    assert grid_error("pre_rope") > 1e-2


# ---- make gpu-check, at tiny size on CPU ------------------------------------------------------------
def test_gpu_check_runs_at_tiny_size_on_cpu(tmp_path):
    """The same script `make gpu-check` runs on a GPU: FSDP2 on one device, generation, QAT steps, one table."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "MASTER_PORT": "29531"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in proc.stdout.splitlines()
             if line.startswith("| ") and line.count("|") == 3}
    assert table["QAT steps"] == "3" and float(table["generation tokens/s"]) > 0 and float(table["QAT tokens/s"]) > 0
    assert "FSDP2" in table["strategy"]
