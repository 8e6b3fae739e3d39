"""The batched sampler against a plain Python-loop reference of LLaDA's `generate`."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import MASK_ID, random_tokens
from timerome_jax import sampler
from timerome_jax.errors import InputError


# ----------------------------------------------------------------------------- reference

def step_logits(backbone, prompt: list[int], state: list[int]) -> np.ndarray:
    """float64 token-aligned logits [G, V] for one unpadded sequence, shift applied by hand."""
    raw = np.asarray(backbone.logits(np.array([prompt + state])), np.float64)[0]
    if backbone.config.logit_shift:
        raw = np.concatenate([raw[:1], raw[:-1]], axis=0)
    return raw[len(prompt):]


def reference_generate(backbone, prompt: list[int], gen_length: int, steps: int,
                       block_length: int):
    """Greedy LLaDA `generate` with low-confidence remasking, one prompt, plain loops.

    Returns (answer [G], reveal_step [G]).
    """
    state = [MASK_ID] * gen_length
    reveal_step = [-1] * gen_length
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    step = 0
    for block in range(num_blocks):
        counts = [block_length // per_block + (1 if i < block_length % per_block else 0)
                  for i in range(per_block)]
        for count in counts:
            logits = step_logits(backbone, prompt, state)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            candidates = []
            for j in range(block * block_length, (block + 1) * block_length):
                if state[j] != MASK_ID:
                    continue
                row = probs[j].copy()
                row[MASK_ID] = -1.0
                token = int(np.argmax(row))
                candidates.append((-probs[j, token], j, token))
            for _, j, token in sorted(candidates)[:count]:
                state[j] = token
                reveal_step[j] = step
            step += 1
    return np.array(state), np.array(reveal_step)


def padded_batch(prompts: list[list[int]], junk_seed: int = 0):
    """Left-padded prompt batch whose padding holds random junk (it must never matter)."""
    rng = np.random.default_rng(junk_seed)
    P = max(map(len, prompts))
    ids = rng.integers(0, 384, size=(len(prompts), P)).astype(np.int32)
    mask = np.zeros((len(prompts), P), np.int32)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = p
        mask[b, P - len(p):] = 1
    return ids, mask


PROMPTS = [random_tokens(np.random.default_rng(s), n) for s, n in ((1, 5), (2, 9), (3, 3))]


# ----------------------------------------------------------------------------- schedule

def test_reveal_counts_linear_schedule():
    np.testing.assert_array_equal(sampler.reveal_counts(10, 4, 10), [3, 3, 2, 2])
    np.testing.assert_array_equal(sampler.reveal_counts(8, 4, 4), [2, 2, 2, 2])
    np.testing.assert_array_equal(sampler.reveal_counts(12, 6, 4), [2, 2] * 3)
    np.testing.assert_array_equal(sampler.reveal_counts(10, 4, 5), [3, 2, 3, 2])
    np.testing.assert_array_equal(sampler.reveal_counts(4, 8, 4), [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(sampler.step_blocks(12, 6, 4), [0, 0, 1, 1, 2, 2])
    counts = sampler.reveal_counts(96, 24, 32)
    assert counts.reshape(3, 8).sum(1).tolist() == [32, 32, 32]


@pytest.mark.parametrize("gen_length,steps,block_length,message", [
    (10, 4, 4, "not divisible by block length"),
    (12, 4, 4, "not divisible by the number of blocks"),
    (0, 4, 4, "gen length must be a positive integer"),
    (8, 0, 4, "steps must be a positive integer"),
])
def test_bad_schedules_are_input_errors(gen_length, steps, block_length, message):
    with pytest.raises(InputError, match=message):
        sampler.reveal_counts(gen_length, steps, block_length)


# ----------------------------------------------------------------------------- against the loop

def test_one_token_per_step_is_the_most_confident(any_backbone):
    """K = G, one block, greedy: step k reveals exactly one position, the one the unbatched
    reference loop picks; the batch is left-padded with junk, which must not leak."""
    G = 8
    prompts = PROMPTS[:2]
    ids, mask = padded_batch(prompts, junk_seed=5)
    answer, order = sampler.sample_jit(any_backbone, ids, mask, jax.random.key(0), gen_length=G,
                                       steps=G, block_length=G, return_order=True)
    for b, prompt in enumerate(prompts):
        assert sorted(np.asarray(order)[b].tolist()) == list(range(G))
        ref_answer, ref_order = reference_generate(any_backbone, prompt, G, G, G)
        np.testing.assert_array_equal(np.asarray(order)[b], ref_order)
        np.testing.assert_array_equal(np.asarray(answer)[b], ref_answer)


def test_blocks_and_multi_token_steps_match_the_reference(llada_backbone):
    G, K, block = 12, 6, 4
    prompts = PROMPTS[1:]
    ids, mask = padded_batch(prompts, junk_seed=5)
    answer, order = sampler.sample_jit(llada_backbone, ids, mask, jax.random.key(0), gen_length=G,
                                       steps=K, block_length=block, return_order=True)
    for b, prompt in enumerate(prompts):
        ref_answer, ref_order = reference_generate(llada_backbone, prompt, G, K, block)
        np.testing.assert_array_equal(np.asarray(answer)[b], ref_answer)
        np.testing.assert_array_equal(np.asarray(order)[b], ref_order)


def check_batched_equals_unbatched(backbone, prompts, keys, **kw):
    ids, mask = padded_batch(prompts, junk_seed=5)
    answer, order = sampler.sample_jit(backbone, ids, mask, keys, return_order=True, **kw)
    for b, prompt in enumerate(prompts):
        one_ids, one_mask = padded_batch([prompt])
        one_answer, one_order = sampler.sample_jit(backbone, one_ids, one_mask, keys[b:b + 1],
                                                   return_order=True, **kw)
        np.testing.assert_array_equal(np.asarray(answer)[b], np.asarray(one_answer)[0])
        np.testing.assert_array_equal(np.asarray(order)[b], np.asarray(one_order)[0])


def test_batched_equals_unbatched_with_noise(llada_backbone):
    """Per-row keys make a row's Gumbel and remasking noise independent of its batch and padding
    (the greedy reference tests above already compare padded batches with unbatched loops)."""
    keys = jax.random.split(jax.random.key(7), 2)
    check_batched_equals_unbatched(llada_backbone, PROMPTS[1:], keys, gen_length=8, steps=4,
                                   block_length=4, temperature=1.0, remasking="random")


# ----------------------------------------------------------------------------- invariants

@pytest.mark.parametrize("temperature,remasking", [(0.0, "low_confidence"), (1.0, "random")])
def test_each_step_reveals_its_count_inside_its_block(llada_backbone, temperature, remasking):
    G, K, block = 12, 6, 4
    ids, mask = padded_batch(PROMPTS[1:], junk_seed=5)
    answer, order = sampler.sample_jit(llada_backbone, ids, mask, jax.random.key(3), gen_length=G,
                                       steps=K, block_length=block, temperature=temperature,
                                       remasking=remasking, return_order=True)
    counts = sampler.reveal_counts(G, K, block)
    blocks = sampler.step_blocks(G, K, block)
    order, answer = np.asarray(order), np.asarray(answer)
    for b in range(len(order)):
        np.testing.assert_array_equal(np.bincount(order[b], minlength=K), counts)
        np.testing.assert_array_equal(blocks[order[b]], np.arange(G) // block)
    assert (answer != MASK_ID).all()


def test_revealed_tokens_are_never_remasked(llada_backbone):
    """Drive the public step function by hand; the compiled scan must agree with it."""
    G, K, block = 8, 4, 4
    ids, mask = padded_batch(PROMPTS[1:], junk_seed=5)
    keys = jax.random.split(jax.random.key(9), len(ids))
    @jax.jit
    def step(answer, masked, allowed, count, k):
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, k)
        return sampler.denoise_step(llada_backbone, ids, mask, answer, masked, allowed, count,
                                    step_keys, temperature=1.0, remasking="random")

    answer = np.full((len(ids), G), MASK_ID, np.int32)
    masked = np.ones((len(ids), G), bool)
    blocks = sampler.step_blocks(G, K, block)
    for k, count in enumerate(sampler.reveal_counts(G, K, block)):
        allowed = np.broadcast_to(np.arange(G) // block == blocks[k], masked.shape)
        new_answer, new_masked, revealed = map(np.asarray, step(answer, masked, allowed, count, k))
        np.testing.assert_array_equal(new_answer[~masked], answer[~masked])
        assert not (new_masked & ~masked).any()
        assert (revealed.sum(-1) == count).all()
        answer, masked = new_answer, new_masked
    assert not masked.any()
    compiled = sampler.sample_jit(llada_backbone, ids, mask, keys, gen_length=G, steps=K,
                                  block_length=block, temperature=1.0, remasking="random")
    np.testing.assert_array_equal(np.asarray(answer), np.asarray(compiled))


def test_temperature_sampling(llada_backbone):
    ids, mask = padded_batch(PROMPTS[1:], junk_seed=5)
    run = functools.partial(sampler.sample_jit, llada_backbone, ids, mask, gen_length=8, steps=4,
                            block_length=4, return_order=True)
    greedy = np.asarray(run(jax.random.key(0))[0])
    np.testing.assert_array_equal(np.asarray(run(jax.random.key(1), temperature=1e-5)[0]), greedy)
    hot_a = np.asarray(run(jax.random.key(1), temperature=1.0)[0])
    hot_b = np.asarray(run(jax.random.key(1), temperature=1.0)[0])
    hot_c = np.asarray(run(jax.random.key(2), temperature=1.0)[0])
    np.testing.assert_array_equal(hot_a, hot_b)
    assert not np.array_equal(hot_a, hot_c)
    assert not np.array_equal(hot_a, greedy)


def test_select_reveals_breaks_ties_towards_the_earlier_position():
    scores = jnp.array([[0.5, 0.9, 0.9, 0.1, 0.9]])
    candidates = jnp.array([[True, True, True, True, False]])
    chosen = sampler.select_reveals(scores, candidates, 1)
    np.testing.assert_array_equal(np.asarray(chosen), [[False, True, False, False, False]])
    chosen = sampler.select_reveals(scores, candidates, 3)
    np.testing.assert_array_equal(np.asarray(chosen), [[True, True, True, False, False]])


def test_mask_token_is_never_proposed():
    logits = jnp.zeros((1, 2, 384)).at[:, :, MASK_ID].set(10.0).at[:, 1, 7].set(1.0)

    @jax.jit
    def proposals(logits, keys):
        gumbel, _ = sampler.step_noise(keys, 2, 384, temperature=5.0)
        return (*sampler.top_proposal(logits, MASK_ID), sampler.propose_tokens(logits, MASK_ID),
                sampler.propose_tokens(logits, MASK_ID, 5.0, gumbel))

    tokens, confidence, greedy, hot = proposals(logits, jax.random.split(jax.random.key(0), 1))
    assert int(tokens[0, 1]) == 7 and int(tokens[0, 0]) != MASK_ID
    assert MASK_ID not in np.asarray(greedy) and MASK_ID not in np.asarray(hot)
    # confidence is the probability under the full softmax, mask token included
    full = jax.nn.softmax(logits[0, 1])
    np.testing.assert_allclose(float(confidence[0, 1]), float(full[7]), rtol=1e-6)


# ----------------------------------------------------------------------------- composition

def zero_mlp(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.name == "mlp" and context.method_name == "__call__":
        return jnp.zeros_like(out)
    return out


def test_sample_runs_inside_a_caller_jit_with_an_interceptor(llada_backbone):
    """An interceptor entered inside the caller's jit reaches every step of the sampler: zeroing
    every MLP output equals sampling from a backbone whose down projections are zero."""
    ids, mask = padded_batch(PROMPTS[1:], junk_seed=5)
    kw = dict(gen_length=8, steps=4, block_length=4, return_order=True)

    @jax.jit
    def intercepted(backbone, ids, mask, key):
        with nn.intercept_methods(zero_mlp):
            return sampler.sample(backbone, ids, mask, key, **kw)

    params = dict(llada_backbone.params)
    blocks = dict(params["blocks"])
    blocks["mlp"] = jax.tree.map(jnp.zeros_like, blocks["mlp"])
    params["blocks"] = blocks
    no_mlp = dataclasses.replace(llada_backbone, params=params)
    got = intercepted(llada_backbone, ids, mask, jax.random.key(0))
    want = sampler.sample_jit(no_mlp, ids, mask, jax.random.key(0), **kw)
    plain = sampler.sample_jit(llada_backbone, ids, mask, jax.random.key(0), **kw)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    assert not np.array_equal(np.asarray(got[0]), np.asarray(plain[0]))


def test_host_entry_point_refuses_tracers(llada_backbone):
    ids, mask = padded_batch(PROMPTS)
    with pytest.raises(TypeError, match="pure function"):
        jax.jit(lambda i, m: sampler.sample_jit(llada_backbone, i, m, jax.random.key(0),
                                                gen_length=4, steps=4, block_length=4))(ids, mask)


# ----------------------------------------------------------------------------- bad inputs

def test_bad_inputs_are_input_errors(llada_backbone):
    ids, mask = padded_batch(PROMPTS)
    kw = dict(gen_length=8, steps=8, block_length=8)
    run = functools.partial(sampler.sample_jit, llada_backbone)
    with pytest.raises(InputError, match="not divisible by block length"):
        run(ids, mask, jax.random.key(0), gen_length=10, steps=5, block_length=4)
    with pytest.raises(InputError, match="not divisible by the number of blocks"):
        run(ids, mask, jax.random.key(0), gen_length=8, steps=3, block_length=4)
    with pytest.raises(InputError, match="unknown remasking"):
        run(ids, mask, jax.random.key(0), remasking="lowest", **kw)
    empty_row = mask.copy()
    empty_row[1] = 0
    with pytest.raises(InputError, match=r"prompt of row\(s\) 1 is empty"):
        run(ids, empty_row, jax.random.key(0), **kw)
    with pytest.raises(InputError, match="prompt is empty"):
        run(np.zeros((2, 0), np.int32), np.zeros((2, 0), np.int32), jax.random.key(0), **kw)
    long_ids = np.full((1, 250), 5, np.int32)
    with pytest.raises(InputError, match="exceeds the model's maximum length 256"):
        run(long_ids, np.ones_like(long_ids), jax.random.key(0), **kw)
    with pytest.raises(InputError, match="one PRNG key or 3 keys"):
        run(ids, mask, jax.random.split(jax.random.key(0), 2), **kw)
    # the pure function checks what is static, so a caller's jit fails just as clearly
    with pytest.raises(InputError, match="exceeds the model's maximum length"):
        jax.jit(lambda i, m: sampler.sample(llada_backbone, i, m, jax.random.key(0), **kw))(
            long_ids, np.ones_like(long_ids))
