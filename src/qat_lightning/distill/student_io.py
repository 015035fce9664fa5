"""The trained student on disk: `<dir>/student.safetensors` + `<dir>/quant_config.json`.

`evaluate` and `export` (in this run or a later one, via `student_path`) rebuild it from these two files and
the teacher, without the Lightning checkpoint. Written with `atomic_dir`: a crash while saving keeps the
previous good student.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from qat_lightning.atomic import atomic_dir

__all__ = ["STUDENT_QUANT", "STUDENT_WEIGHTS", "check_saved_student", "load_saved_student", "save_student"]

STUDENT_WEIGHTS = "student.safetensors"
STUDENT_QUANT = "quant_config.json"
STUDENT_ROTATION = "rotation.json"  # the online rotations (R3/R4) the weights need; absent when unrotated


def save_student(state: dict[str, torch.Tensor], quant_cfg, out_dir: str | os.PathLike,
                 rotation: dict | None = None) -> Path:
    """Write the student's weights and quant config as one folder, atomically.

    `rotation` is the student's rotation record (`rotate.rotation_of`): weights rotated with the online R3/R4
    compute another function without them, so the loader must rebuild them (session 24 scored such a student
    at KL 17 before this was saved).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        # tied weights share storage: safetensors wants distinct tensors
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(tmp / STUDENT_WEIGHTS))
        (tmp / STUDENT_QUANT).write_text(json.dumps(asdict(quant_cfg), indent=2))
        if rotation:
            (tmp / STUDENT_ROTATION).write_text(json.dumps(rotation, indent=2))
    return out_dir


def check_saved_student(path: str | os.PathLike) -> Path:
    """`path` as a Path if it holds a saved student; FileNotFoundError naming what is missing otherwise."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist (a saved student is the <run dir>/student folder of a run)")
    for name in (STUDENT_WEIGHTS, STUDENT_QUANT):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a saved student: {name} is missing")
    return path


def load_saved_student(teacher: nn.Module, path: str | os.PathLike) -> nn.Module:
    """The saved student rebuilt on top of `teacher`'s architecture (teacher untouched)."""
    from safetensors.torch import load_file

    from qat_lightning.quant import QuantConfig, quantize_model

    path = check_saved_student(path)
    qcfg = QuantConfig(**json.loads((path / STUDENT_QUANT).read_text()))
    student = quantize_model(teacher, qcfg)
    state = load_file(str(path / STUDENT_WEIGHTS))
    head, emb = student.get_output_embeddings(), student.get_input_embeddings()
    head_key = next((k for k in state if k.endswith("lm_head.weight")), None)
    emb_key = next((k for k in state if k.endswith("embed_tokens.weight")), None)
    if (head is not None and head.weight is emb.weight and head_key and emb_key
            and not torch.equal(state[head_key], state[emb_key])):
        # a student whose lm_head left the tied embedding (a rotation folds the final norm into it)
        from qat_lightning.quant.api import _untie_lm_head

        _untie_lm_head(student)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: student weights do not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if (path / STUDENT_ROTATION).is_file():  # the online R3/R4 the rotated weights were trained with
        from qat_lightning.rotate.absorb import CONFIG_KEY, attach_online_rotations

        setattr(student.config, CONFIG_KEY, json.loads((path / STUDENT_ROTATION).read_text()))
        attach_online_rotations(student)
    return student.eval()
