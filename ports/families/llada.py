"""LLaDA (LLaDA-8B-Base/-Instruct, `LLaDAModelLM`) and MMaDA (`MMadaModelLM`, same text path).

Both use LLaDA's OLMo-derived `ModelConfig` field names and `model.transformer.*` keys.
MMaDA's config lists every LLaDA field explicitly (its config class merges no defaults) plus the
multimodal vocabulary layout; its padding convention differs (see `ports.config`).
"""

from __future__ import annotations

from typing import Any, Mapping

from ports.config import TransformerConfig
from ports.families import base
from ports.families.base import KeyRule

_PREFIX = "model.transformer."


def _parse_common(r: base.ConfigReader) -> dict:
    r.require("block_type", ("llama",))
    r.require("activation_type", ("silu", "swiglu"))
    r.require("layer_norm_type", ("rms",))
    r.require("layer_norm_with_affine", (True,))
    r.require("bias_for_layer_norm", (False, None), None)
    r.require("include_bias", (False,))
    r.require("alibi", (False,), False)
    r.require("attention_layer_norm", (False,), False)
    r.require("input_emb_norm", (False,), False)
    r.require("rope", (True,))
    r.require("rope_full_precision", (True,), True)
    r.require("block_group_size", (1,), 1)
    r.require("multi_query_attention", (None, False), None)
    r.ignore("alibi_bias_max", "attention_layer_norm_with_affine", "embedding_dropout",
             "residual_dropout", "flash_attention", "init_cutoff_factor", "init_device", "init_fn",
             "init_std", "precision", "mlp_ratio")
    d_model = r.integer("d_model")
    n_heads = r.integer("n_heads")
    n_kv_heads = r.integer("n_kv_heads", None) or n_heads
    mlp_hidden = r.integer("mlp_hidden_size", None) or r.integer("mlp_ratio", 4) * d_model
    vocab = r.integer("embedding_size", None) or r.integer("vocab_size")
    r.integer("vocab_size")
    if n_heads < 1 or d_model % n_heads:
        raise base.ConfigError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    return dict(
        vocab_size=vocab, d_model=d_model, n_layers=r.integer("n_layers"), n_heads=n_heads,
        n_kv_heads=n_kv_heads, head_dim=d_model // n_heads, mlp_hidden=mlp_hidden,
        rope_theta=r.number("rope_theta", 10000.0), norm_eps=r.number("rms_norm_eps", 1e-5),
        max_seq_len=r.integer("max_sequence_length"),
        mask_token_id=r.integer("mask_token_id", None),
        pad_token_id=base.token_id(r.get("pad_token_id", None)),
        eos_token_id=base.token_id(r.get("eos_token_id", None)),
        qkv_bias=bool(r.require("include_qkv_bias", (False, True), False)),
        tie_embeddings=bool(r.require("weight_tying", (False, True), False)),
        scale_logits=bool(r.require("scale_logits", (False, True), False)),
    )


def parse_llada(raw: Mapping[str, Any]) -> TransformerConfig:
    r = base.ConfigReader(raw, "llada")
    fields = _parse_common(r)
    r.finish()
    return TransformerConfig(family="llada", padding="key", **fields)


def parse_mmada(raw: Mapping[str, Any]) -> TransformerConfig:
    r = base.ConfigReader(raw, "mmada")
    fields = _parse_common(r)
    text_vocab = r.integer("llm_vocab_size", None)
    new_vocab = r.integer("new_vocab_size", None)
    if new_vocab is not None and new_vocab != fields["vocab_size"]:
        raise base.ConfigError(f"mmada config: new_vocab_size ({new_vocab}) differs from the "
                               f"embedding size ({fields['vocab_size']})")
    tied = r.require("tie_word_embeddings", (False, True), False)
    if bool(tied) != fields["tie_embeddings"]:
        raise base.ConfigError("mmada config: tie_word_embeddings and weight_tying disagree")
    r.ignore("codebook_size", "num_new_special_tokens", "num_vq_tokens")
    # MMaDA's training scripts merge their `model.mmada` yaml section into config.json and
    # MMadaConfig declares a few more keys: paths and a training switch, none of which changes
    # the text forward pass.
    r.ignore("pretrained_model_path", "tokenizer_path", "llm_model_path", "gradient_checkpointing")
    # w_clip_vit=True adds a CLIP-ViT image encoder path this port does not implement.
    r.require("w_clip_vit", (False,), False)
    r.finish()
    return TransformerConfig(family="mmada", padding="query_key_uniform",
                             text_vocab_size=text_vocab, **fields)


def key_table(c: TransformerConfig) -> list[KeyRule]:
    b = _PREFIX + "blocks.{layer}."
    rules = [
        KeyRule(("embed", "embedding"), _PREFIX + "wte.weight", base.identity),
        KeyRule(("blocks", "attn_norm", "scale"), b + "attn_norm.weight", base.identity),
        KeyRule(("blocks", "attn", "q_proj", "kernel"), b + "q_proj.weight", base.split_heads_in("n_heads")),
        KeyRule(("blocks", "attn", "k_proj", "kernel"), b + "k_proj.weight", base.split_heads_in("n_kv_heads")),
        KeyRule(("blocks", "attn", "v_proj", "kernel"), b + "v_proj.weight", base.split_heads_in("n_kv_heads")),
        KeyRule(("blocks", "attn", "o_proj", "kernel"), b + "attn_out.weight", base.split_heads_out),
        KeyRule(("blocks", "mlp_norm", "scale"), b + "ff_norm.weight", base.identity),
        KeyRule(("blocks", "mlp", "gate_proj", "kernel"), b + "ff_proj.weight", base.transpose),
        KeyRule(("blocks", "mlp", "up_proj", "kernel"), b + "up_proj.weight", base.transpose),
        KeyRule(("blocks", "mlp", "down_proj", "kernel"), b + "ff_out.weight", base.transpose),
        KeyRule(("final_norm", "scale"), _PREFIX + "ln_f.weight", base.identity),
    ]
    if c.qkv_bias:
        rules += [
            KeyRule(("blocks", "attn", "q_proj", "bias"), b + "q_proj.bias", base.split_heads_bias("n_heads")),
            KeyRule(("blocks", "attn", "k_proj", "bias"), b + "k_proj.bias", base.split_heads_bias("n_kv_heads")),
            KeyRule(("blocks", "attn", "v_proj", "bias"), b + "v_proj.bias", base.split_heads_bias("n_kv_heads")),
        ]
    if not c.tie_embeddings:
        rules.append(KeyRule(("lm_head", "kernel"), _PREFIX + "ff_out.weight", base.transpose))
    return rules
