"""The released configurations of the five ported backbones, as data.

`RELEASED[name]` is the `config.json` of a released checkpoint (as far as it could be read from
public copies, see `SOURCES` and the comments), so the whitelists in `ports.families` can be
checked against the real files and shapes / parameter counts can be computed with
`jax.eval_shape` (`ports.count_params(released_config(name))`) without downloading 15 GB.

Where a field of a release could not be read, it is left out and said so below: the parsers then
use their documented defaults, none of which changes a parameter shape.
"""

from __future__ import annotations

import copy
from typing import Any

from ports.config import TransformerConfig
from ports.families import parse_config

LLADA_8B_BASE = "LLaDA-8B-Base"
DREAM_7B_BASE = "Dream-v0-Base-7B"
MMADA_8B_BASE = "MMaDA-8B-Base"
DIFFULLAMA_7B = "DiffuLLaMA-7B"
LLADA_MOE_7B_A1B = "LLaDA-MoE-7B-A1B-Base"

# --- LLaDA-8B-Base (GSAI-ML/LLaDA-8B-Base) ------------------------------------------------------
# Read from the LLaDA-8B-Instruct config.json (verbatim copy in github yinj66/support_basis,
# `LLaDA-8B-Instruct-B&S-light/config.json`; the same lines show on the hub commit 6059b30 "add
# LLaDA-8B-Instruct"). Base and Instruct share the architecture (Instruct is an SFT of Base) and
# their config.json files have the same size on the hub (1.39 kB).
_LLADA_8B = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": 126464,
    "weight_tying": False,
}

# --- Dream-v0-Base-7B (Dream-org/Dream-v0-Base-7B) ----------------------------------------------
# The Dream-v0 config.json itself is not in the searchable copies. These are the fields of the
# released Dream-architecture configs that are (apple/DiffuCoder-7B-Instruct config.json at
# 69c039a, smoorsmith/Dream-coder-test config.json): the Qwen2.5-7B shape Dream was initialised
# from, DreamConfig's mask id 151666 and pad/eos 151643. `use_mrope` (written only by
# transformers >= 4.51 exports such as DiffuCoder) is left out; `max_position_embeddings` is the
# DiffuCoder / Qwen2.5-7B value and does not change any parameter shape. The hub model page of
# Dream-v0-Base-7B states "7.62B params", which `count_params` must reproduce.
_DREAM_7B = {
    "architectures": ["DreamModel"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_dream.DreamConfig",
        "AutoModel": "modeling_dream.DreamModel",
    },
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "mask_token_id": 151666,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "Dream",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "pad_token_id": 151643,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2",
    "use_cache": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}

# --- MMaDA-8B-Base (Gen-Verse/MMaDA-8B-Base) ----------------------------------------------------
# The fields from "activation_type" to "num_vq_tokens" (alphabetical, as saved) were read from the
# config.json of an MMaDA-8B derivative written by the same training code (hub
# tyfeld/MMaDA-Parallel-M, `_name_or_path` ".../MMaDA0000"); its vocabulary layout (126464 text ids
# + 8192 image codes = 134656 = embedding_size = new_vocab_size = vocab_size) is the one the
# fixture's PROVENANCE.md documents for the release. The fields after "num_vq_tokens" could not
# be read; they are LLaDA-8B's values (MMaDA is initialised from LLaDA-8B-Instruct and its config
# class requires every LLaDA field). MMaDA's training scripts also merge their `model.mmada` yaml
# section (e.g. `pretrained_model_path`, `w_clip_vit`) into the saved config; whether the release
# carries those keys could not be checked, so they are tested separately
# (`MMADA_TRAINING_FIELDS`), not listed here.
_MMADA_8B = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["MMadaModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "codebook_size": 8192,
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 134656,
    "eos_token_id": 126081,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "llm_vocab_size": 126464,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "mmada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "new_vocab_size": 134656,
    "num_new_special_tokens": 0,
    "num_vq_tokens": 256,
    # not read from the release (see above): LLaDA-8B values / the documented vocabulary layout
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "tie_word_embeddings": False,
    "use_cache": False,
    "vocab_size": 134656,
    "weight_tying": False,
}

# Keys MMaDA's training scripts merge into config.json from their yaml (`model.mmada`: seen in
# Gen-Verse/MMaDA configs/*.yaml and the `merged_config = {**base_config, **mmada_config_dict}`
# step) plus the extra keys MMadaConfig declares. The mmada whitelist must accept them.
MMADA_TRAINING_FIELDS = {
    "pretrained_model_path": "GSAI-ML/LLaDA-8B-Instruct",
    "tokenizer_path": "GSAI-ML/LLaDA-8B-Instruct",
    "llm_model_path": "GSAI-ML/LLaDA-8B-Instruct",
    "gradient_checkpointing": True,
    "w_clip_vit": False,
}

# --- DiffuLLaMA-7B (diffusionfamily/diffullama) --------------------------------------------------
# A stock LlamaForCausalLM in the Llama-2-7B shape. Read from hub myduy/test-diffusionlm-v2
# config.json, a save_pretrained of the model loaded from "diffusionfamily/diffullama"
# (`_name_or_path`), so every architecture field is the release's. No pad_token_id and no
# mask_token_id: DiffuLLaMA's mask is a tokenizer entry (see ports.families, default 811).
_DIFFULLAMA_7B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.44.2",
    "use_cache": True,
    "vocab_size": 32000,
}

# --- LLaDA-MoE-7B-A1B-Base (inclusionAI/LLaDA-MoE-7B-A1B-Base) ----------------------------------
# The release's config.json could not be read. Known: hub style `model_type: "llada"` with
# architectures ["LLaDAMoEModelLM"] (ZHZisZZ/dllm README, fixture PROVENANCE.md); 16 layers,
# hidden 2048, 16 heads (16 KV), 64 experts of width 1024, top-8, dense_intermediate_size 8192,
# moe_layer_freq all ones, router_aux_loss_coef 0.01, rope_theta 50000, 8192 positions, q/k
# RMSNorm, SiLU (a third-party summary of the config in a vLLM port's README; the model card and
# the LLaDA-MoE paper give 64 experts / top-8 / 7B total / 1.4B active).
# `vocab_size` 157184 is INFERRED, not read: LLaDA-MoE decodes with mask 156895 / eos 156892
# (inclusionAI dInfer), the ids of the Ling tokenizer whose other releases (LLaDA2.0, Ling) have
# vocab_size 157184; the 7.36 B parameters it implies match the 14.7 GB of bf16 shards on the hub.
# Left out because unknown (parser defaults in brackets, none changes a shape): mask_token_id
# [family default 156895], eos/pad ids, rms_norm_eps [1e-6], norm_topk_prob [False],
# partial_rotary_factor [1.0], routed_scaling_factor [1.0], moe_router_score_function [softmax].
_LLADA_MOE_7B = {
    "architectures": ["LLaDAMoEModelLM"],
    "model_type": "llada",
    "hidden_act": "silu",
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "expert_intermediate_size": 1024,
    "dense_intermediate_size": 8192,
    "moe_layer_freq": [1] * 16,
    "router_aux_loss_coef": 0.01,
    "rope_theta": 50000.0,
    "max_position_embeddings": 8192,
    "qk_layernorm": True,
    "tie_word_embeddings": False,
    "vocab_size": 157184,
}

RELEASED: dict[str, dict[str, Any]] = {
    LLADA_8B_BASE: _LLADA_8B,
    DREAM_7B_BASE: _DREAM_7B,
    MMADA_8B_BASE: _MMADA_8B,
    DIFFULLAMA_7B: _DIFFULLAMA_7B,
    LLADA_MOE_7B_A1B: _LLADA_MOE_7B,
}

# Family each release must be detected as.
FAMILY = {
    LLADA_8B_BASE: "llada",
    DREAM_7B_BASE: "dream",
    MMADA_8B_BASE: "mmada",
    DIFFULLAMA_7B: "diffullama",
    LLADA_MOE_7B_A1B: "llada_moe",
}

SOURCES = {
    LLADA_8B_BASE: "github yinj66/support_basis LLaDA-8B-Instruct-B&S-light/config.json "
                   "(copy of the GSAI-ML release); hub GSAI-ML/LLaDA-8B-Instruct commit 6059b30",
    DREAM_7B_BASE: "hub apple/DiffuCoder-7B-Instruct config.json @69c039a, smoorsmith/Dream-coder-test "
                   "config.json (Dream architecture, Qwen2.5-7B shape); Dream-org model page (7.62B)",
    MMADA_8B_BASE: "hub tyfeld/MMaDA-Parallel-M config.json (fields up to num_vq_tokens); "
                   "tests/fixtures/mmada/PROVENANCE.md (vocabulary layout); LLaDA-8B (the rest)",
    DIFFULLAMA_7B: "hub myduy/test-diffusionlm-v2 config.json (_name_or_path diffusionfamily/diffullama)",
    LLADA_MOE_7B_A1B: "third-party summary in a vLLM LLaDA-MoE port README; model card; inclusionAI "
                      "dInfer (mask/eos ids); vocab_size inferred, see comment",
}


def released_raw(name: str) -> dict[str, Any]:
    """A fresh copy of the released config.json dict (edit it freely)."""
    if name not in RELEASED:
        raise KeyError(f"no preset {name!r}; known: {', '.join(RELEASED)}")
    return copy.deepcopy(RELEASED[name])


def released_config(name: str) -> TransformerConfig:
    """The release parsed through the family whitelist, exactly as `load_pretrained` would."""
    return parse_config(released_raw(name))
