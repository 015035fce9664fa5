"""Orthogonal rotations (QuaRot / SpinQuant style) that remove outlier channels while keeping the FP function.

R1 (residual stream) and R2 (per value head) are absorbed into the weights and leave a plain HF checkpoint;
R3 (q/k after RoPE) and R4 (down_proj input) are online. See docs/ROTATIONS.md.

    rotated = rotate_model(teacher, r1=True, r2=True, r4=False, seed=0, kind="hadamard")
    student = quantize_model(rotated, qcfg)   # QAT, RTN, GPTQ, export: unchanged on a rotated model
"""

from qat_lightning.rotate.absorb import (
    CONFIG_KEY,
    attach_online_rotations,
    fold_norms,
    rotate_model,
    rotation_of,
    untie_embeddings,
)
from qat_lightning.rotate.hadamard import KINDS, hadamard_matrix, random_orthogonal, rotation_info, rotation_matrix
from qat_lightning.rotate.online import OnlineHadamard, attach_r3, attach_r4

__all__ = [
    "CONFIG_KEY",
    "KINDS",
    "OnlineHadamard",
    "attach_online_rotations",
    "attach_r3",
    "attach_r4",
    "fold_norms",
    "hadamard_matrix",
    "random_orthogonal",
    "rotate_model",
    "rotation_info",
    "rotation_matrix",
    "rotation_of",
    "untie_embeddings",
]
