"""Zero-shot scoring throughput: our `QATLM` vs lm-eval's own `HFLM` on the same requests, in one process.

The requests are the harness's own, built from the eight zero-shot tasks over the local files (the first
`--items` of each, `$QAT_DATA_DIR` or ../shared/data). Every scorer sees the same list, same threads, same
batch size (rows per forward), after one warm-up call; reported: requests/s, tokens run through the model
(QATLM), and the largest |log-likelihood difference| and argmax disagreements vs HFLM.

    python benchmarks/bench_zeroshot.py [--model smollm2|tiny] [--items 8] [--batch 32] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def build_requests(items: int) -> tuple[list, list[tuple[str, int]]]:
    """All loglikelihood instances of the eight tasks (first `items` docs each), and (task, n requests)."""
    from qat_lightning.eval.zeroshot import ZEROSHOT_TASKS, build_tasks, load_docs

    loaded = build_tasks({t: load_docs(t, limit=items) for t in ZEROSHOT_TASKS})
    requests, counts = [], []
    for name, task in loaded["tasks"].items():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        requests += task.instances
        counts.append((name, len(task.instances)))
    return requests, counts


def timed(fn, requests) -> tuple[list, float, float]:
    """(outputs, wall seconds, CPU seconds of this process): on a shared machine CPU time is the steadier one."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(requests)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def choice_agreement(a: list, b: list, requests: list) -> int:
    """Docs whose arg-max choice differs between two scorers (acc's pick)."""
    picks: dict[tuple, list] = {}
    for (ll_a, _), (ll_b, _), req in zip(a, b, requests):
        picks.setdefault((req.task_name, req.doc_id), []).append((ll_a, ll_b))
    return sum(max(range(len(v)), key=lambda i: v[i][0]) != max(range(len(v)), key=lambda i: v[i][1])
               for v in picks.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--items", type=int, default=8, help="docs per task")
    ap.add_argument("--batch", type=int, default=32, help="rows per forward, both scorers")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if "QAT_DATA_DIR" not in os.environ and SHARED.is_dir():
        os.environ["QAT_DATA_DIR"] = str(SHARED)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    from qat_lightning.eval.lm_eval_adapter import QATLM
    from qat_lightning.models import load_model

    if args.model == "smollm2":
        model, tokenizer = load_model({"source": "smollm2"})
    else:
        model, tokenizer = load_model({"source": "tiny", "tokenizer": "smollm2"})
    model = model.float().eval()
    requests, counts = build_requests(args.items)
    print(f"{len(requests)} loglikelihood requests ({', '.join(f'{n} {c}' for n, c in counts)}); "
          f"batch {args.batch}, {args.threads} threads, {args.rounds} round(s)")

    scorers = {
        "HFLM (lm-eval)": HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch, device="cpu"),
        "QATLM rows": QATLM(model, tokenizer, batch_size=args.batch, share_context=False),
        "QATLM shared ctx": QATLM(model, tokenizer, batch_size=args.batch),
    }
    runs: dict[str, list[tuple[list, float, float]]] = {name: [] for name in scorers}
    with torch.inference_mode():
        for lm in scorers.values():
            lm.loglikelihood(requests[:8], disable_tqdm=True)  # warm-up
        for _ in range(args.rounds):  # interleaved, so a change in the machine's load hits every scorer
            for name, lm in scorers.items():
                if hasattr(lm, "tokens_forwarded"):
                    lm.tokens_forwarded = 0
                runs[name].append(timed(lambda r, lm=lm: lm.loglikelihood(r, disable_tqdm=True), requests))
    best = {name: (r[0][0], min(x[1] for x in r), min(x[2] for x in r)) for name, r in runs.items()}
    ref, _, ref_cpu = best["HFLM (lm-eval)"]
    print("| scorer | requests/s (wall) | wall s | CPU s | speed-up vs HFLM (CPU s) | tokens forwarded | "
          "max abs dLL vs HFLM | picks differing |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (out, wall, cpu) in best.items():
        lm = scorers[name]
        tokens = lm.tokens_forwarded if hasattr(lm, "tokens_forwarded") else "-"
        diff = max(abs(a - b) for (a, _), (b, _) in zip(out, ref))
        print(f"| {name} | {len(requests) / wall:.1f} | {wall:.1f} | {cpu:.1f} | {ref_cpu / cpu:.2f}x | {tokens} | "
              f"{diff:.1e} | {choice_agreement(out, ref, requests)} |")


if __name__ == "__main__":
    main()
