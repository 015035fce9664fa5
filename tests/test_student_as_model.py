"""benchmarks/student_as_model.py: a float student becomes an HF model folder that loads as that student."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO
from qat_lightning.distill.student_io import save_student
from qat_lightning.models.tiny import build_tiny_config, build_tiny_model
from qat_lightning.quant.spec import QuantConfig


def _run(*args):
    return subprocess.run([sys.executable, "benchmarks/student_as_model.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def base(tmp_path):
    config = build_tiny_config("llama", 259, 64, 128, 2, 4, 2, 128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = build_tiny_model(config, seed=0, dtype=torch.float32)
    model.save_pretrained(tmp_path / "base")
    return model


def test_the_folder_loads_as_the_students_weights(tmp_path, base):
    from transformers import AutoModelForCausalLM

    state = {k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()}  # a "trained" student
    student = save_student(state, QuantConfig(w_bits=16, a_bits=16, kv_bits=4), tmp_path / "student")
    proc = _run(student, tmp_path / "base", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)
    assert not any(torch.equal(loaded[k], v) for k, v in base.state_dict().items() if k.endswith("proj.weight"))
    assert not (tmp_path / "hf.tmp").exists()


def test_a_student_with_quantized_weights_is_refused(tmp_path, base):
    student = save_student(base.state_dict(), QuantConfig(w_bits=4, a_bits=8, kv_bits=4), tmp_path / "student")
    proc = _run(student, tmp_path / "base", tmp_path / "hf")
    assert proc.returncode == 2 and "quantized weights" in proc.stderr and not (tmp_path / "hf").exists()


def test_a_folder_that_is_no_student_is_refused_in_one_line(tmp_path, base):
    proc = _run(tmp_path / "nowhere", tmp_path / "base", tmp_path / "hf")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
