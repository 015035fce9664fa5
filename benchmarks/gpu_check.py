"""`make gpu-check`: the framework's first GPU test, one prepared script, one table (under 8 min on one GPU).

It runs the real pipeline, not a mock of it: the run config composed as the CLI composes it, the teacher
writing a corpus with batched generation (batch 256 on a GPU), then bf16 QAT steps of the W4A8KV4 student
with FSDP2 (`strategy=fsdp`, one device), teacher and student on the device, and reports generation
tokens/s, training tokens/s, the final loss and peak device memory.

    python benchmarks/gpu_check.py            # SmolLM2-135M on the GPU (bf16, FSDP2 on 1 device)
    python benchmarks/gpu_check.py --tiny     # the same script at tiny size on CPU (fp32, gloo): in make test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def overrides(tiny: bool, out: Path, steps: int, gen_batch: int) -> list[str]:
    common = [f"paths.root_dir={out}", f"paths.data_dir={out}/data", f"paths.output_dir={out}/run",
              "logger=none", "callbacks.checkpoint=false", "strategy=fsdp", "trainer.devices=1",
              f"trainer.max_steps={steps}", "trainer.val_check_interval=null", "trainer.limit_val_batches=0",
              "trainer.enable_progress_bar=false", "stages=[generate,train]", "optim.warmup_steps=0"]
    if tiny:
        return ["+exp=tiny_w4a8kv4", *common, "trainer=cpu", "trainer.precision=32-true",
                "generation.num_sequences=16", f"generation.batch_size={gen_batch}", "generation.max_length=48",
                "generation.shard_size=16", "data.block_size=32", "data.batch_size=2"]
    return ["+exp=smollm2_w4a8kv4", *common, "trainer=gpu", "trainer.precision=bf16-true", "model.dtype=bfloat16",
            f"generation.num_sequences={gen_batch}",
            f"generation.batch_size={gen_batch}", "generation.max_length=256", f"generation.shard_size={gen_batch}",
            "data.block_size=512", "data.batch_size=8"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model on CPU (what make test runs)")
    parser.add_argument("--steps", type=int, default=None, help="QAT steps (default: 30 GPU, 3 tiny)")
    parser.add_argument("--gen-batch", type=int, default=None, help="generation batch (default: 256 GPU, 8 tiny)")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp folder)")
    args = parser.parse_args(argv)

    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --tiny for the CPU version", file=sys.stderr)
        return 2
    steps = args.steps or (3 if args.tiny else 30)
    gen_batch = args.gen_batch or (8 if args.tiny else 256)
    from hydra import compose, initialize_config_dir

    from qat_lightning.config import register_configs, validate_config
    from qat_lightning.results import load_results
    from qat_lightning.stages import RunContext, run_stages

    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    register_configs()
    conf = Path(__file__).resolve().parents[1] / "src" / "qat_lightning" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = validate_config(compose(config_name="config", overrides=overrides(args.tiny, out, steps, gen_batch)))
    os.environ.setdefault("MASTER_PORT", "29517")
    cuda = torch.cuda.is_available() and not args.tiny
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run_stages(RunContext(cfg, out / "run"))
    wall = time.perf_counter() - start
    res = load_results(out / "run")
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else _rss_peak_gib()
    rows = [
        ("device", device),
        ("model", f"{cfg.model.name} ({cfg.model.dtype}, {cfg.quant.setting})"),
        ("strategy", f"FSDP2 (ModelParallelStrategy), {cfg.trainer.devices} device, {cfg.trainer.precision}"),
        ("generation batch", gen_batch),
        ("generation tokens/s", _fmt(res.get("generate/teacher/tokens_per_s"))),
        ("QAT steps", int(res.get("train/student/steps", 0))),
        ("QAT tokens/s", _fmt(res.get("train/student/tokens_per_s"))),
        ("final KD loss", _fmt(res.get("train/student/loss"))),
        ("peak memory (GiB)", f"{peak:.2f}" + (" (device)" if cuda else " (process RSS)")),
        ("wall time (s)", f"{wall:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("| check | value |\n|---|---|")
    for key, value in rows:
        print(f"| {key:<{width}} | {value} |")
    (out / "gpu_check.json").write_text(json.dumps(dict(rows), indent=2, default=str))
    ok = res.get("train/student/steps") == steps and res.get("train/student/loss") is not None
    return 0 if ok else 1


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _rss_peak_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


if __name__ == "__main__":
    sys.exit(main())
