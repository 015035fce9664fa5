"""The paper's ablations as single commands: each is a Hydra multirun over one config-group choice.

    python experiments/ablations.py list
    python experiments/ablations.py run data_source [--budget short] [-- extra overrides]
    python experiments/ablations.py table data_source        # markdown + PNG from the finished sweep

Every run logs to W&B (offline unless `logger.offline=false`) with group = the ablation name and tags for the
setting, so one dashboard view compares it; `table` builds the same comparison without W&B. Sweep dirs are
fixed (`multirun/ablations/<name>`) so reruns resume into the same place and tables find them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
BASE = "smollm2_w4a8kv4"

# name -> the multirun overrides that make the ablation
ABLATIONS: dict[str, list[str]] = {
    "data_source": ["+ablation=data_gen_hybrid,data_gen_top1,data_gen_sample,data_text,data_mixed"],
    "k_top1": ["generation.k_choices=[3,4,5],[0],[1],[3],[5]"],
    "loss": ["loss=logits,label,hidden,attention,logits_hidden,logits_label"],
    "quantizer": ["quant=w4a8kv4,clip,lsq,asym,group64,kv_head"],
    "init": ["init=teacher,smoothquant,gptq,kvsmooth"],
    # training context: 4x128 vs 1x512 tokens a step (WikiText-2 is scored at 512)
    "context": ["+ablation=context_128,context_512"],
    # run-to-run spread: the same base run with other data orders and held-out splits (RESULTS.md's
    # "Run-to-run spread"; `seed=0,1,2` alone changes the order and keeps the held-out split)
    "seed": ["data.seed=0,1,2", "data.shuffle_seed=${data.seed}"],
    "bits": ["quant=w4a8kv4,w4a8kv8,w4a6,w8a8kv4,w8a8kv8,w4,w2,w2seq"],
    "corpus_size": ["generation.num_sequences=64,128,256,1024"],
    # the W4A8KV4 recipe on a 1024-sequence corpus: lr at a fixed 100 steps, then steps at the chosen lr
    "lr": ["generation.num_sequences=1024", "generation.batch_size=64", "trainer.max_steps=100",
           "optim.lr=1e-4,3e-4,1e-3"],
    "steps": ["generation.num_sequences=1024", "generation.batch_size=64", "optim.lr=3e-4", "trainer.max_epochs=3",
              "trainer.max_steps=100,300,700"],
    # QAT from the recipe's init (kvsmooth) vs from rotated teachers (QuaRot's Hadamard R1+R2, plain, with
    # kvsmooth's keys, with GPTQ's weights; learned SpinQuant-style R1+R2): the deployable rotations only (plain
    # checkpoints); the rotation baselines are scored beside each student
    "rotations": ["init=kvsmooth,rotate,quarot_kvsmooth,quarot_gptq,spinquant",
                  "evaluate.methods=[fp,rtn,kvsmooth,quarot,quarot_gptq,quarot_kvsmooth,spinquant,qat]"],
    # the paper's W-A-KV grid x methods, with its eight zero-shot tasks (their average beside WikiText-2; the
    # first 200 items of each task on CPU: `-- evaluate.zeroshot_limit=null` for the full splits); --budget recipe
    "paper_table": ["quant=w4a8kv4,w4a8kv8,w4a6,w4,w8a8kv4,w8a8kv8,w4a4kv4",
                    "evaluate.methods=[fp,rtn,smoothquant,gptq,quarot,quarot_gptq,spinquant,spinquant_gptq,qat]",
                    "evaluate.tasks=[kl,wikitext2,zeroshot]", "evaluate.zeroshot_limit=200"],
}

# the budget every ablation shares unless overridden (CPU-sized; documented in RESULTS.md)
BUDGETS: dict[str, list[str]] = {
    "demo": ["generation.num_sequences=256", "generation.max_length=128", "trainer.max_epochs=1",
             "evaluate.tasks=[kl,wikitext2]", "evaluate.seq_len=512", "evaluate.max_windows=16"],
    # the chosen W4A8KV4 recipe (see RESULTS.md, lr and steps sweeps): 1024 generated sequences, lr 3e-4
    "recipe": ["generation.num_sequences=1024", "generation.batch_size=64", "generation.max_length=128",
               "trainer.max_epochs=1", "trainer.max_steps=100", "optim.lr=3e-4",
               "evaluate.tasks=[kl,wikitext2]", "evaluate.seq_len=512", "evaluate.max_windows=16"],
    # the ablation budget: every sweep shares its base run (memo) and its baseline scores (evaluate.cache);
    # KL on one fixed held-out set (the hybrid corpus) so runs trained on different data compare
    "short": ["generation.num_sequences=256", "generation.batch_size=64", "generation.max_length=128",
              "trainer.max_epochs=100", "trainer.max_steps=50", "optim.lr=3e-4",
              "evaluate.tasks=[kl,wikitext2]", "evaluate.seq_len=512", "evaluate.max_windows=16",
              "evaluate.kl_data=hybrid", "evaluate.cache=true", "memo=true",
              # 4.5-min jobs need no resume checkpoint (1.6 GB each with AdamW state); the student is still saved
              "callbacks.checkpoint=false"],
    "tiny": ["+exp=tiny_w4a8kv4"],
}


def _key(override: str) -> str:
    """`optim.lr=1e-4,3e-4` -> `optim.lr` (the config key an override sets)."""
    return override.split("=", 1)[0].lstrip("+~")


def sweep_dir(name: str) -> Path:
    return ROOT / "multirun" / "ablations" / name


def command(name: str, budget: str, extra: list[str]) -> list[str]:
    if name not in ABLATIONS:
        raise SystemExit(f"error: unknown ablation {name!r}; choose from {', '.join(ABLATIONS)}")
    if budget not in BUDGETS:
        raise SystemExit(f"error: unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
    exp = [] if any(o.startswith("+exp=") for o in BUDGETS[budget]) else [f"+exp={BASE}"]
    # later wins: extra overrides replace the ablation's and the budget's, the ablation's replace the budget's
    # (Hydra refuses a key given twice)
    extra_keys = {_key(o) for o in extra}
    ablation = [o for o in ABLATIONS[name] if _key(o) not in extra_keys]
    chosen = extra_keys | {_key(o) for o in ablation}
    base = [o for o in BUDGETS[budget] if _key(o) not in chosen]
    return [sys.executable, "-m", "qat_lightning", "-m", *exp, *base, *ablation,
            f"logger.group=ablation-{name}", f"logger.tags=[ablation:{name}]",
            f"hydra.sweep.dir={sweep_dir(name)}", *extra]


def _check_budget(sweep: Path, budget: str, extra: list[str]) -> None:
    """One sweep dir holds one budget: refuse to mix runs of another budget into its table."""
    stamp = sweep / "budget.txt"
    wanted = " ".join([budget, *extra])
    if stamp.exists():
        had = stamp.read_text().strip()
        if had.split(" ")[0] != budget:
            raise SystemExit(f"error: {sweep} holds runs of budget {had.split(' ')[0]!r}, not {budget!r}: "
                             "move it away first (tables would mix budgets)")
        return
    sweep.mkdir(parents=True, exist_ok=True)
    stamp.write_text(wanted + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["list", "run", "table", "show"])
    ap.add_argument("name", nargs="?")
    ap.add_argument("--budget", default="short", choices=list(BUDGETS))
    ap.add_argument("--metric", action="append", help="passed to collect.py (repeatable)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:split])
    args.extra = argv[split + 1 :]  # extra Hydra overrides, after `--`
    if args.action == "list":
        for name, overrides in ABLATIONS.items():
            print(f"{name:12s} {' '.join(overrides)}")
        return
    if not args.name:
        raise SystemExit("error: name the ablation (see `list`)")
    cmd = command(args.name, args.budget, args.extra)
    if args.action == "show":
        print(" ".join(cmd))
        return
    if args.action == "run":
        _check_budget(sweep_dir(args.name), args.budget, args.extra)
        print(" ".join(cmd), flush=True)
        # a failed job is recorded by its missing/null results; the sweep goes on
        env = dict(os.environ)
        if "QAT_DATA_DIR" not in env and SHARED_DATA.is_dir():
            env["QAT_DATA_DIR"] = str(SHARED_DATA)  # the evaluation data beside the repo (WikiText-2, HellaSwag)
            print(f"QAT_DATA_DIR={SHARED_DATA}", flush=True)
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        if rc != 0:
            print(f"warning: sweep exited with {rc}; failed jobs are listed in the table", file=sys.stderr)
    out = ROOT / "experiments" / "out" / args.name
    metrics = [a for m in (args.metric or []) for a in ("--metric", m)]
    subprocess.check_call([sys.executable, str(ROOT / "experiments" / "collect.py"), str(sweep_dir(args.name)),
                           *metrics, "--out", str(out)], cwd=ROOT)


if __name__ == "__main__":
    main()
