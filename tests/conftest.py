"""Shared fixtures: compose the real Hydra config in-process, forced onto CPU and tiny sizes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "src" / "qat_lightning" / "conf"
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_data_or_skip() -> Path:
    if not (SHARED_DATA / "wikitext2" / "wiki.test.raw").exists():
        pytest.skip(f"shared evaluation data not found at {SHARED_DATA} (needs ../shared/data beside the repo)")
    return SHARED_DATA


# Overrides that turn any experiment into a seconds-long CPU run on a tiny model of the same family.
def tiny_overrides(tmp_path: Path, arch: str = "llama") -> list[str]:
    return [
        f"paths.root_dir={tmp_path}",
        f"paths.data_dir={tmp_path}/data",
        f"paths.cache_dir={tmp_path}/cache",
        f"paths.output_dir={tmp_path}/run",
        "model=tiny" if arch == "llama" else "model=tiny_qwen2",
        "trainer=debug",
        "strategy=auto",
        "logger=csv",
        "generation.num_sequences=16",
        "generation.max_length=40",
        "generation.batch_size=8",
        "generation.shard_size=8",
        "data.block_size=32",
        "data.batch_size=2",
        "data.val_fraction=0.2",
        "evaluate.tasks=[kl]",
        "evaluate.kl_batches=1",
        "evaluate.seq_len=32",
        "calib_batches=1",
        "strategy.gradient_checkpointing=false",
    ]


def compose(overrides: list[str]):
    """The real config, composed in-process; paths that would need a Hydra run are given explicitly."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from qat_lightning.config import register_configs

    register_configs()

    defaults = {"paths.root_dir": "/tmp/qat-lightning-tests", "paths.output_dir": "/tmp/qat-lightning-tests/run"}
    given = {o.split("=", 1)[0] for o in overrides}
    extra = [f"{k}={v}" for k, v in defaults.items() if k not in given]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*overrides, *extra])


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*extra: str, exp: str = "tiny_w4a8kv4"):
        return compose([f"+exp={exp}", *tiny_overrides(tmp_path), *extra])

    return make
