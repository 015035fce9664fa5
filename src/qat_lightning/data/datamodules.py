"""Lightning DataModules: the teacher's generated corpus, real text, or a mix of both.

All three hold out a validation split by document (seeded), pack documents into fixed-length blocks
(`packing.py`) and serve plain map-style Datasets; the train loader shuffles and drops the last short
batch, so under DDP/FSDP Lightning swaps in its DistributedSampler and every rank sees equal batches.

Batches are dicts: `input_ids (B, T)`, `attention_mask (B, T)`, `labels (B, T)` (input_ids with -100 on
padding; the model shifts them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from qat_lightning.data.config import DataConfig
from qat_lightning.data.packing import BlockDataset, pack_documents
from qat_lightning.data.sampler import EpochShuffleSampler, ResumableDataLoader
from qat_lightning.data.shards import load_generated, read_meta

log = logging.getLogger(__name__)

Documents = list[list[int]]


# ---- documents -----------------------------------------------------------------------------------
def split_documents(documents: Sequence[list[int]], val_fraction: float, seed: int) -> tuple[Documents, Documents]:
    """Hold out round(val_fraction * n) whole documents (at least one when there are two or more).

    Splitting by document, not by block, keeps any text of a validation document out of training.
    Both halves keep the corpus order; which documents go where depends only on (n, seed).
    """
    n = len(documents)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(max(1, round(val_fraction * n)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_ids = set(order[:n_val])
    train = [list(d) for i, d in enumerate(documents) if i not in val_ids]
    val = [list(d) for i, d in enumerate(documents) if i in val_ids]
    return train, val


def text_documents(text: str) -> list[str]:
    """One document per non-empty line: WikiText (and most dumps) store one paragraph per line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def encode_texts(tokenizer, texts: Iterable[str], max_tokens: int | None = None, chunk: int = 512) -> Documents:
    """Token ids of each text (no special tokens), stopping once `max_tokens` tokens are collected."""
    out: Documents = []
    total = 0
    buffer: list[str] = []

    def flush() -> bool:
        nonlocal total
        for ids in _encode(tokenizer, buffer):
            if max_tokens is not None and total + len(ids) >= max_tokens:
                out.append(ids[: max_tokens - total])
                total = max_tokens
                return True
            out.append(ids)
            total += len(ids)
        buffer.clear()
        return False

    for text in texts:
        buffer.append(text)
        if len(buffer) >= chunk and flush():
            return [d for d in out if d]
    if buffer:
        flush()
    return [d for d in out if d]


def _encode(tokenizer, texts: list[str]) -> Documents:
    if callable(tokenizer):
        try:
            encoded = tokenizer(texts, add_special_tokens=False)
            ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
            return [list(map(int, x)) for x in ids]
        except TypeError:
            pass
    try:
        return [list(map(int, tokenizer.encode(t, add_special_tokens=False))) for t in texts]
    except TypeError:
        return [list(map(int, tokenizer.encode(t))) for t in texts]


def _hf_texts(spec: str, data_files: str | None = None) -> Iterable[str]:
    """Texts of an HF dataset named 'name[:config[:split]]' (streamed: C4 is too big to download).

    With `data_files` (a path or glob), `name` is a builder packaged with `datasets` (text, json, csv,
    parquet) reading those local files, so no network is needed: e.g. `json` over a C4 `.json.gz` shard.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"data.hf_dataset={spec!r} needs the `datasets` package (pip install datasets); "
            "or point data.text_path at a local text file"
        ) from err
    name, config, split = (spec.split(":") + [None, None])[:3]
    local = {"data_files": data_files} if data_files else {}
    try:
        rows = datasets.load_dataset(name, config, split=split or "train", streaming=True, **local)
    except Exception as err:  # offline, unknown name, missing local file, ...: one clear line
        where = f" with data_files={data_files!r}" if data_files else ""
        raise RuntimeError(f"could not load HF dataset {spec!r}{where}: {err}") from err
    for row in rows:
        text = row.get("text", "")
        yield from text_documents(text)


def skip_tokens(tokenizer, texts: Iterable[str], offset: int) -> Iterable[str]:
    """The texts after the leading whole documents that hold `offset` tokens.

    Why: the only real text offline is WikiText-2 *test*, which is also the perplexity benchmark; training on
    it must skip the evaluated windows (the first seq_len x max_windows tokens) or it would score its own
    training text.
    """
    seen = 0
    for text in texts:
        if seen >= offset:
            yield text
        else:
            seen += len(_encode(tokenizer, [text])[0])


def take_tokens(documents: Sequence[list[int]], budget: int) -> Documents:
    """The leading documents holding `budget` tokens (the last one cut)."""
    out: Documents = []
    left = budget
    for doc in documents:
        if left <= 0:
            break
        out.append(list(doc[:left]))
        left -= len(out[-1])
    return out


def mix_documents(generated: Documents, text: Documents, ratio: float, seed: int) -> tuple[Documents, float]:
    """Generated and real documents with `ratio` of the tokens from real text, interleaved (seeded).

    The larger side is cut so the ratio holds with every token of the smaller side kept.

    Returns:
        The mixed documents and the fraction of their tokens that are real text.
    """
    n_gen, n_text = sum(map(len, generated)), sum(map(len, text))
    if ratio >= 1:
        gen, txt = [], list(text)
    elif ratio <= 0:
        gen, txt = list(generated), []
    elif n_text * (1 - ratio) >= ratio * n_gen:  # enough text: keep all generated
        gen, txt = list(generated), take_tokens(text, round(n_gen * ratio / (1 - ratio)))
    else:  # not enough text: keep all of it, cut the generated side
        gen, txt = take_tokens(generated, round(n_text * (1 - ratio) / ratio)), list(text)
    chosen = gen + txt
    order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed)).tolist()
    n_txt = sum(map(len, txt))
    return [chosen[i] for i in order], n_txt / max(n_txt + sum(map(len, gen)), 1)


# ---- DataModules ---------------------------------------------------------------------------------
class _BlockDataModule(L.LightningDataModule):
    """Shared machinery: documents -> (train, val) split by document -> packed blocks -> loaders."""

    def __init__(self, cfg: DataConfig, eos_token_id: int | None) -> None:
        super().__init__()
        if eos_token_id is None:
            raise ValueError("the DataModule needs an EOS token id (separator and padding); the tokenizer has none")
        self.cfg = cfg
        self.eos_token_id = int(eos_token_id)
        self.train_dataset: BlockDataset | None = None
        self.val_dataset: BlockDataset | None = None
        self.num_train_documents = 0
        self.num_val_documents = 0

    def split(self) -> tuple[Documents, Documents]:
        """(train documents, validation documents)."""
        raise NotImplementedError

    def _pack(self, documents: Documents) -> BlockDataset:
        ids, mask = pack_documents(documents, self.cfg.block_size, self.eos_token_id, self.cfg.cross_doc_boundaries)
        return BlockDataset(ids, mask)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train_docs, val_docs = self.split()
        self.num_train_documents, self.num_val_documents = len(train_docs), len(val_docs)
        self.train_dataset, self.val_dataset = self._pack(train_docs), self._pack(val_docs)
        if self.num_train_blocks < self.cfg.batch_size:
            raise ValueError(
                f"only {self.num_train_blocks} training blocks of {self.cfg.block_size} tokens, fewer than "
                f"data.batch_size={self.cfg.batch_size}: generate more data or lower block_size/batch_size"
            )
        log.info("%s: %s", type(self).__name__, self.stats())

    @property
    def shuffle_seed(self) -> int:
        """The training order's seed: `data.shuffle_seed` (the run's seed in conf), else `data.seed`."""
        return self.cfg.seed if self.cfg.shuffle_seed is None else self.cfg.shuffle_seed

    @property
    def num_train_blocks(self) -> int:
        return len(self.train_dataset) if self.train_dataset is not None else 0

    @property
    def num_val_blocks(self) -> int:
        return len(self.val_dataset) if self.val_dataset is not None else 0

    @property
    def num_train_tokens(self) -> int:
        return self.train_dataset.num_tokens if self.train_dataset is not None else 0

    def stats(self) -> dict[str, int]:
        """Sizes for logs and results.json."""
        return {
            "num_train_documents": self.num_train_documents,
            "num_val_documents": self.num_val_documents,
            "num_train_blocks": self.num_train_blocks,
            "num_val_blocks": self.num_val_blocks,
            "num_train_tokens": self.num_train_tokens,
        }

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return ResumableDataLoader(
            self.train_dataset,
            batch_size=self.cfg.batch_size,
            # seeded per epoch so a resumed run sees the same order; Lightning splits it across ranks
            sampler=EpochShuffleSampler(len(self.train_dataset), self.shuffle_seed),
            drop_last=True,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            skip_batches=self._batches_done_this_epoch(),
        )

    def _batches_done_this_epoch(self) -> int:
        """Batches of the current epoch a resumed run already trained on (0 unless resuming mid-epoch).

        Lightning restores its loop progress before it asks for the train loader; a checkpoint written after
        the epoch's last batch starts the next epoch afresh, so only 0 < done < batches-per-epoch skips.
        """
        trainer = self.trainer  # set by Lightning while it fits; None otherwise
        if trainer is None or not trainer.fit_loop.restarting:
            return 0
        # `processed`: batches whose step ran (a checkpoint written in on_train_batch_end has not yet counted
        # its batch as `completed`)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        per_rank = -(-len(self.train_dataset) // max(1, trainer.world_size))  # DistributedSampler pads
        per_epoch = per_rank // self.cfg.batch_size
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            per_epoch = min(per_epoch, limit)
        elif limit is not None and limit < 1.0:
            per_epoch = int(per_epoch * limit)
        return done if 0 < done < per_epoch else 0

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return DataLoader(
            self.val_dataset,
            batch_size=self.cfg.batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )


class GeneratedDataModule(_BlockDataModule):
    """The teacher's own corpus (`generate_corpus`), the paper's data-free setting.

    `eos_token_id` defaults to the one recorded in the corpus's meta.json. `num_sequences` keeps the first n
    sequences: a corpus folder grows to the largest size ever asked of it, and a smaller run must still
    train on exactly the size it asked for (the corpus-size ablation). None: all of them.
    """

    def __init__(
        self, path: str | Path, cfg: DataConfig, eos_token_id: int | None = None, num_sequences: int | None = None
    ) -> None:
        self.path = Path(path)
        self.num_sequences = num_sequences
        if eos_token_id is None:
            eos_token_id = (read_meta(self.path) or {}).get("eos_token_id")
        super().__init__(cfg, eos_token_id)

    def split(self) -> tuple[Documents, Documents]:
        documents = load_generated(self.path, self.num_sequences)
        return split_documents(documents, self.cfg.val_fraction, self.cfg.seed)


class TextCorpusDataModule(_BlockDataModule):
    """Real text: a local file (`text_path`, one document per non-empty line) or an HF dataset."""

    def __init__(self, tokenizer, cfg: DataConfig) -> None:
        if not (cfg.text_path or cfg.hf_dataset):
            raise ValueError("TextCorpusDataModule needs data.text_path or data.hf_dataset")
        super().__init__(cfg, getattr(tokenizer, "eos_token_id", None))
        self.tokenizer = tokenizer
        if cfg.text_path and not Path(cfg.text_path).expanduser().exists():
            raise ValueError(f"data.text_path does not exist: {cfg.text_path}")

    def documents(self) -> Documents:
        if self.cfg.text_path:
            texts: Iterable[str] = text_documents(Path(self.cfg.text_path).expanduser().read_text(encoding="utf-8"))
        else:
            texts = _hf_texts(self.cfg.hf_dataset, self.cfg.hf_data_files)
        if self.cfg.text_offset_tokens:
            texts = skip_tokens(self.tokenizer, texts, self.cfg.text_offset_tokens)
        docs = encode_texts(self.tokenizer, texts, self.cfg.max_text_tokens)
        if not docs:
            raise ValueError(f"no text found in {self.cfg.text_path or self.cfg.hf_dataset}")
        return docs

    def split(self) -> tuple[Documents, Documents]:
        return split_documents(self.documents(), self.cfg.val_fraction, self.cfg.seed)


class MixedDataModule(_BlockDataModule):
    """Generated + real text with `mix_ratio` of the tokens from real text (the paper's ablation).

    Each source is split by document first, then train and validation are mixed separately.
    """

    def __init__(self, path: str | Path, tokenizer, cfg: DataConfig, num_sequences: int | None = None) -> None:
        self.generated = GeneratedDataModule(path, cfg, getattr(tokenizer, "eos_token_id", None), num_sequences)
        self.text = TextCorpusDataModule(tokenizer, cfg)
        super().__init__(cfg, self.text.eos_token_id)
        self.text_token_fraction = float("nan")

    def split(self) -> tuple[Documents, Documents]:
        gen_train, gen_val = self.generated.split()
        text_train, text_val = self.text.split()
        ratio, seed = self.cfg.mix_ratio, self.cfg.seed
        train, self.text_token_fraction = mix_documents(gen_train, text_train, ratio, seed)
        val, _ = mix_documents(gen_val, text_val, ratio, seed + 1)
        return train, val


def build_datamodule(
    cfg: DataConfig, tokenizer, generated_path: str | Path | None = None, num_sequences: int | None = None
) -> L.LightningDataModule:
    """The DataModule for `cfg.source` (`generated` and `mixed` need the corpus folder, of which the first
    `num_sequences` are used)."""
    if cfg.source in ("generated", "mixed") and generated_path is None:
        raise ValueError(f"data.source={cfg.source!r} needs the generated corpus folder (run the generate stage)")
    if cfg.source == "generated":
        return GeneratedDataModule(generated_path, cfg, getattr(tokenizer, "eos_token_id", None), num_sequences)
    if cfg.source == "text":
        return TextCorpusDataModule(tokenizer, cfg)
    return MixedDataModule(generated_path, tokenizer, cfg, num_sequences)
