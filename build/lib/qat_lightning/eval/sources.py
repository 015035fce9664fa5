"""Find evaluation data offline first: a configured path, then `$QAT_DATA_DIR`, then HF `datasets`.

Evaluation must run with no network (CI, air-gapped clusters), so local files always win; the `datasets`
fallback is a convenience for online machines. When nothing works the error lists every place tried.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("qat_lightning")

ENV_VAR = "QAT_DATA_DIR"
# where each source lives inside $QAT_DATA_DIR (the layout of ../shared/data)
LAYOUT = {
    "wikitext2": "wikitext2/wiki.test.raw",
    "hellaswag": "hellaswag/hellaswag_val_full.txt.bz2",
    "c4": "c4/c4-validation.00000-of-00008.json.gz",
}
# the config key that names each source's file, for the error message
CONFIG_KEY = {"wikitext2": "evaluate.wikitext2_path", "hellaswag": "evaluate.hellaswag_path", "c4": "evaluate.c4_path"}
C4_MAX_DOCS = 1100  # the GPTQ convention scores the first documents of the validation shard


def resolve_path(name: str, path: str | os.PathLike | None = None) -> Path | None:
    """The local file for source `name`: `path` if given (must exist), else `$QAT_DATA_DIR/<layout>`, else None.

    Raises:
        ValueError: unknown source name.
        FileNotFoundError: `path` was given but does not exist (a typo should not silently fall back).
    """
    if name not in LAYOUT:
        raise ValueError(f"unknown evaluation source {name!r}; expected one of {', '.join(LAYOUT)}")
    if path is not None:
        configured = Path(path).expanduser()
        if not configured.is_file():
            raise FileNotFoundError(f"{CONFIG_KEY[name]}={str(path)!r} does not exist: fix the path or set it to null")
        return configured
    root = os.environ.get(ENV_VAR)
    if root:
        candidate = Path(root).expanduser() / LAYOUT[name]
        if candidate.is_file():
            return candidate
    return None


def _read_text_file(path: Path) -> str:
    """Plain text as Python reads it (universal newlines), or the `text` fields of a JSON-lines file."""
    opener = gzip.open if path.suffix == ".gz" else bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        if ".json" in path.suffixes:
            docs = [json.loads(line)["text"] for line, _ in zip(f, range(C4_MAX_DOCS))]
            return "\n\n".join(docs)
        return f.read()


def _datasets_text(name: str) -> str:
    """The text from the HF hub (needs the optional `datasets` package and a network or an HF cache)."""
    import datasets

    if name == "wikitext2":
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return "\n\n".join(rows["text"])  # the GPTQ join; equals the raw file's text (see the data README)
    rows = datasets.load_dataset(
        "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
    )
    return "\n\n".join(rows["text"][:C4_MAX_DOCS])


def _datasets_hellaswag() -> list[tuple[str, int, list[str]]]:
    import datasets

    rows = datasets.load_dataset("Rowan/hellaswag", split="validation")
    return [(f"{r['activity_label']}: {r['ctx']}", int(r["label"]), list(r["endings"])) for r in rows]


def _not_found(name: str, tried: list[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"no {name} data found (tried: {'; '.join(tried)}): set {CONFIG_KEY[name]} to a file or "
        f"{ENV_VAR} to a folder holding {LAYOUT[name]}"
    )


def _tried(name: str) -> list[str]:
    root = os.environ.get(ENV_VAR)
    env = f"{Path(root) / LAYOUT[name]} (missing)" if root else f"${ENV_VAR} (unset)"
    return [f"{CONFIG_KEY[name]} (not set)", env]


def load_text(name: str, path: str | os.PathLike | None = None) -> str:
    """The raw text of `wikitext2` or `c4`, from the first place that has it."""
    if name not in ("wikitext2", "c4"):
        raise ValueError(f"load_text reads wikitext2 or c4, not {name!r}")
    found = resolve_path(name, path)
    if found is not None:
        return _read_text_file(found)
    tried = _tried(name)
    try:
        return _datasets_text(name)
    except ImportError:
        tried.append("HF datasets (not installed: pip install 'qat-lightning[eval]')")
    except Exception as err:  # offline, hub error, missing cache: all mean "not available here"
        tried.append(f"HF datasets ({type(err).__name__})")
    raise _not_found(name, tried)


def hellaswag_source(path: str | os.PathLike | None = None) -> Path | list[tuple[str, int, list[str]]]:
    """The local HellaSwag file, or rows (context, label, endings) from HF `datasets`."""
    found = resolve_path("hellaswag", path)
    if found is not None:
        return found
    tried = _tried("hellaswag")
    try:
        return _datasets_hellaswag()
    except ImportError:
        tried.append("HF datasets (not installed: pip install 'qat-lightning[eval]')")
    except Exception as err:
        tried.append(f"HF datasets ({type(err).__name__})")
    raise _not_found("hellaswag", tried)


def require_sources(tasks: list[str], paths: dict[str, str | None]) -> None:
    """Fail before any training when an evaluation task's data is nowhere to be found.

    Why: the evaluate stage runs last; a missing WikiText-2 file found only then wastes the whole training run.
    A local file (configured path or `$QAT_DATA_DIR`) is checked by existence; otherwise the HF `datasets`
    load is tried now (it is cached, so evaluate reuses it).

    Args:
        tasks: evaluate.tasks; only wikitext2, c4 and hellaswag read data.
        paths: the configured file per source (evaluate.<name>_path), None when unset.
    Raises:
        FileNotFoundError: one line naming what was tried and how to fix it.
    """
    for name in ("wikitext2", "c4", "hellaswag"):
        if name not in tasks or resolve_path(name, paths.get(name)) is not None:
            continue
        if name == "hellaswag":
            hellaswag_source(paths.get(name))
        else:
            load_text(name, paths.get(name))


def check_eval_data(ev: Any) -> None:
    """Fail before any model loads when a task of `ev` (an `EvalConfig`) finds no data: one line per task.

    Covers the text corpora and HellaSwag (as `require_sources`) and the zero-shot releases (each task's
    files in `evaluate.zeroshot_data_dir` or `$QAT_DATA_DIR`).

    Raises:
        FileNotFoundError: every missing source, one line each, naming the task and where it looked.
    """
    from qat_lightning.eval.zeroshot import check_zeroshot_data

    errors = []
    for name in ("wikitext2", "c4"):
        try:
            require_sources([name] if name in ev.tasks else [], {name: getattr(ev, f"{name}_path")})
        except FileNotFoundError as err:
            errors.append(str(err))
    try:
        check_zeroshot_data(ev.tasks, ev.zeroshot_data_dir, ev.hellaswag_path)
    except FileNotFoundError as err:
        errors.append(str(err))
    if errors:
        raise FileNotFoundError("\n".join(errors))
