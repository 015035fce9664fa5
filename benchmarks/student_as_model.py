"""Write a float student (a run's `student/`, trained with unquantized weights) as a Hugging Face model folder.

Why: a two-stage experiment of #15 first trains the F16 model for llama.cpp's q4_0 KV cache alone (weights left
in float, `quant.w_bits=16 quant.a_bits=16`), then uses that model as the teacher and starting point of the Q4_0
run (`model.source=hub model.name_or_path=<this folder>`, with `generation.out_dir=` the original teacher's
corpus). The folder takes config and tokenizer from the base model's folder and the student's weights.

    python benchmarks/student_as_model.py outputs/f16_kv4_amd/student ~/.cache/qat_lightning/smollm2-135m-instruct \
        outputs/f16_kv4_amd/hf
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", type=Path, help="a run's student/ folder (student.safetensors, quant_config.json)")
    p.add_argument("base", type=Path, help="the HF folder of the model the run started from (config, tokenizer)")
    p.add_argument("out", type=Path, help="the HF folder to write (must not exist)")
    args = p.parse_args(argv)
    from qat_lightning.distill.student_io import STUDENT_QUANT, STUDENT_ROTATION, STUDENT_WEIGHTS, check_saved_student

    try:
        check_saved_student(args.student)
    except FileNotFoundError as err:
        print(f"student_as_model: {err}", file=sys.stderr)
        return 2
    if not (args.base / "config.json").is_file():
        print(f"student_as_model: {args.base} holds no HF model (no config.json)", file=sys.stderr)
        return 2
    if (args.student / STUDENT_ROTATION).exists():
        print(f"student_as_model: {args.student} needs online rotations (R3/R4) that an HF folder cannot hold",
              file=sys.stderr)
        return 2
    quant = json.loads((args.student / STUDENT_QUANT).read_text())
    # embeddings and head are quantized at w_bits or an override's, so these two cover every weight
    if quant.get("w_bits", 16) < 16 or any(o.get("w_bits", 16) < 16 for o in quant.get("overrides", [])):
        print(f"student_as_model: {args.student} has quantized weights: its latent float weights are not the "
              "model it was trained as", file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"student_as_model: {args.out} exists", file=sys.stderr)
        return 2
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    state = load_file(args.student / STUDENT_WEIGHTS)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        print(f"student_as_model: keys do not match the base model: missing {missing[:5]}, unexpected "
              f"{unexpected[:5]}", file=sys.stderr)
        return 2
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in args.base.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "generation_config.json"):
            shutil.copy2(f, tmp / f.name)
    tmp.rename(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
