"""experiments/: sweep results become markdown tables and PNG plots without W&B; ablations are one command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
import ablations  # noqa: E402
import collect  # noqa: E402


def _fake_run(root, name, overrides, results):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (run / "results.json").write_text(json.dumps(results))
    return run


def test_collect_builds_table_and_plot_and_lists_failed_runs(tmp_path):
    sweep = tmp_path / "sweep"
    ppl = "evaluate/{}/wikitext2_ppl".format
    _fake_run(sweep, "0", ["quant=w4a8kv4", "optim.lr=3e-4"], {ppl("fp"): 20.0, ppl("rtn"): 40.0, ppl("qat"): 25.0})
    _fake_run(sweep, "1", ["optim.lr=3e-4", "quant=w8a8kv8"], {ppl("fp"): 20.0, ppl("rtn"): None, ppl("qat"): 21.0})
    _fake_run(sweep, "2", ["+exp=smollm2_w4a8kv4", "quant=w2", "optim.lr=3e-4"], None)
    out = tmp_path / "out" / "table"
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "collect.py"), str(sweep), "--out", str(out)],
                          capture_output=True, text=True, check=True)
    text = out.with_suffix(".md").read_text()
    # rows are labelled by what differs between runs (the shared lr is dropped); recovery (40 - 25) / (40 - 20)
    assert "| quant=w4a8kv4 | 20 | 40 | 25 | 75.0 % |" in text
    assert "| quant=w8a8kv8 | 20 | - | 21 | - |" in text
    assert "quant=w2" in text and "no results.json" in text  # failed runs are recorded, not dropped
    assert "diverged" in text
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "wrote" in proc.stdout


def test_every_ablation_is_a_single_multirun_command():
    for name in ablations.ABLATIONS:
        cmd = ablations.command(name, "demo", [])
        assert cmd[1:4] == ["-m", "qat_lightning", "-m"]
        assert f"hydra.sweep.dir={ablations.sweep_dir(name)}" in cmd
        assert any(o.startswith("logger.group=") for o in cmd)
    methods, table, failed = collect.collect([], "evaluate/{method}/kl")
    assert (methods, table, failed) == ([], {}, [])


def test_ablation_overrides_replace_the_budget_keys_they_set():
    """Hydra refuses a key given twice, so the ablation's own value must win over the shared budget's."""
    cmd = ablations.command("corpus_size", "demo", ["trainer.max_epochs=2"])
    sizes = [o for o in cmd if o.startswith("generation.num_sequences=")]
    assert sizes == ["generation.num_sequences=64,128,256,1024"]
    assert [o for o in cmd if o.startswith("trainer.max_epochs=")] == ["trainer.max_epochs=2"]
    assert "evaluate.seq_len=512" in cmd  # untouched budget keys stay
    cmd = ablations.command("paper_table", "recipe", [])
    assert [o for o in cmd if o.startswith("evaluate.tasks=")] == ["evaluate.tasks=[kl,wikitext2,zeroshot]"]
    cmd = ablations.command("steps", "recipe", ["trainer.max_steps=300"])
    assert [o for o in cmd if o.startswith("trainer.max_steps=")] == ["trainer.max_steps=300"]
    assert [o for o in cmd if o.startswith("optim.lr=")] == ["optim.lr=3e-4"]


def _sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of a multirun command line."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


@pytest.mark.parametrize("name", sorted(ablations.ABLATIONS))
def test_every_job_of_every_ablation_composes_and_validates_under_the_short_budget(name, tmp_path, monkeypatch):
    from conftest import SHARED_DATA, compose
    from qat_lightning.config import validate_config

    monkeypatch.setenv("QAT_DATA_DIR", str(SHARED_DATA))
    cmd = ablations.command(name, "short", [])
    overrides = [o for o in cmd[4:] if not o.startswith("hydra.")]
    jobs = _sweep_jobs(overrides)
    assert len(jobs) >= 2
    for job in jobs:
        validate_config(compose([*job, f"paths.root_dir={tmp_path}"]))


def test_a_sweep_dir_holds_one_budget(tmp_path):
    ablations._check_budget(tmp_path / "loss", "short", [])
    ablations._check_budget(tmp_path / "loss", "short", ["optim.lr=1e-4"])  # same budget: fine
    with pytest.raises(SystemExit, match="budget 'short'"):
        ablations._check_budget(tmp_path / "loss", "recipe", [])
