"""The HF `datasets` code paths, offline: training text read by `datasets` builders from local files
(`data.hf_dataset` + `data.hf_data_files`), and the evaluation fallback to hub ids with the hub routed to
local files read by the real `datasets` library (so its row and column objects are the real ones).
"""

from __future__ import annotations

import gzip
import json
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

datasets = pytest.importorskip("datasets", reason="HF datasets is not installed: pip install 'qat-lightning[eval]'")

from conftest import shared_data_or_skip  # noqa: E402
from qat_lightning.data.config import DataConfig  # noqa: E402
from qat_lightning.data.datamodules import TextCorpusDataModule, build_datamodule, text_documents  # noqa: E402
from qat_lightning.eval import load_hellaswag, load_text  # noqa: E402
from qat_lightning.eval import sources as eval_sources  # noqa: E402
from qat_lightning.models import ByteTokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def private_hf_cache(tmp_path, monkeypatch):
    """Keep `datasets`' cache (lock files, arrow files) out of ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture
def hub(monkeypatch):
    """Route `datasets.load_dataset(<hub id>, ...)` to a local file read by a packaged builder.

    `hub.routes[hub_id] = (builder, local file, extra builder kwargs)`; `hub.calls` records every call as made.
    """
    real = datasets.load_dataset
    routes: dict[str, tuple] = {}
    calls: list[dict] = []

    def load_dataset(path, name=None, *, split=None, data_files=None, **kwargs):
        calls.append({"path": path, "name": name, "split": split, "data_files": data_files, **kwargs})
        builder, local, extra = routes[path]
        return real(builder, data_files={split: str(local)}, split=split, **extra, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return SimpleNamespace(routes=routes, calls=calls)


def write_corpus(path, paragraphs: int = 40, newline: str = "\n") -> None:
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "Köln"]
    lines = [" = Title = ", ""] + [" ".join(words[(i + j) % 7] for j in range(3 + i % 5)) for i in range(paragraphs)]
    path.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())


# ---- training text: data.hf_dataset + data.hf_data_files ------------------------------------------------
def text_cfg(**kw) -> DataConfig:
    return DataConfig(**{"source": "text", "block_size": 32, "batch_size": 2, "val_fraction": 0.1, **kw})


def test_text_builder_over_a_local_file_equals_text_path(tmp_path):
    path = tmp_path / "corpus.txt"
    write_corpus(path, newline="\r\n")
    via_datasets = build_datamodule(text_cfg(hf_dataset="text", hf_data_files=str(path)), ByteTokenizer())
    via_path = build_datamodule(text_cfg(text_path=str(path)), ByteTokenizer())
    docs = via_datasets.documents()
    assert len(docs) == 41 and docs == via_path.documents()  # the heading and 40 paragraphs, CRLF or not
    via_datasets.setup("fit")
    via_path.setup("fit")
    assert via_datasets.stats() == via_path.stats()
    batch = next(iter(via_datasets.train_dataloader()))
    assert batch["input_ids"].shape == (2, 32)


def test_json_builder_reads_a_c4_like_shard_and_globs(tmp_path):
    rows = [{"text": f"doc {i} line one\ndoc {i} line two", "url": f"https://example.org/{i}"} for i in range(6)]
    for part in (0, 1):
        with gzip.open(tmp_path / f"c4-train.0000{part}.json.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[part * 3 : part * 3 + 3])
    cfg = text_cfg(hf_dataset="json", hf_data_files=str(tmp_path / "c4-train.*.json.gz"))
    docs = TextCorpusDataModule(ByteTokenizer(), cfg).documents()
    want = [line for r in rows for line in text_documents(r["text"])]  # one document per non-empty line
    assert docs == [list(line.encode()) for line in want]


def test_hub_ids_still_go_to_the_hub_without_data_files(tmp_path, hub):
    path = tmp_path / "wiki.train.raw"
    write_corpus(path)
    hub.routes["wikitext"] = ("text", path, {})
    dm = TextCorpusDataModule(ByteTokenizer(), text_cfg(hf_dataset="wikitext:wikitext-2-raw-v1:train"))
    assert dm.documents() == TextCorpusDataModule(ByteTokenizer(), text_cfg(text_path=str(path))).documents()
    assert hub.calls == [
        {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "train", "data_files": None, "streaming": True}
    ]


def test_wikitext2_through_the_text_builder_equals_text_path():
    raw = shared_data_or_skip() / "wikitext2" / "wiki.test.raw"
    cfg = dict(block_size=128, batch_size=4, max_text_tokens=50_000)
    via_datasets = build_datamodule(text_cfg(hf_dataset="text", hf_data_files=str(raw), **cfg), ByteTokenizer())
    via_path = build_datamodule(text_cfg(text_path=str(raw), **cfg), ByteTokenizer())
    docs = via_datasets.documents()
    assert sum(map(len, docs)) == 50_000 and docs == via_path.documents()
    via_datasets.setup("fit")
    assert via_datasets.num_train_tokens + via_datasets.val_dataset.num_tokens >= 50_000


def test_hf_data_files_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="hf_data_files needs data.hf_dataset"):
        DataConfig(hf_data_files="x.txt")
    with pytest.raises(ValueError, match="hf_data_files needs data.hf_dataset"):
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), {"hf_data_files": "x.txt"}))
    missing = str(tmp_path / "missing.txt")
    dm = TextCorpusDataModule(ByteTokenizer(), text_cfg(hf_dataset="text", hf_data_files=missing))
    with pytest.raises(RuntimeError, match="could not load HF dataset 'text' with data_files="):
        dm.setup("fit")


# ---- evaluation: the `datasets` fallback when no local file is configured -------------------------------
@pytest.fixture
def no_local_data(monkeypatch):
    monkeypatch.delenv("QAT_DATA_DIR", raising=False)


def test_wikitext2_falls_back_to_datasets(tmp_path, hub, no_local_data):
    path = tmp_path / "wiki.test.raw"
    write_corpus(path)
    hub.routes["wikitext"] = ("text", path, {"keep_linebreaks": True})  # HF's rows keep their newline
    text = load_text("wikitext2")
    assert text == "\n\n".join(path.read_text().splitlines(keepends=True))  # the GPTQ join of the rows
    assert hub.calls == [{"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test", "data_files": None}]


def test_c4_falls_back_to_datasets_and_keeps_the_first_documents(tmp_path, hub, no_local_data, monkeypatch):
    texts = [f"c4 document {i}\nwith two lines" for i in range(5)]
    shard = tmp_path / "c4-validation.json.gz"
    with gzip.open(shard, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t, "url": "u", "timestamp": "2019"}) + "\n" for t in texts)
    hub.routes["allenai/c4"] = ("json", shard, {})
    monkeypatch.setattr(eval_sources, "C4_MAX_DOCS", 3)
    assert load_text("c4") == "\n\n".join(texts[:3])
    (call,) = hub.calls
    assert call["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    assert call["split"] == "validation"


def test_hellaswag_falls_back_to_datasets(tmp_path, hub, no_local_data):
    rows = [  # the fields of Rowan/hellaswag; its labels are strings
        {"ind": 4, "activity_label": "Removing ice from car", "ctx": "Then, the man writes over the snow.",
         "endings": [" a", " b", " c", " d"], "label": "3", "split": "val"},
        {"ind": 5, "activity_label": "Baking cookies", "ctx": "A woman mixes flour.",
         "endings": [" e", " f", " g", " h"], "label": "0", "split": "val"},
    ]
    path = tmp_path / "hellaswag.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    hub.routes["Rowan/hellaswag"] = ("json", path, {})
    items = load_hellaswag(limit=1)
    assert len(items) == 1
    assert items[0].context == "Removing ice from car: Then, the man writes over the snow."
    assert items[0].label == 3 and items[0].endings == (" a", " b", " c", " d")
    assert hub.calls[0]["path"] == "Rowan/hellaswag" and hub.calls[0]["split"] == "validation"


def test_unreachable_hub_is_listed_among_the_places_tried(monkeypatch, no_local_data):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"HF datasets \(ConnectionError\)") as err:
        load_text("wikitext2")
    assert "evaluate.wikitext2_path" in str(err.value) and "QAT_DATA_DIR" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"HF datasets \(ConnectionError\)"):
        load_hellaswag()
