"""One place that knows a decoder family's structure: layers, heads, k/v projections, rotary, norms.

Quantization, calibration, the baselines, rotations, export and the KV cache all ask the adapter instead of
re-deriving `model.model.layers`, `num_key_value_heads` or `head_dim` each in its own way. Adding a model
family with the same block structure (pre-norm attention + gated MLP) is one entry in `FAMILIES`.

    embed_tokens -> [ input_layernorm -> self_attn(q,k,v -> RoPE -> attn -> o) (+)
                      post_attention_layernorm -> mlp(gate, up -> down) (+) ] x L -> norm -> lm_head
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["FAMILIES", "ModelAdapter", "adapter_for"]

# Families with the Llama block layout (names of every submodule as in their HF modeling files).
FAMILIES = ("llama", "mistral", "qwen2")

ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
KV_PROJECTIONS = ("k_proj", "v_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Each RMSNorm and the linears that read its output first (SmoothQuant, AWQ and rotations fold into these).
NORM_READERS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
# Linears writing into the residual stream.
RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


@dataclass(frozen=True)
class ModelAdapter:
    """Structure facts of one decoder config (read from the config alone: cheap, no weights needed)."""

    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool
    rope_theta: float = 10000.0  # RoPE base: pair j of a head turns by rope_theta ** (-2j / head_dim) a token

    @property
    def kv_width(self) -> int:
        """Elements per token of K (or V) in one layer: n_kv * head_dim (the k_proj / v_proj output)."""
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA; 1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def linear_in_features(self) -> dict[str, int]:
        """Input dim of every decoder linear, by leaf name (what group sizes must divide)."""
        h = self.hidden_size
        return {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": self.num_heads * self.head_dim,
                "gate_proj": h, "up_proj": h, "down_proj": self.intermediate_size}

    # -- modules of a loaded model ---------------------------------------------------------------
    @staticmethod
    def decoder(model: nn.Module) -> nn.Module:
        """The inner decoder (`model.model`), holding embeddings, layers, final norm and rotary."""
        inner = getattr(model, "model", None)
        if inner is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList):
            raise ValueError(f"expected a HF causal LM with decoder layers at model.model.layers, "
                             f"got {type(model).__name__}")
        return inner

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def named_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """("model.layers.i", block) for every decoder block."""
        for i, layer in enumerate(self.layers(model)):
            yield f"model.layers.{i}", layer

    @staticmethod
    def attention(layer: nn.Module) -> nn.Module:
        return layer.self_attn

    @staticmethod
    def mlp(layer: nn.Module) -> nn.Module:
        return layer.mlp

    @staticmethod
    def norms(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(input_layernorm, post_attention_layernorm) of a block."""
        return layer.input_layernorm, layer.post_attention_layernorm

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).norm

    def rotary(self, model: nn.Module) -> nn.Module:
        """The model's shared rotary embedding (its forward gives cos, sin for the positions)."""
        rotary = getattr(self.decoder(model), "rotary_emb", None)
        if rotary is None:
            raise ValueError(f"{type(model).__name__} has no shared rotary embedding at model.model.rotary_emb")
        return rotary

    @staticmethod
    def embed(model: nn.Module) -> nn.Module:
        return model.get_input_embeddings()

    @staticmethod
    def lm_head(model: nn.Module) -> nn.Module:
        return model.get_output_embeddings()

    def decoder_linears(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """("model.layers.i.self_attn.q_proj", linear) for every linear of every block, in module order."""
        for prefix, layer in self.named_layers(model):
            for name, module in layer.named_modules():
                if isinstance(module, nn.Linear):
                    yield f"{prefix}.{name}", module


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def adapter_for(model_or_config: Any) -> ModelAdapter:
    """The adapter of a HF model or config; a clear error for families without the Llama block layout."""
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(model_or_config, nn.Module) and config is model_or_config:
        raise ValueError(f"expected a HF causal LM with decoder layers at model.model.layers, "
                         f"got {type(model_or_config).__name__}")
    config = _text_config(config)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"model type {family!r} is not supported; supported families: {', '.join(FAMILIES)}")
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv} KV heads")
    return ModelAdapter(
        family=family,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(getattr(config, "attention_bias", False)),
        rope_theta=_rope_theta(config),
    )


def _rope_theta(config: Any) -> float:
    """transformers 5 keeps the RoPE base in `rope_parameters`, earlier versions in `rope_theta`."""
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
