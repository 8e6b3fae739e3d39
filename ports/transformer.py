"""One bidirectional transformer in Flax linen that serves every ported backbone through its config.

Differences between LLaDA, MMaDA, Dream, DiffuLLaMA and LLaDA-MoE (GQA, q/k/v biases, per-head
q/k RMSNorm, mixture-of-experts MLP, tied head, padding conventions) are fields of
`TransformerConfig`; there is no per-family model code.

Interception points (`ports.sites` maps sites onto them). Every module a tracer or an edit needs
is a named submodule called with a `layer_index` keyword (layers are `nn.scan`-ned, so the layer
is data, not a module path): 'embed' (Embed), 'o_proj' (the attention output projection),
'down_proj' (the MLP's; for a mixture of experts the whole 'mlp'), 'resid' (ResidualStream, an
identity tap on the block output), 'final_norm' and the MoE 'router'. Nothing outside `ports`
names them: code elsewhere reads and edits sites through `Backbone.apply(capture=, edits=)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from ports.config import TransformerConfig

Array = jax.Array
Dtype = Any

class Einsum(nn.Module):
    """A projection `einsum(spec, x, kernel) (+ bias)`; `layer_index` exists for interceptors only."""

    spec: str
    kernel_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, layer_index: Array | None = None) -> Array:
        del layer_index  # read by interceptors, not by the projection
        fan_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.normal(fan_in ** -0.5),
                            self.kernel_shape, self.param_dtype)
        y = jnp.einsum(self.spec, x.astype(self.dtype), kernel.astype(self.dtype))
        if self.bias_shape is not None:
            bias = self.param("bias", nn.initializers.zeros, self.bias_shape, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the scale, as LLaDA and Llama do."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class Embed(nn.Module):
    vocab_size: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = self.param("embedding", nn.initializers.normal(1.0),
                                    (self.vocab_size, self.features), self.param_dtype)

    def __call__(self, input_ids_BT: Array) -> Array:
        return jnp.take(self.embedding, input_ids_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTD: Array) -> Array:
        return jnp.einsum("BTD,VD->BTV", x_BTD, self.embedding.astype(self.dtype))


class ResidualStream(nn.Module):
    """Identity: marks the block output so interceptors can read or replace it."""

    @nn.compact
    def __call__(self, x_BTD: Array, layer_index: Array | None = None) -> Array:
        del layer_index
        return x_BTD


def rotary_tables(positions_BT: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin tables [B, T, H] in float32 (half-split layout: the two halves share frequencies)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x_BTNH: Array, cos_BTH: Array, sin_BTH: Array) -> Array:
    """Rotary embedding in float32 (LLaDA's `rope_full_precision`), cast back to x's dtype."""
    x = x_BTNH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]
    return out.astype(x_BTNH.dtype)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with optional GQA, q/k/v bias and per-head q/k RMSNorm."""

    config: TransformerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: Array, allowed_BQK: Array | None, positions_BT: Array,
                 layer_index: Array | None = None) -> Array:
        c = self.config
        N, K, H, D = c.n_heads, c.n_kv_heads, c.head_dim, c.d_model
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = Einsum("BTD,DNH->BTNH", (D, N, H), (N, H) if c.qkv_bias else None, name="q_proj", **kw)(x_BTD)
        k = Einsum("BTD,DKH->BTKH", (D, K, H), (K, H) if c.qkv_bias else None, name="k_proj", **kw)(x_BTD)
        v = Einsum("BTD,DKH->BTKH", (D, K, H), (K, H) if c.qkv_bias else None, name="v_proj", **kw)(x_BTD)
        if c.qk_norm:
            q = RMSNorm(c.norm_eps, name="q_norm", **kw)(q)
            k = RMSNorm(c.norm_eps, name="k_norm", **kw)(k)
        cos, sin = rotary_tables(positions_BT, H, c.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        B, T = x_BTD.shape[:2]
        G = c.queries_per_kv_head  # query head n = kv_head * G + g, as Llama's repeat_kv
        q = q.reshape(B, T, K, G, H) * jnp.asarray(H ** -0.5, q.dtype)
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        if allowed_BQK is not None:
            # finfo.min rather than -inf: a fully masked row then becomes uniform, as in the
            # additive-bias references; the 'query_key_zero' convention zeroes such rows below.
            bias = jnp.where(allowed_BQK, 0.0, jnp.finfo(jnp.float32).min)
            scores = scores + bias[:, None, None, :, :]
        probs = jax.nn.softmax(scores, axis=-1)
        if allowed_BQK is not None and c.padding == "query_key_zero":
            probs = probs * jnp.any(allowed_BQK, axis=-1)[:, None, None, :, None]
        heads = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(self.dtype), v).reshape(B, T, N, H)
        return Einsum("BTNH,NHD->BTD", (N, H, D), name="o_proj", **kw)(heads, layer_index=layer_index)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). LLaDA calls gate `ff_proj` and down `ff_out`."""

    config: TransformerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: Array, layer_index: Array | None = None) -> tuple[Array, dict]:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Einsum("BTD,DF->BTF", (c.d_model, c.mlp_hidden), name="gate_proj", **kw)(x_BTD)
        up = Einsum("BTD,DF->BTF", (c.d_model, c.mlp_hidden), name="up_proj", **kw)(x_BTD)
        hidden = nn.silu(gate) * up
        return Einsum("BTF,FD->BTD", (c.mlp_hidden, c.d_model), name="down_proj", **kw)(
            hidden, layer_index=layer_index)


class MoE(nn.Module):
    """Mixture of SwiGLU experts with softmax routing in float32 and top-k selection.

    All experts are evaluated densely and combined with a gate that is zero outside the top-k:
    static shapes, no data-dependent control flow, so the layer jits, vmaps and scans. Router
    logits are the 'router' site (`ports.sites`).
    """

    config: TransformerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: Array, layer_index: Array | None = None) -> Array:
        c = self.config
        E, D, F = c.num_experts, c.d_model, c.mlp_hidden
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        router_logits_BTE = Einsum("BTD,DE->BTE", (D, E), name="router", **kw)(x_BTD, layer_index=layer_index)
        probs = jax.nn.softmax(router_logits_BTE.astype(jnp.float32), axis=-1)
        top_w, top_i = jax.lax.top_k(probs, c.experts_per_token)
        if c.normalize_top_k:
            top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        top_w = top_w * c.routed_scaling
        gates_BTE = jnp.sum(jax.nn.one_hot(top_i, E, dtype=jnp.float32) * top_w[..., None], axis=-2)

        init = nn.initializers.normal(D ** -0.5)
        w_gate = self.param("gate_proj", init, (E, D, F), self.param_dtype).astype(self.dtype)
        w_up = self.param("up_proj", init, (E, D, F), self.param_dtype).astype(self.dtype)
        w_down = self.param("down_proj", nn.initializers.normal(F ** -0.5), (E, F, D),
                            self.param_dtype).astype(self.dtype)
        x = x_BTD.astype(self.dtype)
        hidden = nn.silu(jnp.einsum("BTD,EDF->BTEF", x, w_gate)) * jnp.einsum("BTD,EDF->BTEF", x, w_up)
        expert_out = jnp.einsum("BTEF,EFD->BTED", hidden, w_down)
        return jnp.einsum("BTED,BTE->BTD", expert_out, gates_BTE.astype(self.dtype))


class Block(nn.Module):
    """Pre-norm block; the scan body. Returns (residual, None)."""

    config: TransformerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: Array, allowed_BQK: Array | None, positions_BT: Array,
                 layer_index: Array):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_out = SelfAttention(c, name="attn", **kw)(
            RMSNorm(c.norm_eps, name="attn_norm", **kw)(x_BTD), allowed_BQK, positions_BT,
            layer_index=layer_index)
        x_BTD = x_BTD + attn_out
        mlp_cls = MoE if c.is_moe else MLP
        mlp_out = mlp_cls(c, name="mlp", **kw)(
            RMSNorm(c.norm_eps, name="mlp_norm", **kw)(x_BTD), layer_index=layer_index)
        x_BTD = ResidualStream(name="resid")(x_BTD + mlp_out, layer_index=layer_index)
        return x_BTD, None


def attention_allowed(attention_mask_BT: Array | None, padding: str) -> Array | None:
    """[B, T] 1/0 padding mask -> [B, Q, K] boolean 'may attend' matrix for the convention."""
    if attention_mask_BT is None:
        return None
    m = attention_mask_BT.astype(bool)
    if padding == "key":
        return jnp.broadcast_to(m[:, None, :], (m.shape[0], m.shape[1], m.shape[1]))
    return m[:, :, None] & m[:, None, :]


def default_positions(attention_mask_BT: Array | None, batch: int, length: int,
                      convention: str) -> Array:
    if attention_mask_BT is None or convention == "absolute":
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    m = attention_mask_BT.astype(jnp.int32)
    return jnp.where(m > 0, jnp.cumsum(m, axis=-1) - 1, 1)


class Transformer(nn.Module):
    """The model: embed -> L scanned blocks -> final RMSNorm -> output head (float32 logits).

    `__call__(input_ids [B,T], attention_mask [B,T] | None, positions [B,T] | None)` returns
    logits [B, T, V] as the original model returns them (Dream and DiffuLLaMA logits are NOT
    shifted here; `config.logit_shift` tells the caller). Activations are read through sites
    (`ports.sites`, `Backbone.apply(capture=...)`).

    `embed_tokens` and `unembed` expose the two ends (use with `apply(..., method=...)`); a single
    block is `Block(config)` applied to one layer's slice of `params['blocks']` (see
    `ports.Backbone.layer`), so callers can run any contiguous range of layers.
    """

    config: TransformerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed = Embed(c.vocab_size, c.d_model, **kw)
        block_cls = nn.remat(Block, prevent_cse=False) if self.remat else Block
        # 'intermediates' (captured sites) are stacked over layers like the parameters
        self.blocks = nn.scan(block_cls, variable_axes={"params": 0, "intermediates": 0},
                              split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast, 0),
                              length=c.n_layers)(c, **kw)
        self.final_norm = RMSNorm(c.norm_eps, **kw)
        if not c.tie_embeddings:
            self.lm_head = Einsum("BTD,DV->BTV", (c.d_model, c.vocab_size), **kw)

    def embed_tokens(self, input_ids_BT: Array) -> Array:
        return self.embed(input_ids_BT)

    def unembed(self, x_BTD: Array) -> Array:
        """Final norm and output head: float32 logits [B,T,V]."""
        x = self.final_norm(x_BTD)
        logits = self.embed.attend(x) if self.config.tie_embeddings else self.lm_head(x)
        if self.config.scale_logits:
            logits = logits * (self.config.d_model ** -0.5)
        return logits.astype(jnp.float32)

    def __call__(self, input_ids_BT: Array, attention_mask_BT: Array | None = None,
                 positions_BT: Array | None = None, logit_rows_BA: Array | None = None):
        c = self.config
        B, T = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = default_positions(attention_mask_BT, B, T, c.position_ids)
        allowed_BQK = attention_allowed(attention_mask_BT, c.padding)
        x, _ = self.blocks(self.embed(input_ids_BT), allowed_BQK, positions_BT,
                           jnp.arange(c.n_layers, dtype=jnp.int32))
        if logit_rows_BA is not None:   # the head is per token: gather first, skip the other rows
            x = jnp.take_along_axis(x, logit_rows_BA[..., None].astype(jnp.int32), axis=1)
        return self.unembed(x)
