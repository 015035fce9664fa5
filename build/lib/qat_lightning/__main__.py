"""`python -m qat_lightning +exp=NAME [overrides]`: compose the config, validate it, run its stages.

With no `+exp`, the embedded default experiment (`smollm2_w4a8kv4`) runs: `qat_lightning/conf/config.yaml` *is* that
experiment, because Hydra refuses `+exp=` when `exp` sits in the primary defaults list.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# the configs ship inside the package, so `pip install .` and wheels run too (not only editable installs)
CONF_DIR = "pkg://qat_lightning.conf"
_JOB_OVERRIDES = "QAT_LIGHTNING_JOB_OVERRIDES"
_JOB_DIR = "QAT_LIGHTNING_JOB_DIR"

log = logging.getLogger("qat_lightning")


def _rewrite_argv_for_sweep_child() -> None:
    """A rank relaunched by Lightning re-runs `sys.argv`; inside a `-m` sweep that would re-run the whole
    sweep (Hydra #2070). The parent job left its own overrides and run dir in the environment: use them,
    so the child joins exactly that job and writes into the same run dir."""
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 or _JOB_OVERRIDES not in os.environ:
        return
    overrides = json.loads(os.environ[_JOB_OVERRIDES])
    job_dir = os.environ[_JOB_DIR]
    sys.argv = [sys.argv[0], *overrides, f"hydra.run.dir={job_dir}", "hydra.output_subdir=null"]


def _export_job_for_children() -> None:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        os.environ[_JOB_OVERRIDES] = json.dumps(list(hc.overrides.task))
        os.environ[_JOB_DIR] = hc.runtime.output_dir


_LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", _JOB_OVERRIDES, _JOB_DIR)


def _end_job(env_before: dict[str, str | None]) -> None:
    """Leave no process group and no launcher variables behind for the next job of a sweep.

    Lightning's launcher sets LOCAL_RANK, WORLD_SIZE, MASTER_PORT... in the parent; left there, the next
    job would believe its ranks were launched externally and wait forever for them.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for var, value in env_before.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def run(cfg: DictConfig) -> None:
    from qat_lightning.config import ConfigError, validate_config
    from qat_lightning.run.checks import check_run

    try:
        run_cfg = validate_config(cfg)
        check_run(run_cfg)  # paths, data and sizes against the model's config: before any model loads
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    from qat_lightning.stages import RunContext, run_stages

    run_dir = HydraConfig.get().runtime.output_dir
    env_before = {var: os.environ.get(var) for var in _LAUNCHER_VARS}
    _export_job_for_children()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    ctx = RunContext(run_cfg, run_dir, resolved_cfg=resolved)
    memo_key = _memo_key(run_cfg, resolved)
    if memo_key is not None and _replay_memo(ctx, memo_key):
        _end_job(env_before)
        return
    try:
        run_stages(ctx)
    except Exception as err:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        # a failed or diverged job of a sweep is recorded, not dropped, and the sweep goes on
        log.exception("job failed: %s", err)
        if ctx.results is not None:
            ctx.results.update({"run/job/failed": 1})
    finally:
        _end_job(env_before)
    if ctx.results is not None:
        if memo_key is not None:
            from qat_lightning import run_memo

            run_memo.store(run_cfg.paths.data_dir, memo_key, run_dir, ctx.results.values)
        log.info("results: %s", ctx.results.path)


def _memo_key(run_cfg, resolved: dict) -> str | None:
    """The run's memo key when `memo=true` (rank 0 only: other ranks always train)."""
    if not run_cfg.memo or int(os.environ.get("LOCAL_RANK", 0)) != 0:
        return None
    from qat_lightning import run_memo

    return run_memo.memo_key(resolved)


def _replay_memo(ctx, key: str) -> bool:
    """Copy the results of an identical finished run into this run's dir and to its logger (so the sweep's
    dashboard has every run); False when there is none."""
    from qat_lightning import run_memo

    entry = run_memo.lookup(ctx.cfg.paths.data_dir, key)
    if entry is None:
        return False
    path = run_memo.replay(entry, ctx.run_dir)
    log.info("memo: identical to the finished run %s; its results copied to %s (nothing rerun)", entry["run_dir"], path)
    try:
        ctx.log(entry["results"])
    finally:
        ctx.close_logger()
    return True


def main() -> None:
    from qat_lightning.config import ConfigError, register_configs
    from qat_lightning.run.checks import check_experiment_args

    _rewrite_argv_for_sweep_child()
    try:  # Hydra would print its search path for an unknown experiment: name the ones there are instead
        check_experiment_args(sys.argv[1:], Path(__file__).resolve().parent / "conf")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    register_configs()
    run()


if __name__ == "__main__":
    main()
