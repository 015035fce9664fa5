"""Packing, batches, splits and the three DataModules, on tiny corpora written to tmp dirs."""

from __future__ import annotations

import sys

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DistributedSampler

from conftest import shared_data_or_skip
from qat_lightning.data.config import DataConfig
from qat_lightning.data.datamodules import (
    GeneratedDataModule,
    MixedDataModule,
    TextCorpusDataModule,
    build_datamodule,
    split_documents,
)
from qat_lightning.data.packing import BlockDataset, pack_documents
from qat_lightning.data.shards import config_hash, write_meta, write_shard

EOS = 2


class CharTokenizer:
    """Letters a-z and space -> ids 3..29; EOS 2 (stands in for a real tokenizer)."""

    eos_token_id = EOS

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + ord(c) - ord("a") if c.isalpha() else 29 for c in text.lower() if c.isalpha() or c == " "]


class ByteTokenizer:
    """Bytes -> ids 3..258, EOS 2: enough for any text file."""

    eos_token_id = EOS

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + b for b in text.encode("utf-8")]


def fake_corpus(path, documents: list[list[int]], shard_size: int = 8) -> None:
    """A generated-corpus folder in the on-disk format, without running a model."""
    settings = {"shard_size": shard_size}
    digest = config_hash(settings, "fake")
    path.mkdir(parents=True, exist_ok=True)
    write_meta(path, {"config_hash": digest, "settings": settings, "num_sequences": len(documents),
                      "eos_token_id": EOS, "model_name": "fake"})
    for i, start in enumerate(range(0, len(documents), shard_size)):
        write_shard(path, i, documents[start : start + shard_size], start, digest)


def generated_docs(n: int, seed: int = 0, low: int = 40, high: int = 64) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        length = int(torch.randint(5, 40, (1,), generator=g))
        doc = torch.randint(low, high, (length,), generator=g).tolist()
        docs.append(doc + [EOS] if length % 2 else doc)  # some end at EOS, some at max_length
    return docs


def text_file(tmp_path, lines: int = 60) -> str:
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega"]
    text = "\n\n".join(" ".join(words[(i + j) % 6] for j in range(3 + i % 7)) for i in range(lines))
    path = tmp_path / "corpus.txt"
    path.write_text(" = Title = \n\n" + text + "\n")
    return str(path)


# ---- packing -------------------------------------------------------------------------------------
def test_cross_document_packing_joins_with_eos_and_pads_only_the_tail():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, EOS]]
    ids, mask = pack_documents(docs, block_size=4, eos_id=EOS)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == (3, 4)
    stream = [5, 6, 7, EOS, 8, 9, EOS, 10, 11, 12, EOS]  # one EOS after each document, none doubled
    assert ids[mask.bool()].tolist() == stream
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]


def test_per_document_packing_pads_each_document_and_splits_long_ones():
    docs = [[5, 6], [7, 8, 9, 10, 11], [12, 13, 14, 15]]
    ids, mask = pack_documents(docs, block_size=4, eos_id=EOS, cross_doc_boundaries=False)
    assert ids.shape == (4, 4)
    rows = [ids[i][mask[i].bool()].tolist() for i in range(4)]
    assert rows == [[5, 6], [7, 8, 9, 10], [11], [12, 13, 14, 15]]  # never two documents in one block
    assert mask.sum(1).tolist() == [2, 4, 1, 4]


def test_labels_are_input_ids_with_padding_ignored():
    ids, mask = pack_documents([[5, 6], [7, 8, 9]], block_size=4, eos_id=EOS, cross_doc_boundaries=False)
    ds = BlockDataset(ids, mask)
    for i in range(len(ds)):
        item = ds[i]
        assert torch.equal(item["labels"][item["attention_mask"] == 1], item["input_ids"][item["attention_mask"] == 1])
        assert (item["labels"][item["attention_mask"] == 0] == -100).all()
    assert ds.num_tokens == 5


def test_validation_split_is_by_document_disjoint_and_seeded():
    docs = [[i, i + 1] for i in range(0, 200, 2)]
    train, val = split_documents(docs, 0.2, seed=0)
    assert len(val) == 20 and len(train) == 80
    assert {tuple(d) for d in train}.isdisjoint({tuple(d) for d in val})
    assert sorted(train + val) == sorted(docs)
    assert split_documents(docs, 0.2, seed=0) == (train, val)
    assert split_documents(docs, 0.2, seed=1)[1] != val


# ---- DataModules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cross", [True, False])
def test_generated_datamodule_batches(tmp_path, cross):
    docs = generated_docs(60)
    fake_corpus(tmp_path / "corpus", docs)
    cfg = DataConfig(block_size=16, batch_size=4, val_fraction=0.2, cross_doc_boundaries=cross)
    dm = build_datamodule(cfg, tokenizer=None, generated_path=tmp_path / "corpus")
    assert isinstance(dm, GeneratedDataModule)
    dm.setup("fit")
    stats = dm.stats()
    assert stats["num_train_documents"] == 48 and stats["num_val_documents"] == 12
    assert dm.num_train_blocks > 0 and dm.num_val_blocks > 0
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.num_train_blocks // 4  # drop_last: every batch is full
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        for value in batch.values():
            assert value.shape == (4, 16) and value.dtype == torch.long
        assert ((batch["labels"] == -100) == (batch["attention_mask"] == 0)).all()
    val_tokens = sum(int(b["attention_mask"].sum()) for b in dm.val_dataloader())
    train_docs, val_docs = dm.split()
    separators = sum(1 for d in val_docs if d[-1] != EOS) if cross else 0
    assert val_tokens == sum(map(len, val_docs)) + separators
    padded = int((dm.train_dataset.attention_mask == 0).sum())
    assert (padded <= 15) if cross else (padded > 15)  # packing pads only the tail; per-document pads each


def test_train_loader_splits_across_ranks_like_lightning_does(tmp_path):
    from lightning.pytorch.utilities.data import _update_dataloader

    fake_corpus(tmp_path / "corpus", generated_docs(60))
    dm = GeneratedDataModule(tmp_path / "corpus", DataConfig(block_size=16, batch_size=2, val_fraction=0.1))
    loader = dm.train_dataloader()
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(dm.train_dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        ranked = _update_dataloader(loader, sampler)  # what Lightning does under DDP/FSDP
        assert ranked.batch_size == 2 and ranked.drop_last
        seen.append({tuple(row.tolist()) for b in ranked for row in b["input_ids"]})
    assert seen[0].isdisjoint(seen[1]) and seen[0] and seen[1]


def test_text_file_datamodule_keeps_every_token(tmp_path):
    cfg = DataConfig(source="text", text_path=text_file(tmp_path), block_size=32, batch_size=2, val_fraction=0.1)
    dm = build_datamodule(cfg, CharTokenizer())
    assert isinstance(dm, TextCorpusDataModule)
    dm.setup("fit")
    docs = dm.documents()
    assert len(docs) == 61  # the heading and 60 paragraphs; blank lines are no documents
    total = dm.num_train_tokens + dm.val_dataset.num_tokens
    assert total == sum(map(len, docs)) + len(docs)  # each document plus its EOS separator
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 32)


def test_max_text_tokens_caps_the_corpus(tmp_path):
    cfg = DataConfig(source="text", text_path=text_file(tmp_path), block_size=8, batch_size=1, max_text_tokens=100)
    assert sum(map(len, TextCorpusDataModule(CharTokenizer(), cfg).documents())) == 100


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_mixed_datamodule_holds_the_ratio_of_real_text(tmp_path, ratio):
    fake_corpus(tmp_path / "corpus", generated_docs(80))  # generated ids 40..63, text ids 3..29
    cfg = DataConfig(source="mixed", text_path=text_file(tmp_path, 120), mix_ratio=ratio, block_size=32,
                     batch_size=2, val_fraction=0.1)
    dm = build_datamodule(cfg, CharTokenizer(), generated_path=tmp_path / "corpus")
    assert isinstance(dm, MixedDataModule)
    dm.setup("fit")
    ids = dm.train_dataset.input_ids[dm.train_dataset.attention_mask.bool()]
    n_text, n_gen = int(((ids >= 3) & (ids < 30)).sum()), int((ids >= 40).sum())
    assert n_text / (n_text + n_gen) == pytest.approx(ratio, abs=0.01)
    assert dm.text_token_fraction == pytest.approx(ratio, abs=0.01)
    blocks_with_both = sum(
        bool((row >= 40).any() and ((row >= 3) & (row < 30)).any()) for row in dm.train_dataset.input_ids
    )
    assert blocks_with_both > 0  # sources are interleaved, not concatenated


def test_wikitext_with_a_byte_tokenizer():
    data = shared_data_or_skip()
    try:
        from qat_lightning.models.byte_tokenizer import ByteTokenizer as ProjectBytes

        tokenizer = ProjectBytes()
    except ImportError:
        tokenizer = ByteTokenizer()
    cfg = DataConfig(source="text", text_path=str(data / "wikitext2" / "wiki.test.raw"), block_size=128,
                     batch_size=4, max_text_tokens=50_000)
    dm = build_datamodule(cfg, tokenizer)
    dm.setup("fit")
    assert dm.num_train_tokens + dm.val_dataset.num_tokens >= 50_000
    assert (dm.num_train_blocks - 1) * 128 < dm.num_train_tokens <= dm.num_train_blocks * 128  # packed densely
    assert dm.num_val_blocks >= 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 128) and int(batch["attention_mask"].sum()) == 4 * 128


# ---- errors --------------------------------------------------------------------------------------
def test_too_little_data_for_one_batch_is_a_clear_error(tmp_path):
    fake_corpus(tmp_path / "corpus", generated_docs(4))
    dm = GeneratedDataModule(tmp_path / "corpus", DataConfig(block_size=128, batch_size=8))
    with pytest.raises(ValueError, match="fewer than data.batch_size"):
        dm.setup("fit")


def test_generated_source_needs_a_corpus():
    with pytest.raises(ValueError, match="generated corpus"):
        build_datamodule(DataConfig(), tokenizer=None)


def test_missing_corpus_is_a_clear_error(tmp_path):
    dm = GeneratedDataModule(tmp_path / "nothing", DataConfig(), eos_token_id=EOS)
    with pytest.raises(ValueError, match="no generated corpus"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"source": "books"}, "source"),
        ({"source": "text"}, "text_path"),
        ({"block_size": 1}, "block_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"mix_ratio": 1.5}, "mix_ratio"),
        ({"hf_dataset": "a:b:c:d"}, "hf_dataset"),
        ({"max_text_tokens": 0}, "max_text_tokens"),
    ],
)
def test_bad_data_config_fails_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kw)
    with pytest.raises(ValueError, match=match):
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), kw))


def test_hf_dataset_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # behave as if `datasets` were not installed
    dm = TextCorpusDataModule(CharTokenizer(), DataConfig(source="text", hf_dataset="wikitext:wikitext-2-raw-v1"))
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        dm.setup("fit")


def test_generated_datamodule_trains_on_the_corpus_size_asked_for(tmp_path):
    # a corpus folder grows to the largest size ever asked of it; a smaller run keeps its own first n sequences
    docs = generated_docs(40)
    fake_corpus(tmp_path / "corpus", docs)
    cfg = DataConfig(block_size=8, batch_size=1, val_fraction=0.0)
    small = build_datamodule(cfg, None, generated_path=tmp_path / "corpus", num_sequences=16)
    assert small.split()[0] == docs[:16]
    full = build_datamodule(cfg, None, generated_path=tmp_path / "corpus")
    full.setup("fit")
    assert full.num_train_documents == 40


def test_text_offset_skips_the_leading_documents(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("aaaa\nbbbb\ncccc\ndddd\n")
    cfg = DataConfig(source="text", text_path=str(path), block_size=4, batch_size=1, text_offset_tokens=5)
    docs = TextCorpusDataModule(CharTokenizer(), cfg).documents()
    # 4 + 4 tokens reach the offset of 5: the first two lines are skipped, whole
    assert docs == [[3 + 2] * 4, [3 + 3] * 4]
    with pytest.raises(ValueError, match="text_offset_tokens"):
        DataConfig(text_offset_tokens=-1)


def test_the_run_seed_sets_the_training_order_and_data_seed_the_held_out_split(tmp_path):
    """`seed=1` must be another run (a second training seed once trained identically to the first: the order
    was seeded by data.seed alone), while KL on the held-out split stays comparable across run seeds."""
    from conftest import compose
    from qat_lightning.config import validate_config

    fake_corpus(tmp_path / "corpus", generated_docs(80))

    def order_and_split(*overrides: str):
        data_cfg = validate_config(compose(list(overrides))).data
        dm = GeneratedDataModule(tmp_path / "corpus", DataConfig(**{**vars(data_cfg), "block_size": 16,
                                                                    "batch_size": 2}))
        first = [tuple(row.tolist()) for b in dm.train_dataloader() for row in b["input_ids"]]
        return first, dm.split()[1]

    base_order, base_val = order_and_split()
    assert order_and_split() == (base_order, base_val)  # reproducible
    order, val = order_and_split("seed=1")
    assert order != base_order and val == base_val
    order, val = order_and_split("data.seed=1")
    assert val != base_val
    # the default run (seed 0) keeps the order runs had before the split: data.seed 0's
    assert base_order == order_and_split("data.seed=0", "data.shuffle_seed=0")[0]
    assert order_and_split("data.seed=1", "data.shuffle_seed=${data.seed}")[0] != base_order
