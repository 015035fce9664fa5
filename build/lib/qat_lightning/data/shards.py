"""The generated corpus on disk: `meta.json` plus shards of token ids, each written atomically.

Layout of a corpus folder:

    meta.json                 settings, model name, config hash, vocab size, EOS id, sequences requested
    shard-00000.safetensors   sequences [0, shard_size): `tokens` int32 (sum of lengths,), `offsets` int64 (n + 1,)
    shard-00001.safetensors   sequences [shard_size, 2 * shard_size) ...

Shard i always holds the same fixed range of sequence indices, so a run killed at any point resumes by
regenerating exactly the shards that are missing: nothing is lost or duplicated. A shard is written to
`shard-XXXXX.tmp` and then renamed, so a file with the final name is always complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from qat_lightning.atomic import write_bytes_atomic
from qat_lightning.data.config import GenerationConfig

META = "meta.json"
FORMAT = "qat-lightning-corpus/1"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def num_shards(num_sequences: int, shard_size: int) -> int:
    return -(-num_sequences // shard_size)


def shard_range(index: int, num_sequences: int, shard_size: int) -> tuple[int, int]:
    """The sequence indices [start, stop) that shard `index` holds in a corpus of `num_sequences`."""
    start = index * shard_size
    return start, min(start + shard_size, num_sequences)


def config_hash(settings: dict, model_name: str) -> str:
    """A short digest of everything that decides the sequences (not how many there are)."""
    blob = json.dumps({"model_name": model_name, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_meta(path: str | Path) -> dict | None:
    meta = Path(path) / META
    if not meta.exists():
        return None
    return json.loads(meta.read_text())


def write_meta(path: str | Path, meta: dict) -> None:
    write_bytes_atomic(Path(path) / META, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def check_meta(existing: dict, wanted: dict, path: str | Path) -> None:
    """Refuse a folder whose corpus was made differently: mixing two corpora would be silent garbage."""
    if existing.get("config_hash") == wanted["config_hash"]:
        return
    old = existing.get("settings", {}) | {"model_name": existing.get("model_name")}
    new = wanted["settings"] | {"model_name": wanted["model_name"]}
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k)]
    raise ValueError(
        f"{path} holds a corpus generated with different settings ({'; '.join(diff) or 'config hash differs'}); "
        "use another out_dir or delete it"
    )


def write_shard(path: str | Path, index: int, sequences: list[list[int]], start: int, digest: str) -> Path:
    """Write one shard (flat int32 tokens + offsets) atomically and return its path."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)  # (n,)
    offsets = torch.zeros(len(sequences) + 1, dtype=torch.int64)  # (n + 1,)
    offsets[1:] = torch.cumsum(lengths, 0)
    tokens = torch.tensor([t for s in sequences for t in s], dtype=torch.int32)  # (sum of lengths,)
    metadata = {
        "index": str(index),
        "start": str(start),
        "count": str(len(sequences)),
        "num_tokens": str(int(tokens.numel())),
        "config_hash": digest,
    }
    out = Path(path) / shard_name(index)
    write_bytes_atomic(out, st_save({"tokens": tokens, "offsets": offsets}, metadata=metadata))
    return out


def shard_header(file: str | Path) -> dict[str, str]:
    """A shard's metadata, read without loading its tensors."""
    with safe_open(str(file), framework="pt") as f:
        return f.metadata() or {}


def read_shard(file: str | Path) -> list[list[int]]:
    data = st_load(Path(file).read_bytes())
    tokens, offsets = data["tokens"].tolist(), data["offsets"].tolist()
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def shard_is_complete(path: str | Path, index: int, num_sequences: int, shard_size: int, digest: str) -> bool:
    """True if shard `index` exists, belongs to this corpus, and holds at least its share of sequences."""
    file = Path(path) / shard_name(index)
    if not file.exists():
        return False
    try:
        header = shard_header(file)
    except Exception:  # unreadable: regenerate it
        return False
    start, stop = shard_range(index, num_sequences, shard_size)
    return (
        header.get("config_hash") == digest
        and int(header.get("start", -1)) == start
        and int(header.get("count", -1)) >= stop - start
    )


def corpus_is_complete(path: str | Path, cfg: GenerationConfig, model_name: str | None = None) -> bool:
    """True if `path` holds all `cfg.num_sequences` sequences made with `cfg` (and `model_name`, if given)."""
    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        return False
    name = meta.get("model_name", "") if model_name is None else model_name
    digest = config_hash(cfg.corpus_settings(), name)
    if meta.get("config_hash") != digest:
        return False
    return all(
        shard_is_complete(path, i, cfg.num_sequences, cfg.shard_size, digest)
        for i in range(num_shards(cfg.num_sequences, cfg.shard_size))
    )


def corpus_num_tokens(path: str | Path, num_sequences: int, shard_size: int) -> int:
    """Tokens in the shards of a corpus of `num_sequences` present now (headers only)."""
    total = 0
    for i in range(num_shards(num_sequences, shard_size)):
        file = Path(path) / shard_name(i)
        if file.exists():
            total += int(shard_header(file).get("num_tokens", 0))
    return total


def load_generated(path: str | Path, num_sequences: int | None = None) -> list[list[int]]:
    """All sequences of a generated corpus, in sequence-index order.

    Args:
        path: the corpus folder.
        num_sequences: keep only the first n; default: the number recorded in meta.json.

    Raises:
        ValueError: no corpus there, or shards missing (a killed run: rerun generation to resume it).
    """
    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        raise ValueError(f"no generated corpus at {path} (meta.json missing); run the generate stage first")
    wanted = int(meta["num_sequences"]) if num_sequences is None else num_sequences
    shard_size = int(meta["settings"]["shard_size"])
    sequences: list[list[int]] = []
    for i in range(num_shards(wanted, shard_size)):
        file = path / shard_name(i)
        if not shard_is_complete(path, i, wanted, shard_size, meta["config_hash"]):
            raise ValueError(
                f"generated corpus at {path} is incomplete: {shard_name(i)} is missing or short "
                f"({len(sequences)} of {wanted} sequences readable); rerun generation to resume it"
            )
        sequences.extend(read_shard(file))
    return sequences[:wanted]
