"""The one architecture description every backbone is mapped onto.

Each family module in `ports.families` turns a Hugging Face `config.json` into a
`TransformerConfig` through a whitelist; nothing downstream ever reads the raw JSON.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ports.errors import ConfigError

# How a [B, T] attention mask (1 = token, 0 = padding) enters attention.
#   'key':                 padded keys get -inf-like bias; every query row still attends
#                          (LLaDA's official batched generate, LLaDA-MoE's dllm copy).
#   'query_key_uniform':   mask = m[q] & m[k] added as finfo.min; fully padded query rows then
#                          attend uniformly to every key (MMaDA's mmu_generate).
#   'query_key_zero':      mask = m[q] & m[k] as a boolean SDPA mask; fully padded query rows
#                          produce a zero attention output (Dream, torch >= 2.5 on CPU).
PaddingConvention = Literal["key", "query_key_uniform", "query_key_zero"]

# How token positions for RoPE are chosen when a mask is given.
#   'absolute':        0..T-1 whatever the padding (LLaDA, MMaDA, LLaDA-MoE, DiffuLLaMA).
#   'left_pad_shift':  cumsum(mask) - 1, padded positions set to 1 (Dream's sampler).
PositionConvention = Literal["absolute", "left_pad_shift"]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Everything the Flax transformer needs; hashable, so it can be a static jit argument.

    Shapes used in this package: B batch, T tokens, D `d_model`, N `n_heads`,
    K `n_kv_heads`, H `head_dim`, F `mlp_hidden`, E `num_experts`, V `vocab_size`, L `n_layers`.
    """

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int
    rope_theta: float
    norm_eps: float
    max_seq_len: int
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    normalize_top_k: bool = False
    routed_scaling: float = 1.0
    tie_embeddings: bool = False
    scale_logits: bool = False
    logit_shift: int = 0
    padding: PaddingConvention = "key"
    position_ids: PositionConvention = "absolute"
    text_vocab_size: int | None = None

    def __post_init__(self):
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "mlp_hidden", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ConfigError("rope_theta and the norm epsilon must be positive")
        if self.num_experts < 0 or (self.num_experts and not
                                     1 <= self.experts_per_token <= self.num_experts):
            raise ConfigError(
                f"experts_per_token ({self.experts_per_token}) must lie in 1..num_experts "
                f"({self.num_experts})")
        if self.logit_shift not in (0, 1):
            raise ConfigError(f"logit_shift must be 0 or 1, got {self.logit_shift}")
        if self.padding not in ("key", "query_key_uniform", "query_key_zero"):
            raise ConfigError(f"unknown padding convention {self.padding!r}")
        if self.position_ids not in ("absolute", "left_pad_shift"):
            raise ConfigError(f"unknown position-id convention {self.position_ids!r}")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(
                f"mask_token_id {self.mask_token_id} lies outside the vocabulary of {self.vocab_size}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def queries_per_kv_head(self) -> int:
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)
