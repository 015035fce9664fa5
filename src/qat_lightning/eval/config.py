"""`EvalConfig`: what the `evaluate` stage scores and how (the Hydra `evaluate` group)."""

from __future__ import annotations

from dataclasses import dataclass, field

# zero-shot tasks (eval/zeroshot.py, lm-eval's task definitions over the local releases); "zeroshot" = all eight
ZEROSHOT_TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TASKS = ("wikitext2", "c4", "kl", *ZEROSHOT_TASKS, "zeroshot")
# Methods that are not post-training methods (those come from `baselines.available_methods()`): "qat", the
# trained student; "export", the exported integer model reloaded from disk (export.out_dir or <run dir>/export);
# "gguf", the exported GGUF (export.format=gguf) scored by llama.cpp itself, with the KV cache type it trained for
TRAINED_METHODS = ("qat", "export", "gguf")
# The in-engine rows a deployed student is compared with, scored by llama.cpp with the run's KV cache type:
# "gguf_f16", the teacher as an F16 GGUF; "gguf_ptq", llama.cpp's own post-training quantization of that file
# (llama-quantize) to the run's weight type (Q4_0 for <= 4-bit weights, Q8_0 for 8-bit), what a user gets free
ENGINE_BASELINES = ("gguf_f16", "gguf_ptq")
ENGINE_METHODS = ("gguf", *ENGINE_BASELINES)


@dataclass
class EvalConfig:
    """Methods × tasks. Perplexity follows the GPTQ convention (non-overlapping `seq_len` windows)."""

    methods: list[str] = field(default_factory=lambda: ["fp", "rtn", "qat"])
    tasks: list[str] = field(default_factory=lambda: ["kl", "wikitext2"])
    seq_len: int = 512  # the LLaMA papers use 2048; SmolLM2 on 2 CPU cores uses 512 (stated with the number)
    max_windows: int | None = 16
    batch_size: int = 1
    hellaswag_limit: int | None = 200  # HellaSwag items when evaluate.zeroshot_limit is null
    kl_batches: int = 8
    wikitext2_path: str | None = None
    hellaswag_path: str | None = None
    c4_path: str | None = None  # a c4 validation shard (.json.gz) or a text file; null: $QAT_DATA_DIR, then datasets
    text_path: str | None = None  # an extra text file scored like WikiText-2 (task "text")
    # zero-shot tasks: the first N items of each task in file order (null: the full splits, comparable with
    # published numbers); rows (continuations) per forward; the folder of the releases (null: $QAT_DATA_DIR)
    zeroshot_limit: int | None = None
    zeroshot_batch_size: int = 32
    zeroshot_data_dir: str | None = None
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
        # method names are checked against the method registry by `config.validate_config`
        if self.kl_data not in ("own", "hybrid"):
            raise ValueError(f"evaluate.kl_data must be own or hybrid; got {self.kl_data!r}")
        if self.seq_len < 2:
            raise ValueError(f"evaluate.seq_len must be >= 2, got {self.seq_len}")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"evaluate.max_windows must be >= 1 or null, got {self.max_windows}")
        if self.batch_size < 1 or self.kl_batches < 1 or self.zeroshot_batch_size < 1:
            raise ValueError("evaluate.batch_size, evaluate.kl_batches and evaluate.zeroshot_batch_size must be >= 1")
        for name in ("hellaswag_limit", "zeroshot_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"evaluate.{name} must be >= 1 or null, got {getattr(self, name)}")
        if "text" in self.tasks and not self.text_path:
            raise ValueError("evaluate task 'text' needs evaluate.text_path")
