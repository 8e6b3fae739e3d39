"""Families with Llama/Qwen key names (`model.layers.{i}.self_attn.q_proj.weight`, ...):

- Dream (`DreamModel`, Qwen2-based): GQA, q/k/v biases, logits shifted by one, Dream's padding.
- DiffuLLaMA (a stock `LlamaForCausalLM` run with a full bidirectional mask): logits shifted.
- LLaDA-MoE (`LLaDAMoEModelLM`, OLMoE-derived): per-head q/k RMSNorm, softmax top-k experts.
"""

from __future__ import annotations

from typing import Any, Mapping

from ports.config import TransformerConfig
from ports.families import base
from ports.families.base import ConfigError, KeyRule


def _parse_attention(r: base.ConfigReader) -> dict:
    r.require("hidden_act", ("silu",))
    r.require("rope_scaling", (None,), None)
    d_model = r.integer("hidden_size")
    n_heads = r.integer("num_attention_heads")
    n_kv_heads = r.integer("num_key_value_heads", None) or n_heads
    if n_heads < 1 or d_model % n_heads:
        raise ConfigError(f"hidden_size ({d_model}) must be divisible by num_attention_heads ({n_heads})")
    head_dim = r.integer("head_dim", None) or d_model // n_heads
    return dict(
        vocab_size=r.integer("vocab_size"), d_model=d_model,
        n_layers=r.integer("num_hidden_layers"), n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, rope_theta=r.number("rope_theta", 10000.0),
        norm_eps=r.number("rms_norm_eps", 1e-6), max_seq_len=r.integer("max_position_embeddings"),
        pad_token_id=base.token_id(r.get("pad_token_id", None)),
        eos_token_id=base.token_id(r.get("eos_token_id", None)),
        tie_embeddings=bool(r.require("tie_word_embeddings", (False, True), False)),
    )


def parse_dream(raw: Mapping[str, Any]) -> TransformerConfig:
    r = base.ConfigReader(raw, "dream")
    fields = _parse_attention(r)
    r.require("use_sliding_window", (False,), False)
    # Later Dream-architecture exports (apple/DiffuCoder-7B) write use_mrope=false; multimodal
    # RoPE is not implemented here.
    r.require("use_mrope", (False,), False)
    r.ignore("sliding_window")
    fields["mlp_hidden"] = r.integer("intermediate_size")
    fields["mask_token_id"] = r.integer("mask_token_id", None)
    r.finish()
    return TransformerConfig(family="dream", qkv_bias=True, logit_shift=1,
                             padding="query_key_zero", position_ids="left_pad_shift", **fields)


def parse_diffullama(raw: Mapping[str, Any]) -> TransformerConfig:
    r = base.ConfigReader(raw, "diffullama")
    fields = _parse_attention(r)
    r.require("attention_bias", (False,), False)
    r.require("mlp_bias", (False,), False)
    fields["mlp_hidden"] = r.integer("intermediate_size")
    # DiffuLLaMA's mask token lives in its tokenizer, not in config.json; load_pretrained resolves it.
    fields["mask_token_id"] = r.integer("mask_token_id", None)
    r.finish()
    return TransformerConfig(family="diffullama", logit_shift=1, padding="key", **fields)


def parse_llada_moe(raw: Mapping[str, Any]) -> TransformerConfig:
    r = base.ConfigReader(raw, "llada_moe")
    fields = _parse_attention(r)
    r.require("attention_bias", (False,), False)
    r.require("clip_qkv", (None,), None)
    r.require("moe_router_score_function", ("softmax",), "softmax")
    r.require("moe_router_enable_expert_bias", (False, None), False)
    r.require("partial_rotary_factor", (1.0, 1), 1.0)
    r.require("shared_expert_intermediate_size", (None, 0), None)
    r.require("router_num_group", (None,), None)
    r.require("router_topk_group", (None,), None)
    n_layers = fields["n_layers"]
    freq = r.get("moe_layer_freq", 1)
    if not (freq == 1 or (isinstance(freq, list) and len(freq) == n_layers and all(f == 1 for f in freq))):
        raise ConfigError(f"unsupported llada_moe config: moe_layer_freq={freq!r} (this port scans "
                          "identical layers, so every layer must be a mixture-of-experts layer)")
    r.ignore("dense_intermediate_size")  # only used by dense layers, which a freq of all ones excludes
    fields.update(
        mlp_hidden=r.integer("expert_intermediate_size"),
        num_experts=r.integer("num_experts"), experts_per_token=r.integer("num_experts_per_tok"),
        normalize_top_k=bool(r.require("norm_topk_prob", (False, True), False)),
        routed_scaling=r.number("routed_scaling_factor", 1.0),
        qk_norm=bool(r.require("qk_layernorm", (False, True), False)),
        mask_token_id=r.integer("mask_token_id", None),
    )
    r.finish()
    return TransformerConfig(family="llada_moe", padding="key", **fields)


def key_table(c: TransformerConfig) -> list[KeyRule]:
    b = "model.layers.{layer}."
    rules = [
        KeyRule(("embed", "embedding"), "model.embed_tokens.weight", base.identity),
        KeyRule(("blocks", "attn_norm", "scale"), b + "input_layernorm.weight", base.identity),
        KeyRule(("blocks", "attn", "q_proj", "kernel"), b + "self_attn.q_proj.weight", base.split_heads_in("n_heads")),
        KeyRule(("blocks", "attn", "k_proj", "kernel"), b + "self_attn.k_proj.weight", base.split_heads_in("n_kv_heads")),
        KeyRule(("blocks", "attn", "v_proj", "kernel"), b + "self_attn.v_proj.weight", base.split_heads_in("n_kv_heads")),
        KeyRule(("blocks", "attn", "o_proj", "kernel"), b + "self_attn.o_proj.weight", base.split_heads_out),
        KeyRule(("blocks", "mlp_norm", "scale"), b + "post_attention_layernorm.weight", base.identity),
        KeyRule(("final_norm", "scale"), "model.norm.weight", base.identity),
    ]
    if c.qkv_bias:
        rules += [
            KeyRule(("blocks", "attn", "q_proj", "bias"), b + "self_attn.q_proj.bias", base.split_heads_bias("n_heads")),
            KeyRule(("blocks", "attn", "k_proj", "bias"), b + "self_attn.k_proj.bias", base.split_heads_bias("n_kv_heads")),
            KeyRule(("blocks", "attn", "v_proj", "bias"), b + "self_attn.v_proj.bias", base.split_heads_bias("n_kv_heads")),
        ]
    if c.qk_norm:
        rules += [
            KeyRule(("blocks", "attn", "q_norm", "scale"), b + "self_attn.q_norm.weight", base.identity),
            KeyRule(("blocks", "attn", "k_norm", "scale"), b + "self_attn.k_norm.weight", base.identity),
        ]
    if c.is_moe:
        e = b + "mlp.experts.{expert}."
        rules += [
            KeyRule(("blocks", "mlp", "router", "kernel"), b + "mlp.gate.weight", base.transpose),
            KeyRule(("blocks", "mlp", "gate_proj"), e + "gate_proj.weight", base.transpose),
            KeyRule(("blocks", "mlp", "up_proj"), e + "up_proj.weight", base.transpose),
            KeyRule(("blocks", "mlp", "down_proj"), e + "down_proj.weight", base.transpose),
        ]
    else:
        rules += [
            KeyRule(("blocks", "mlp", "gate_proj", "kernel"), b + "mlp.gate_proj.weight", base.transpose),
            KeyRule(("blocks", "mlp", "up_proj", "kernel"), b + "mlp.up_proj.weight", base.transpose),
            KeyRule(("blocks", "mlp", "down_proj", "kernel"), b + "mlp.down_proj.weight", base.transpose),
        ]
    if not c.tie_embeddings:
        rules.append(KeyRule(("lm_head", "kernel"), "lm_head.weight", base.transpose))
    return rules
