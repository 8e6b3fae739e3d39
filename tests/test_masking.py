"""The forward process and the masked-diffusion SFT loss (timerome_jax.masking)."""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import EOS_ID, MASK_ID, random_tokens
from timerome_jax import masking


def make_batch(seed: int = 0):
    """Two rows [prompt | answer]: row 0 left-padded by 3, row 1 unpadded; 6 answer tokens each."""
    rng = np.random.default_rng(seed)
    T, answer_len = 14, 6
    ids = np.array([random_tokens(rng, T) for _ in range(2)], np.int32)
    ids[0, :3] = EOS_ID
    attention = np.ones((2, T), np.int32)
    attention[0, :3] = 0
    answer = np.zeros((2, T), bool)
    answer[:, T - answer_len:] = True
    return jnp.asarray(ids), jnp.asarray(answer), jnp.asarray(attention)


def test_forward_process_masks_only_answer_tokens():
    ids, answer, _ = make_batch()
    big_answer = jnp.tile(answer, (64, 1))
    big_ids = jnp.tile(ids, (64, 1))
    forward = jax.jit(masking.forward_process, static_argnums=3)
    noisy, masked, p_mask = forward(jax.random.key(3), big_ids, big_answer, MASK_ID)
    masked, noisy, p_mask = np.asarray(masked), np.asarray(noisy), np.asarray(p_mask)
    assert not masked[~np.asarray(big_answer)].any(), "a prompt position was masked"
    assert (noisy[masked] == MASK_ID).all()
    np.testing.assert_array_equal(noisy[~masked], np.asarray(big_ids)[~masked])
    assert ((p_mask >= 1e-3) & (p_mask <= 1.0)).all()
    # rows are masked with their own probability: the masked fraction follows p_mask
    fraction = masked.sum(-1) / np.asarray(big_answer).sum(-1)
    assert np.corrcoef(fraction, p_mask)[0, 1] > 0.8


def test_forward_process_is_deterministic_in_the_key():
    ids, answer, _ = make_batch()
    a = masking.forward_process(jax.random.key(1), ids, answer, MASK_ID)
    b = masking.forward_process(jax.random.key(1), ids, answer, MASK_ID)
    c = masking.forward_process(jax.random.key(2), ids, answer, MASK_ID)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(np.asarray(a[2]), np.asarray(c[2]))


def hand_loss(backbone, key, ids, answer, attention) -> float:
    """The SFT loss by plain loops over rows and positions, from the raw (unshifted) logits."""
    noisy, masked, p_mask = (np.asarray(x) for x in
                             masking.forward_process(key, ids, answer, backbone.mask_token_id))
    raw = np.asarray(backbone.logits(noisy, attention), np.float64)
    ids, answer = np.asarray(ids), np.asarray(answer)
    per_row = []
    for b in range(ids.shape[0]):
        total = 0.0
        for t in range(ids.shape[1]):
            if not masked[b, t]:
                continue
            row = raw[b, t - backbone.config.logit_shift] if t > 0 else raw[b, 0]
            log_probs = row - np.log(np.sum(np.exp(row - row.max()))) - row.max()
            total += -log_probs[ids[b, t]] / p_mask[b]
        per_row.append(total / max(answer[b].sum(), 1))
    return float(np.mean(per_row))


@pytest.mark.parametrize("seed", [0, 5])
def test_loss_equals_hand_computation(any_backbone, seed):
    ids, answer, attention = make_batch(seed)
    key = jax.random.key(seed + 11)
    loss = jax.jit(masking.masked_diffusion_loss)(any_backbone, key, ids, answer, attention)
    expected = hand_loss(any_backbone, key, ids, answer, attention)
    assert expected > 0
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_loss_gradient_matches_a_finite_difference(llada_backbone):
    ids, answer, attention = make_batch(1)
    key = jax.random.key(4)

    @jax.jit
    def value_and_grad(params):
        backbone = dataclasses.replace(llada_backbone, params=params)
        return jax.value_and_grad(masking.masked_diffusion_loss)(backbone, key, ids, answer,
                                                                 attention)

    _, grads = value_and_grad(llada_backbone.params)
    grads = jax.tree.map(np.asarray, grads.params)
    assert jax.tree.structure(grads) == jax.tree.structure(llada_backbone.params)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(g).all() for g in leaves)
    norm = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in leaves)))
    assert norm > 1e-3
    # the derivative along the normalised gradient is the gradient norm
    h = 1e-2
    params = jax.tree.map(np.asarray, llada_backbone.params)
    plus, _ = value_and_grad(jax.tree.map(lambda p, g: p + h * g / norm, params, grads))
    minus, _ = value_and_grad(jax.tree.map(lambda p, g: p - h * g / norm, params, grads))
    slope = (float(plus) - float(minus)) / (2 * h)
    np.testing.assert_allclose(slope, norm, rtol=2e-2)
    # masked positions feed the model the mask token, so its embedding is trained
    assert np.abs(grads["embed"]["embedding"][MASK_ID]).sum() > 0
