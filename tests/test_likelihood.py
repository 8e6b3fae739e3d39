"""The three answer log-likelihood estimators against plain Python-loop references."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import MASK_ID, random_tokens
from timerome_jax import likelihood, sampler
from timerome_jax.errors import InputError


elbo_masks = jax.jit(likelihood.elbo_masks, static_argnums=2)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def answer_log_probs(backbone, prompt: list[int], state: list[int]) -> np.ndarray:
    """float64 log-probabilities [A, V] at the answer positions of one unpadded sequence."""
    raw = np.asarray(backbone.logits(np.array([prompt + state])), np.float64)[0]
    if backbone.config.logit_shift:
        raw = np.concatenate([raw[:1], raw[:-1]], axis=0)
    return log_softmax(raw[len(prompt):])


def reference_one_step(backbone, prompt, answer) -> float:
    lp = answer_log_probs(backbone, prompt, [MASK_ID] * len(answer))
    return float(sum(lp[j, y] for j, y in enumerate(answer)))


def reference_chain(backbone, prompt, answer) -> float:
    state, total = [MASK_ID] * len(answer), 0.0
    for _ in answer:
        lp = answer_log_probs(backbone, prompt, state)
        proposals = lp.copy()
        proposals[:, MASK_ID] = -np.inf
        confidence = proposals.max(-1)
        masked = [j for j, t in enumerate(state) if t == MASK_ID]
        j = max(masked, key=lambda j: (confidence[j], -j))  # ties: the earlier position
        total += lp[j, answer[j]]
        state[j] = answer[j]
    return total


def reference_elbo_term(backbone, prompt, answer, masked) -> float:
    state = [MASK_ID if m else y for y, m in zip(answer, masked)]
    lp = answer_log_probs(backbone, prompt, state)
    return len(answer) / sum(masked) * sum(lp[j, y] for j, y in enumerate(answer) if masked[j])


def exact_elbo(backbone, prompt, answer) -> float:
    """The ELBO by enumerating every mask set: E_{m ~ U{1..l}} E_{|S| = m} (l/m) sum_S log p."""
    ell = len(answer)
    total = 0.0
    for m in range(1, ell + 1):
        subsets = list(itertools.combinations(range(ell), m))
        for subset in subsets:
            masked = [j in subset for j in range(ell)]
            total += reference_elbo_term(backbone, prompt, answer, masked) / len(subsets) / ell
    return total


def pair_batch(pairs, junk_seed: int = 0):
    """[prompt left-padded | answer right-padded], junk in every padding position."""
    rng = np.random.default_rng(junk_seed)
    P = max(len(p) for p, _ in pairs)
    A = max(len(a) for _, a in pairs)
    p_ids = rng.integers(0, 384, (len(pairs), P)).astype(np.int32)
    a_ids = rng.integers(0, 384, (len(pairs), A)).astype(np.int32)
    p_mask = np.zeros((len(pairs), P), np.int32)
    a_mask = np.zeros((len(pairs), A), np.int32)
    for b, (p, a) in enumerate(pairs):
        p_ids[b, P - len(p):], p_mask[b, P - len(p):] = p, 1
        a_ids[b, :len(a)], a_mask[b, :len(a)] = a, 1
    return p_ids, p_mask, a_ids, a_mask


rng = np.random.default_rng(0)
PAIRS = [(random_tokens(rng, 6), random_tokens(rng, 4)),
         (random_tokens(rng, 3), random_tokens(rng, 6)),
         (random_tokens(rng, 8), random_tokens(rng, 2))]


def test_one_step_equals_hand_computation(any_backbone):
    got = likelihood.answer_log_likelihood_jit(any_backbone, *pair_batch(PAIRS), method="one_step")
    want = [reference_one_step(any_backbone, p, a) for p, a in PAIRS]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_chain_equals_the_python_loop(any_backbone):
    got = likelihood.answer_log_likelihood_jit(any_backbone, *pair_batch(PAIRS), method="chain")
    want = [reference_chain(any_backbone, p, a) for p, a in PAIRS]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_chain_of_a_greedy_sample_follows_the_sampler_order(llada_backbone):
    """With K = G, one block, greedy, the sampler reveals the answer in exactly the chain's order,
    so the chain log-likelihood is the sum of the sampler's log-confidences along its states."""
    G = 6
    prompts = [p for p, _ in PAIRS]
    p_ids, p_mask, _, _ = pair_batch(PAIRS)
    answer, order = sampler.sample_jit(llada_backbone, p_ids, p_mask, jax.random.key(0),
                                       gen_length=G, steps=G, block_length=G, return_order=True)
    answer, order = np.asarray(answer), np.asarray(order)
    chain = likelihood.answer_log_likelihood_jit(llada_backbone, p_ids, p_mask, answer,
                                                 np.ones_like(answer), method="chain")
    for b, prompt in enumerate(prompts):
        total = 0.0
        for k in range(G):
            state = [int(t) if order[b, j] < k else MASK_ID for j, t in enumerate(answer[b])]
            j = int(np.flatnonzero(order[b] == k)[0])
            total += answer_log_probs(llada_backbone, prompt, state)[j, answer[b, j]]
        np.testing.assert_allclose(float(chain[b]), total, rtol=1e-5, atol=1e-4)


def test_mc_elbo_terms_equal_the_loop_on_the_same_masks(any_backbone):
    M = 8
    key = jax.random.key(3)
    batch = pair_batch(PAIRS)
    # 24 copies in chunks of 5: the remainder chunk is exercised too
    terms = jax.jit(functools.partial(likelihood.mc_elbo_terms, mc_samples=M, batch_size=5))(
        any_backbone, *map(jnp.asarray, batch), key)
    masked, _ = elbo_masks(sampler.row_keys(key, len(PAIRS)), jnp.asarray(batch[3]), M)
    masked = np.asarray(masked)
    for b, (p, a) in enumerate(PAIRS):
        want = [reference_elbo_term(any_backbone, p, a, masked[b, i, :len(a)].tolist())
                for i in range(M)]
        np.testing.assert_allclose(np.asarray(terms[b]), want, rtol=1e-5, atol=1e-4)


def test_mc_elbo_with_many_samples_is_within_sampling_error_of_the_exact_elbo(llada_backbone):
    prompt, answer = PAIRS[0]
    M = 512
    batch = pair_batch([(prompt, answer)])
    terms = jax.jit(functools.partial(likelihood.mc_elbo_terms, mc_samples=M, batch_size=128))(
        llada_backbone, *map(jnp.asarray, batch), jax.random.key(11))
    terms = np.asarray(terms)
    exact = exact_elbo(llada_backbone, prompt, answer)
    standard_error = terms.std() / math.sqrt(M)  # i.i.d. error; stratification only shrinks it
    assert 0 < standard_error < 0.01 * abs(exact)  # the check below is tight
    assert abs(terms.mean() - exact) < 4 * standard_error, (terms.mean(), exact, standard_error)


def test_elbo_masks_are_stratified_and_independent_of_padding():
    M = 10
    answer_mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    keys = jax.random.split(jax.random.key(0), 2)
    masked, counts = elbo_masks(keys, answer_mask, M)
    masked, counts = np.asarray(masked), np.asarray(counts)
    for b, ell in enumerate((4, 6)):
        hist = np.bincount(counts[b], minlength=ell + 1)[1:]
        assert hist.sum() == M and hist.max() - hist.min() <= 1, hist
        np.testing.assert_array_equal(masked[b].sum(-1), counts[b])
        assert not masked[b, :, ell:].any()
    # the same key and answer length give the same masks whatever the right padding
    tight, tight_counts = elbo_masks(keys[:1], answer_mask[:1, :4], M)
    np.testing.assert_array_equal(np.asarray(tight)[0], masked[0, :, :4])
    np.testing.assert_array_equal(np.asarray(tight_counts)[0], counts[0])
    other, _ = elbo_masks(jax.random.split(jax.random.key(1), 2), answer_mask, M)
    assert not np.array_equal(np.asarray(other), masked)
    # also across the boundary of the 128-position draw chunks
    long_mask = np.zeros((1, 300), np.int32)
    long_mask[0, :200] = 1
    padded, _ = elbo_masks(keys[:1], long_mask, M)
    tight, _ = elbo_masks(keys[:1], long_mask[:, :200], M)
    np.testing.assert_array_equal(np.asarray(padded)[..., :200], np.asarray(tight))


def test_batched_equals_unbatched(llada_backbone):
    """Per-row keys: a pair's MC-ELBO does not depend on its batch or padding, and it is the mean
    of the loop reference's terms on the same masks. (The reference tests above already compare
    junk-padded batches with unpadded loops for every method.)"""
    M = 6
    pairs = PAIRS[:2]
    keys = jax.random.split(jax.random.key(5), len(pairs))
    run = functools.partial(likelihood.answer_log_likelihood_jit, llada_backbone, mc_samples=M,
                            batch_size=6)
    batch = pair_batch(pairs, junk_seed=1)
    batched = np.asarray(run(*batch, keys))
    masked = np.asarray(elbo_masks(keys, jnp.asarray(batch[3]), M)[0])
    for b, (prompt, answer) in enumerate(pairs):
        one = np.asarray(run(*pair_batch([(prompt, answer)]), keys[b:b + 1]))
        np.testing.assert_allclose(batched[b], one[0], rtol=1e-5, atol=1e-4)
        terms = [reference_elbo_term(llada_backbone, prompt, answer, masked[b, i, :len(answer)])
                 for i in range(M)]
        np.testing.assert_allclose(batched[b], np.mean(terms), rtol=1e-5, atol=1e-4)


def test_chunking_and_keys(llada_backbone):
    batch = pair_batch(PAIRS[:2], junk_seed=1)
    keys = jax.random.split(jax.random.key(5), 2)
    run = functools.partial(likelihood.answer_log_likelihood_jit, llada_backbone, *batch,
                            mc_samples=6)
    a = np.asarray(run(keys, batch_size=6))
    np.testing.assert_allclose(np.asarray(run(keys, batch_size=1)), a, rtol=1e-5, atol=1e-4)
    assert not np.allclose(np.asarray(run(jax.random.split(jax.random.key(6), 2), batch_size=6)), a)


def zero_mlp(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.name == "mlp" and context.method_name == "__call__":
        return jnp.zeros_like(out)
    return out


def test_likelihood_runs_inside_a_caller_jit_with_an_interceptor(llada_backbone):
    batch = tuple(map(jnp.asarray, pair_batch(PAIRS)))

    @jax.jit
    def intercepted(backbone, *batch):
        with nn.intercept_methods(zero_mlp):
            return likelihood.answer_log_likelihood(backbone, *batch, method="one_step")

    params = {**llada_backbone.params,
              "blocks": {**llada_backbone.params["blocks"],
                         "mlp": jax.tree.map(jnp.zeros_like, llada_backbone.params["blocks"]["mlp"])}}
    no_mlp = dataclasses.replace(llada_backbone, params=params)
    got = np.asarray(intercepted(llada_backbone, *batch))
    want = np.asarray(likelihood.answer_log_likelihood_jit(no_mlp, *batch, method="one_step"))
    plain = np.asarray(likelihood.answer_log_likelihood_jit(llada_backbone, *batch,
                                                            method="one_step"))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert not np.allclose(got, plain)


def test_bad_inputs_are_input_errors(llada_backbone):
    batch = pair_batch(PAIRS)
    run = functools.partial(likelihood.answer_log_likelihood_jit, llada_backbone)
    with pytest.raises(InputError, match="unknown log-likelihood method 'elbo'"):
        run(*batch, jax.random.key(0), method="elbo")
    with pytest.raises(InputError, match="mc_samples must be a positive integer"):
        run(*batch, jax.random.key(0), mc_samples=0)
    with pytest.raises(InputError, match="needs a PRNG key"):
        run(*batch, None, method="mc_elbo")
    p_ids, p_mask, a_ids, a_mask = batch
    empty = a_mask.copy()
    empty[2] = 0
    with pytest.raises(InputError, match=r"the answer of row\(s\) 2 is empty"):
        run(p_ids, p_mask, a_ids, empty, method="one_step")
    empty = p_mask.copy()
    empty[0] = 0
    with pytest.raises(InputError, match=r"the prompt of row\(s\) 0 is empty"):
        run(p_ids, empty, a_ids, a_mask, method="one_step")
    long_prompt = np.full((3, 252), 5, np.int32)
    with pytest.raises(InputError, match="exceeds the model's maximum length 256"):
        run(long_prompt, np.ones_like(long_prompt), a_ids, a_mask, method="one_step")
    with pytest.raises(InputError, match="unknown log-likelihood method"):
        jax.jit(lambda *b: likelihood.answer_log_likelihood(llada_backbone, *b, method="exact"))(
            *batch)
