"""`EvalConfig`: what the `evaluate` stage scores and how (the Hydra `evaluate` group)."""

from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("wikitext2", "c4", "hellaswag", "kl")
# "export": the exported integer model reloaded from disk (export.out_dir or <run dir>/export)
METHODS = ("fp", "rtn", "smoothquant", "gptq", "awq", "kvsmooth", "qat", "export")


@dataclass
class EvalConfig:
    """Methods × tasks. Perplexity follows the GPTQ convention (non-overlapping `seq_len` windows)."""

    methods: list[str] = field(default_factory=lambda: ["fp", "rtn", "qat"])
    tasks: list[str] = field(default_factory=lambda: ["wikitext2", "kl"])
    seq_len: int = 2048
    max_windows: int | None = None
    batch_size: int = 1
    hellaswag_limit: int | None = None
    kl_batches: int = 8
    wikitext2_path: str | None = None
    hellaswag_path: str | None = None
    c4_path: str | None = None  # a c4 validation shard (.json.gz) or a text file; null: $QAT_DATA_DIR, then datasets
    text_path: str | None = None  # an extra text file scored like WikiText-2 (task "text")
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: int | None = None
    lm_eval_include_path: str | None = None  # a folder of extra lm-eval task YAMLs (e.g. over local files)
    # held-out blocks for KL: "own" (this run's training data) or "hybrid" (the paper's generated corpus of
    # the same size, fixed across data-source/k ablations so their KL compares)
    kl_data: str = "own"
    cache: bool = False  # reuse fp/rtn/smoothquant/gptq/awq scores across runs (<paths.data_dir>/eval_cache)

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in (*TASKS, "text")]
        if bad:
            raise ValueError(f"unknown evaluate task(s) {bad}; valid: {', '.join(TASKS)}, text")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown evaluate method(s) {bad}; valid: {', '.join(METHODS)}")
        if self.kl_data not in ("own", "hybrid"):
            raise ValueError(f"evaluate.kl_data must be own or hybrid; got {self.kl_data!r}")
        if self.seq_len < 2:
            raise ValueError(f"evaluate.seq_len must be >= 2, got {self.seq_len}")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"evaluate.max_windows must be >= 1 or null, got {self.max_windows}")
        if self.batch_size < 1 or self.kl_batches < 1:
            raise ValueError("evaluate.batch_size and evaluate.kl_batches must be >= 1")
        if "text" in self.tasks and not self.text_path:
            raise ValueError("evaluate task 'text' needs evaluate.text_path")
