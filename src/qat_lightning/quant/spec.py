"""Validated quantization specs: `QuantSpec` for one tensor, `QuantConfig` for a whole model.

`QuantSpec` says how one tensor is fake-quantized (bits, granularity, symmetric or not, estimator,
STE mask, learnable scale). `QuantConfig` is what the Hydra `quant` group holds: the W/A/KV bit
widths plus per-module overrides, and it hands out the `QuantSpec` for each module by name.

Bit widths follow the paper's tables: 2..8 are quantized, any value >= 16 means "not quantized".

Granularities (all scales reduce over the last dim or groups of it):

==========  ===================================================  ==========================
name        one scale per                                        typical tensor
==========  ===================================================  ==========================
tensor      whole tensor                                         anything
channel     row of the last dim (output channel of a weight)     weight (out, in)
group       `group_size` consecutive elements of the last dim    weight (out, in)
token       row of the last dim (one token over the hidden dim)  activation (B, T, H)
head        `head_dim` consecutive elements of the last dim      K/V (B, T, n_kv * head_dim)
==========  ===================================================  ==========================

The "ggml" estimator is llama.cpp's block formats (`quant/ggml.py`): 4 bits is Q4_0, 8 bits is Q8_0, in
"group" granularity of 32 (one fp16 scale per block of 32 along the last dim). With it, weights, activations
and the KV cache are fake-quantized exactly as llama.cpp stores or re-quantizes them, and an override of
`w_bits` (e.g. 8 for lm_head) picks the tensor's type the way llama.cpp's file types do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Granularity = Literal["tensor", "channel", "group", "token", "head"]
GRANULARITIES = ("tensor", "channel", "group", "token", "head")
ESTIMATORS = ("minmax", "clip", "seq", "ggml")
GGML_BLOCK = 32  # llama.cpp's QK4_0 / QK8_0
GGML_BITS = {4: "q4_0", 8: "q8_0"}
DISABLED_BITS = 16  # any bit width >= 16 means "keep full precision"
_OVERRIDE_KEYS = {"pattern", "w_bits", "a_bits", "kv_bits", "skip", "lsq"}


def _check_bits(bits: Any, what: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"{what} must be an int (2..8 to quantize, >= 16 for full precision), got {bits!r}")
    if not (2 <= bits <= 8 or bits >= DISABLED_BITS):
        raise ValueError(f"{what}={bits} is not supported: use 2..8 to quantize or >= 16 for full precision")


@dataclass(frozen=True)
class QuantSpec:
    """How to fake-quantize one tensor.

    Args:
        bits: 2..8 quantize; >= 16 disables quantization (`enabled` is False).
        granularity: tensor | channel | group | token | head (see the module docstring).
        symmetric: symmetric MinMax around zero (the reference) or asymmetric with a zero point.
        group_size: group length along the last dim; required for "group".
        head_dim: head length along the last dim; required for "head".
        narrow_range: symmetric levels -(2^(b-1)-1)..2^(b-1)-1 (4-bit: -7..7, the reference). False adds
            the extra negative level -2^(b-1) (4-bit: -8..7) with the same scale max|x| / (2^(b-1)-1).
        estimator: "minmax" keeps outliers (range = max|x|); "clip" clips the range to the
            `clip_percentile` quantile of |x| per scale group (an ablation; outliers are saturated).
            "seq" is the reference's 2-bit weight quantizer (ParetoQ calls it SEQ): four levels
            {-1.5, -0.5, 0.5, 1.5}·s with s = mean|x| per scale group (the reference writes them
            {±0.25, ±0.75}·α with α = 2·mean|x|); there is no zero level. 2 bits, symmetric only.
            "ggml" is llama.cpp's Q4_0 (bits=4) or Q8_0 (bits=8): granularity "group" of 32, symmetric,
            fp16 scales, the exact rounding of ggml-quants.c (see `quant/ggml.py`).
        clip_percentile: quantile in (0, 1] used by the "clip" estimator.
        ste_mask: zero gradients where |x| >= ste_mask (the reference uses 2.0); None is a plain STE.
        learnable: LSQ learnable scale (weights only, symmetric, per channel; with "ggml" one per block of
            32, initialised from the format's own ``d``, which a GGUF stores whatever chose it).
        rope_head_dim: with "ggml", the blocks run over llama.cpp's order of each head's dims (heads of this
            size, their two RoPE halves interleaved: the converter's q/k row permutation). Keys only: it
            makes a block of 32 of an HF key the block llama.cpp stores in its cache.
        hadamard: with "ggml", rotate chunks of this size (a power of two) of the last dim by a Walsh-Hadamard
            matrix before the blocks and back after (in llama.cpp's order when `rope_head_dim` is set):
            llama.cpp's rotation of a quantized KV cache (see `quant/ggml.py`).
        scale_grad: with "ggml", the gradient also flows through the block scale ``d`` to the block's
            largest value (which sets it), not only straight through the rounding; forward unchanged.
    """

    bits: int
    granularity: str = "channel"
    symmetric: bool = True
    group_size: int | None = None
    head_dim: int | None = None
    narrow_range: bool = True
    estimator: str = "minmax"
    clip_percentile: float = 0.999
    ste_mask: float | None = None
    learnable: bool = False
    rope_head_dim: int | None = None
    hadamard: int | None = None
    scale_grad: bool = False

    def __post_init__(self) -> None:
        _check_bits(self.bits, "bits")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; expected one of {GRANULARITIES}")
        if self.granularity == "group" and (self.group_size is None or self.group_size < 1):
            raise ValueError(f"granularity 'group' needs a positive group_size, got {self.group_size!r}")
        if self.granularity == "head" and (self.head_dim is None or self.head_dim < 1):
            raise ValueError(f"granularity 'head' needs a positive head_dim, got {self.head_dim!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; expected one of {ESTIMATORS}")
        if not 0.0 < self.clip_percentile <= 1.0:
            raise ValueError(f"clip_percentile must be in (0, 1], got {self.clip_percentile}")
        if self.ste_mask is not None and not self.ste_mask > 0:
            raise ValueError(f"ste_mask must be positive or None, got {self.ste_mask}")
        if self.learnable and not self.symmetric:
            raise ValueError("learnable (LSQ) scales need symmetric=True")
        if self.learnable and self.estimator != "ggml" and self.granularity not in ("channel", "tensor"):
            raise ValueError(f"learnable (LSQ) scales need granularity 'channel' or 'tensor', got {self.granularity!r}")
        if self.estimator == "seq" and self.enabled and (self.bits != 2 or not self.symmetric):
            raise ValueError(
                f"estimator 'seq' is the 2-bit symmetric quantizer; got bits={self.bits}, symmetric={self.symmetric}"
            )
        if self.learnable and self.estimator not in ("minmax", "ggml"):
            raise ValueError(
                "learnable (LSQ) scales are initialised from MinMax (or llama.cpp's block scale); "
                "use estimator 'minmax' or 'ggml'"
            )
        if self.learnable and (self.rope_head_dim is not None or self.hadamard is not None):
            raise ValueError("learnable (LSQ) scales are for weights, not the KV cache's rope_head_dim/hadamard")
        if self.estimator == "ggml" and self.enabled:
            if self.bits not in GGML_BITS:
                raise ValueError(f"estimator 'ggml' is Q4_0 (bits=4) or Q8_0 (bits=8), not bits={self.bits}")
            if not self.symmetric or self.granularity != "group" or self.group_size != GGML_BLOCK:
                raise ValueError(
                    f"estimator 'ggml' needs symmetric=True, granularity='group' and group_size={GGML_BLOCK} "
                    f"(llama.cpp's blocks), got symmetric={self.symmetric}, granularity={self.granularity!r}, "
                    f"group_size={self.group_size}"
                )
        if self.rope_head_dim is not None:
            if self.estimator != "ggml":
                raise ValueError("rope_head_dim (llama.cpp's key order) needs estimator 'ggml'")
            if self.rope_head_dim < 2 or self.rope_head_dim % 2:
                raise ValueError(f"rope_head_dim must be a positive even head size, got {self.rope_head_dim}")
        if self.scale_grad and (self.estimator != "ggml" or self.learnable):
            raise ValueError("scale_grad (a gradient through llama.cpp's block scale) needs estimator 'ggml' "
                             "and a scale that is not learned (learnable=False)")
        if self.hadamard is not None:
            if self.estimator != "ggml":
                raise ValueError("hadamard (llama.cpp's KV rotation) needs estimator 'ggml'")
            if self.hadamard < 2 or self.hadamard & (self.hadamard - 1):
                raise ValueError(f"hadamard must be a power-of-two chunk size, got {self.hadamard}")

    @property
    def enabled(self) -> bool:
        return self.bits < DISABLED_BITS

    @property
    def ggml_type(self) -> str | None:
        """llama.cpp's type name ("q4_0" | "q8_0") of an enabled "ggml" spec, else None."""
        return GGML_BITS[self.bits] if self.estimator == "ggml" and self.enabled else None

    @property
    def no_rope_order(self) -> QuantSpec:
        """This spec on the tensor as given: `rope_head_dim` and `hadamard` dropped."""
        return replace(self, rope_head_dim=None, hadamard=None)

    @property
    def qmin(self) -> int:
        """Smallest integer level."""
        if self.ggml_type is not None:
            return -8 if self.bits == 4 else -127
        if not self.symmetric:
            return 0
        if self.estimator == "seq":  # codes -2..1 stand for levels code + 0.5
            return -(2 ** (self.bits - 1))
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        """Largest integer level."""
        if self.ggml_type is not None:
            return 7 if self.bits == 4 else 127
        return 2**self.bits - 1 if not self.symmetric else 2 ** (self.bits - 1) - 1


KV_PLACEMENTS = ("pre_rope", "post_rope")


def _opt_bool(value: bool | None, default: bool) -> bool:
    return default if value is None else value


@dataclass
class QuantConfig:
    """Model-wide quantization settings (the Hydra `quant` group).

    Only OmegaConf-friendly field types so the dataclass doubles as a structured-config schema.
    `overrides` is a list of dicts applied in order to modules whose name matches `pattern`
    (`re.search` on the full module name, e.g. ``model.layers.0.mlp.down_proj``); later ones win:
    ``{"pattern": "down_proj", "w_bits": 8}`` or ``{"pattern": r"layers\\.0\\.", "skip": True}``;
    ``{"pattern": "^lm_head$", "lsq": False}`` keeps a module's weight scale the quantizer's own under `lsq`.
    """

    w_bits: int = 4
    a_bits: int = 8
    kv_bits: int = 4
    w_granularity: str = "channel"
    w_group_size: int | None = None
    a_granularity: str = "token"
    a_group_size: int | None = None  # with a_granularity "group" (llama.cpp's Q8_0 activation blocks: 32)
    kv_granularity: str = "token"
    kv_group_size: int | None = None  # with kv_granularity "group": blocks along the head dim (llama.cpp: 32)
    # where the KV cache is quantized (quant/kv.py): "pre_rope" on the k_proj/v_proj outputs (the paper and
    # the reference), "post_rope" on the keys and values the attention reads (what inference engines store)
    kv_placement: str = "pre_rope"
    # with the "ggml" estimator: emulate llama.cpp's Walsh-Hadamard rotation of a quantized KV cache (on in
    # llama.cpp for head dims divisible by 64 unless LLAMA_ATTN_ROT_DISABLE=1; false to match that setting)
    kv_hadamard: bool = True
    # with the "ggml" estimator: let the KV cache's gradient flow through each block's scale to the value that
    # sets it (QuantSpec.scale_grad), so the student can learn keys and values that quantize well
    kv_scale_grad: bool = False
    symmetric: bool = True
    w_symmetric: bool | None = None
    a_symmetric: bool | None = None
    kv_symmetric: bool | None = None
    narrow_range: bool = True
    estimator: str = "minmax"
    w_estimator: str | None = None  # the weights' estimator; null: `estimator`. "seq" applies to 2-bit weights
    #                                 only (the reference's 2-bit quantizer); weights at other widths use `estimator`
    clip_percentile: float = 0.999
    ste_mask: float | None = None
    lsq: bool = False
    quantize_embeddings: bool = False
    quantize_lm_head: bool = False
    overrides: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "kv_bits"):
            _check_bits(getattr(self, name), name)
        if self.w_granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"w_granularity must be tensor, channel or group, got {self.w_granularity!r}")
        if self.a_granularity not in ("tensor", "token", "group"):
            raise ValueError(f"a_granularity must be tensor, token or group, got {self.a_granularity!r}")
        if self.kv_granularity not in ("tensor", "token", "head", "group"):
            raise ValueError(f"kv_granularity must be tensor, token, head or group, got {self.kv_granularity!r}")
        if self.kv_placement not in KV_PLACEMENTS:
            raise ValueError(f"kv_placement must be one of {', '.join(KV_PLACEMENTS)}, got {self.kv_placement!r}")
        if self.kv_scale_grad and self.estimator != "ggml":
            raise ValueError(f"kv_scale_grad needs estimator 'ggml' (llama.cpp's block scale), got {self.estimator!r}")
        if self.w_estimator is not None and self.w_estimator not in ESTIMATORS:
            raise ValueError(f"unknown w_estimator {self.w_estimator!r}; expected one of {ESTIMATORS} or null")
        if self.estimator == "seq":
            raise ValueError("estimator 'seq' is a 2-bit weight quantizer: set w_estimator=seq, not estimator")
        if self.w_estimator == "seq" and self.lsq:
            raise ValueError("w_estimator 'seq' has no learnable step here; use lsq=false")
        self.overrides = [self._check_override(i, o) for i, o in enumerate(self.overrides or [])]
        # Build one spec of each kind so every remaining bad combination fails now, not mid-model.
        self.weight_spec("")
        self.act_spec("")
        self.kv_spec("", head_dim=1)

    @staticmethod
    def _check_override(i: int, override: Any) -> dict:
        if not isinstance(override, Mapping):
            raise ValueError(f"overrides[{i}] must be a dict with a 'pattern', got {override!r}")
        override = dict(override)
        unknown = set(override) - _OVERRIDE_KEYS
        if unknown:
            raise ValueError(f"overrides[{i}] has unknown keys {sorted(unknown)}; allowed: {sorted(_OVERRIDE_KEYS)}")
        if not isinstance(override.get("pattern"), str):
            raise ValueError(f"overrides[{i}] needs a string 'pattern' (a regex on module names)")
        try:
            re.compile(override["pattern"])
        except re.error as e:
            raise ValueError(f"overrides[{i}] pattern {override['pattern']!r} is not a valid regex: {e}") from None
        for key in ("w_bits", "a_bits", "kv_bits"):
            if override.get(key) is not None:
                _check_bits(override[key], f"overrides[{i}].{key}")
        if override.get("lsq") is not None and not isinstance(override["lsq"], bool):
            raise ValueError(f"overrides[{i}].lsq must be true or false, got {override['lsq']!r}")
        return override

    def _resolve(self, name: str) -> dict:
        """Bits and skip flag for module `name` after applying matching overrides in order."""
        out = {"w_bits": self.w_bits, "a_bits": self.a_bits, "kv_bits": self.kv_bits, "skip": False, "lsq": self.lsq}
        for o in self.overrides:
            if re.search(o["pattern"], name):
                out.update({k: v for k, v in o.items() if k != "pattern" and v is not None})
        return out

    def is_skipped(self, name: str) -> bool:
        """True when an override with `skip: true` matches `name` (the module stays a plain Linear)."""
        return bool(self._resolve(name)["skip"])

    def weight_spec(self, name: str) -> QuantSpec:
        r = self._resolve(name)
        bits = DISABLED_BITS if r["skip"] else r["w_bits"]
        estimator = self.w_estimator or self.estimator
        if estimator == "seq" and bits != 2:
            estimator = self.estimator
        return QuantSpec(
            bits=bits,
            granularity=self.w_granularity,
            symmetric=_opt_bool(self.w_symmetric, self.symmetric),
            group_size=self.w_group_size,
            narrow_range=self.narrow_range,
            estimator=estimator,
            clip_percentile=self.clip_percentile,
            ste_mask=self.ste_mask,
            learnable=bool(r["lsq"]),
        )

    def act_spec(self, name: str) -> QuantSpec:
        r = self._resolve(name)
        return QuantSpec(
            bits=DISABLED_BITS if r["skip"] else r["a_bits"],
            granularity=self.a_granularity,
            symmetric=_opt_bool(self.a_symmetric, self.symmetric),
            group_size=self.a_group_size if self.a_granularity == "group" else None,
            narrow_range=self.narrow_range,
            estimator=self.estimator,
            clip_percentile=self.clip_percentile,
            ste_mask=self.ste_mask,
        )

    def kv_spec(self, name: str, head_dim: int | None = None) -> QuantSpec:
        """Spec of the keys (`name` ends in k_proj) or values of an attention block.

        With the "ggml" estimator, keys get `rope_head_dim` (their blocks are llama.cpp's) and both get
        llama.cpp's Hadamard rotation when `kv_hadamard` (see QuantSpec and `quant/ggml.py`).
        """
        from qat_lightning.quant.ggml import kv_rotation_size

        r = self._resolve(name)
        group = self.kv_granularity == "group"
        is_key = name.endswith("k_proj")
        ggml_kv = group and self.estimator == "ggml" and bool(head_dim)
        rot = kv_rotation_size(head_dim, "k" if is_key else "v") if ggml_kv and self.kv_hadamard else None
        return QuantSpec(
            bits=DISABLED_BITS if r["skip"] else r["kv_bits"],
            granularity=self.kv_granularity,
            symmetric=_opt_bool(self.kv_symmetric, self.symmetric),
            head_dim=head_dim if self.kv_granularity == "head" else None,
            group_size=self.kv_group_size if group else None,
            rope_head_dim=head_dim if ggml_kv and is_key else None,
            hadamard=rot,
            scale_grad=self.kv_scale_grad,
            narrow_range=self.narrow_range,
            estimator=self.estimator,
            clip_percentile=self.clip_percentile,
            ste_mask=self.ste_mask,
        )

    @property
    def ggml(self) -> bool:
        """True when the weights use llama.cpp's formats (a GGUF can hold the student's codes as they are)."""
        return (self.w_estimator or self.estimator) == "ggml"

    @property
    def setting(self) -> str:
        """Paper-style name, e.g. "W4A8KV4" (anything >= 16 shown as 16)."""
        b = [min(x, DISABLED_BITS) for x in (self.w_bits, self.a_bits, self.kv_bits)]
        return f"W{b[0]}A{b[1]}KV{b[2]}"
