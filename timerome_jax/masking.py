"""The masked-diffusion forward process and training loss (LLaDA's SFT objective).

Conventions used across `timerome_jax`:
  * `answer_mask_BT` is True on answer (response) positions; prompt and padding positions are
    never masked or scored.
  * `token_logits` aligns logits so that position i predicts token i for every backbone (Dream and
    DiffuLLaMA predict token i at position i-1; `config.logit_shift` says so).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ports import Backbone

Array = jax.Array


def align_logits(logits_BTV: Array, logit_shift: int) -> Array:
    """Logits whose row i predicts token i. For shifted models row 0 repeats the raw row 0, as
    Dream's sampler does (`cat([logits[:, :1], logits[:, :-1]])`); position 0 is always prompt."""
    if logit_shift == 0:
        return logits_BTV
    return jnp.concatenate([logits_BTV[:, :1], logits_BTV[:, :-1]], axis=1)


def token_logits(backbone: Backbone, input_ids_BT: Array, attention_mask_BT: Array | None = None,
                 params=None) -> Array:
    """float32 logits [B, T, V] with row i predicting token i (shift handled)."""
    logits = backbone.apply(input_ids_BT, attention_mask_BT, params=params)
    return align_logits(logits, backbone.config.logit_shift)


def forward_process(key: Array, input_ids_BT: Array, answer_mask_BT: Array, mask_token_id: int,
                    eps: float = 1e-3) -> tuple[Array, Array, Array]:
    """Sample t ~ U(0, 1) per row and mask each answer token with probability p = (1-eps) t + eps.

    Returns (noisy_ids [B,T], masked [B,T] bool, p_mask [B]).
    """
    t_key, m_key = jax.random.split(key)
    B, T = input_ids_BT.shape
    t = jax.random.uniform(t_key, (B,))
    p_mask = (1.0 - eps) * t + eps
    masked = (jax.random.uniform(m_key, (B, T)) < p_mask[:, None]) & answer_mask_BT.astype(bool)
    noisy = jnp.where(masked, mask_token_id, input_ids_BT)
    return noisy, masked, p_mask


def masked_diffusion_loss(backbone: Backbone, key: Array, input_ids_BT: Array,
                          answer_mask_BT: Array, attention_mask_BT: Array | None = None,
                          eps: float = 1e-3) -> Array:
    """LLaDA SFT loss: per row, sum over masked answer tokens of CE / p_mask, divided by the
    row's answer length; mean over rows. Differentiable in `backbone` (a pytree of its params):
    `jax.grad(masked_diffusion_loss)(backbone, ...)`.params are the parameter gradients.
    """
    if backbone.mask_token_id is None:
        raise ValueError("the backbone has no mask_token_id; pass one to load_pretrained")
    noisy, masked, p_mask = forward_process(key, input_ids_BT, answer_mask_BT,
                                            backbone.mask_token_id, eps)
    logits = token_logits(backbone, noisy, attention_mask_BT)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_nll = -jnp.take_along_axis(log_probs, input_ids_BT[..., None], axis=-1)[..., 0]
    weighted = jnp.where(masked, token_nll / p_mask[:, None], 0.0)
    answer_len = jnp.maximum(jnp.sum(answer_mask_BT, axis=-1), 1)
    return jnp.mean(jnp.sum(weighted, axis=-1) / answer_len)
