"""Does the calibration KL rank QuaRot's sign draws the way WikiText-2 does? (#17, `methods.<quarot*>.draws`)

For each seed, the post-training start of `+exp=smollm2_w4a8kv4_rot` (QuaRot-GPTQ R1-R4, W4A8KV4, KV after RoPE)
is built once and scored three ways: KL to the teacher on the calibration batches (what `draws` ranks by), KL on
the first `evaluate.kl_batches` held-out batches, and WikiText-2 perplexity (the goal's metric). One JSON line a
seed, then the ranks. Needs the experiment's generated corpus (data/generated/...).

    QAT_DATA_DIR=/work/shared/data python benchmarks/probe_sign_draws.py --seeds 0 1000 2000 3000 \
        --json benchmarks/results/sign_draws_seed0.json [-- data.seed=0 ...more Hydra overrides]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from qat_lightning.atomic import write_json_atomic


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from qat_lightning.config import register_configs

    register_configs()
    with initialize_config_module(config_module="qat_lightning.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--exp", default="smollm2_w4a8kv4_rot")
    ap.add_argument("--method", default="quarot_gptq")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = ap.parse_args()

    from qat_lightning.config import validate_config
    from qat_lightning.eval import evaluate_model
    from qat_lightning.eval.agreement import kl_and_agreement
    from qat_lightning.quant import as_quant_config, quantize_model
    from qat_lightning.run.context import RunContext, sample_batches

    root = Path.cwd()
    cfg = validate_config(compose([f"+exp={args.exp}", f"paths.root_dir={root}",
                                   f"paths.output_dir={root}/outputs/probe_sign_draws", *args.overrides]))
    ctx = RunContext(cfg, root / "outputs" / "probe_sign_draws")
    teacher, tokenizer = ctx.teacher()
    calib = ctx.calib_batches()
    heldout = sample_batches(ctx.datamodule(), "val", cfg.evaluate.kl_batches)
    method = cfg.method(args.method)
    eval_cfg = replace(cfg.evaluate, tasks=["wikitext2"], lm_eval_tasks=[])
    rows = []
    for seed in args.seeds:
        t0 = time.time()
        draw = replace(method, seed=seed, draws=1)
        base = draw.transform_draw(teacher, cfg.quant, calib, seed)
        student = draw.finish_student(quantize_model(base, as_quant_config(draw.student_config(cfg.quant)))).eval()
        with torch.no_grad():
            row = {"seed": seed, "calib_kl": kl_and_agreement(teacher, student, calib)["kl"],
                   "heldout_kl": kl_and_agreement(teacher, student, heldout)["kl"],
                   "wikitext2_ppl": evaluate_model(student, tokenizer, eval_cfg)["wikitext2_ppl"],
                   "seconds": round(time.time() - t0, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del base, student
    for key in ("calib_kl", "heldout_kl", "wikitext2_ppl"):
        print(key, "order:", [r["seed"] for r in sorted(rows, key=lambda r: r[key])])
    if args.json:
        write_json_atomic(args.json, {"exp": args.exp, "method": args.method, "overrides": args.overrides,
                                      "calib_batches": len(calib), "heldout_batches": len(heldout), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
