"""Schemas of the `generation` and `data` Hydra groups, checked when they are built.

Plain dataclasses with OmegaConf-compatible field types, so Hydra can use them as structured configs.
Every bad value raises one `ValueError` sentence in `__post_init__`, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STRATEGIES = ("hybrid", "top1", "sample")
START_MODES = ("random", "exhaustive")
SOURCES = ("generated", "text", "mixed")

# Settings that decide which sequences a corpus holds. `num_sequences` is left out on purpose: a corpus may
# grow (the first shards stay valid), and `out_dir` is where it lives, not what it is.
CORPUS_KEYS = (
    "strategy",
    "k_choices",
    "max_length",
    "batch_size",
    "temperature",
    "top_k",
    "top_p",
    "start_mode",
    "seed",
    "shard_size",
    "stop_at_eos",
)


@dataclass
class GenerationConfig:
    """How the teacher writes its own training corpus (LLM-QAT, Liu et al. 2023, section 2.1).

    The first token is drawn uniformly from the non-special vocabulary (`random`) or walks it in order
    (`exhaustive`, the reference's way: one sequence per start id per k). `hybrid` then takes the teacher's
    top-1 for the next k tokens (k drawn per sequence from `k_choices`) and samples the rest from its
    softmax; `top1` and `sample` are the paper's ablations. `max_length` counts the first token.
    `batch_size` and `shard_size` are part of the corpus identity: the sampling stream is seeded per
    (seed, shard, batch), so changing them changes the sequences.
    """

    strategy: str = "hybrid"
    k_choices: list[int] = field(default_factory=lambda: [3, 4, 5])
    num_sequences: int = 256
    max_length: int = 128
    batch_size: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    start_mode: str = "random"
    seed: int = 0
    shard_size: int = 64  # sequences per shard file (the unit of resume and of splitting across ranks)
    out_dir: str | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"generation.strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        if self.start_mode not in START_MODES:
            raise ValueError(f"generation.start_mode must be one of {', '.join(START_MODES)}; got {self.start_mode!r}")
        if self.max_length < 2:
            raise ValueError(f"generation.max_length must be >= 2 (first token + one more); got {self.max_length}")
        ks = list(self.k_choices)
        if not ks:
            raise ValueError("generation.k_choices must hold at least one k")
        bad = [k for k in ks if not isinstance(k, int) or k < 0 or k >= self.max_length]
        if bad:
            raise ValueError(
                f"generation.k_choices must be integers with 0 <= k < max_length={self.max_length}; got {bad}"
            )
        if self.num_sequences < 1:
            raise ValueError(f"generation.num_sequences must be >= 1; got {self.num_sequences}")
        if self.batch_size < 1:
            raise ValueError(f"generation.batch_size must be >= 1; got {self.batch_size}")
        if self.shard_size < 1:
            raise ValueError(f"generation.shard_size must be >= 1; got {self.shard_size}")
        if not self.temperature > 0:
            raise ValueError(f"generation.temperature must be > 0; got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"generation.top_k must be >= 0 (0 = off); got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p must be in (0, 1] (1 = off); got {self.top_p}")

    def corpus_settings(self) -> dict:
        """The settings that decide which sequences a corpus holds (hashed into its meta.json)."""
        out = {key: getattr(self, key) for key in CORPUS_KEYS}
        out["k_choices"] = [int(k) for k in out["k_choices"]]
        return out


@dataclass
class DataConfig:
    """What the student trains on and how it is cut into blocks.

    `cross_doc_boundaries=True` packs documents end to end with EOS separators (no padding, every token
    trains); False gives each document its own block(s), padded with attention_mask 0. `mix_ratio` is
    the fraction of real-text tokens in `mixed` mode (the paper's generated-vs-real ablation).

    Two seeds, because they answer different questions: `seed` picks the held-out documents (part of what
    the data *is*, so KL on it stays comparable across training seeds), `shuffle_seed` the training order
    (part of the run's randomness: conf sets it to the run's `${seed}`, and `RunConfig` fills a None with
    its `seed` the same way); a DataConfig used on its own with None orders by `seed`.
    """

    source: str = "generated"
    block_size: int = 128
    batch_size: int = 4
    val_fraction: float = 0.05
    cross_doc_boundaries: bool = True
    text_path: str | None = None
    hf_dataset: str | None = None  # "name[:config[:split]]", e.g. "wikitext:wikitext-2-raw-v1:train"
    # local files (a path or glob) for a builder packaged with `datasets`: hf_dataset text | json | csv | parquet
    hf_data_files: str | None = None
    mix_ratio: float = 0.5
    max_text_tokens: int | None = None
    text_offset_tokens: int = 0  # skip the leading documents holding this many tokens (e.g. evaluated windows)
    num_workers: int = 0
    seed: int = 0
    shuffle_seed: int | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {', '.join(SOURCES)}; got {self.source!r}")
        if self.block_size < 2:
            raise ValueError(f"data.block_size must be >= 2; got {self.block_size}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1; got {self.batch_size}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1); got {self.val_fraction}")
        if not 0 <= self.mix_ratio <= 1:
            raise ValueError(f"data.mix_ratio must be in [0, 1]; got {self.mix_ratio}")
        if self.max_text_tokens is not None and self.max_text_tokens < 1:
            raise ValueError(f"data.max_text_tokens must be >= 1 or null; got {self.max_text_tokens}")
        if self.text_offset_tokens < 0:
            raise ValueError(f"data.text_offset_tokens must be >= 0; got {self.text_offset_tokens}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0; got {self.num_workers}")
        if self.hf_dataset is not None:
            parts = self.hf_dataset.split(":")
            if len(parts) > 3 or not all(parts):
                raise ValueError(
                    f"data.hf_dataset must look like 'name[:config[:split]]'; got {self.hf_dataset!r}"
                )
        if self.hf_data_files is not None and self.hf_dataset is None:
            raise ValueError(
                "data.hf_data_files needs data.hf_dataset to name the builder that reads them, e.g. text or json"
            )
        if self.source in ("text", "mixed") and not (self.text_path or self.hf_dataset):
            raise ValueError(f"data.source={self.source!r} needs data.text_path or data.hf_dataset")
