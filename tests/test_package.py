"""The package as users install it: a wheel into a fresh venv runs the entry point (configs inside it)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.slow
@pytest.mark.ci
def test_wheel_in_a_fresh_venv_runs_the_cli(tmp_path):
    import shutil

    wheels, src = tmp_path / "wheels", tmp_path / "src-copy"  # built from a copy: no build/ in the tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("qat_lightning-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # dependencies from the test venv, but not its editable qat_lightning: a .pth adds the folder to sys.path
    # without running the .pth files in it (the editable finder is one of those)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([str(py), "-c", "import qat_lightning; print(qat_lightning.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env=env, timeout=120)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr  # the wheel, not the tree
    run = subprocess.run([str(venv / "bin" / "qat-lightning"), "+exp=tiny_w4a8kv4", "stages=[quantize]",
                          "logger=none", f"hydra.run.dir={tmp_path}/run", f"paths.data_dir={tmp_path}/data"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "results.json").exists()
