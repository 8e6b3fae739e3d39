"""Memory entries captured along the greedy sampler's own trajectory (memory.SamplerCapture)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ports
from timerome_jax import api
from timerome_jax import memory as mem
from timerome_jax import sampler
from timerome_jax import tracing as tr
from timerome_jax.errors import CheckpointError, InputError
from timerome_jax.facts import Fact, Facts, fact_batch
from timerome_jax.memory import capturing

from conftest import activations


@pytest.fixture(scope="module")
def llada(llada_backbone):
    return llada_backbone


def make_batch():
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(2, 370, 8)), list(rng.integers(2, 370, 6)), list(rng.integers(2, 370, 5))]
    answers = [list(rng.integers(2, 370, 6)), list(rng.integers(2, 370, 4)), list(rng.integers(2, 370, 3))]
    return fact_batch(prompts, answers, [(2, 5), (1, 3), (4, 5)], pad_id=378), prompts


def make_facts() -> Facts:
    """make_batch's facts as an encoded set (ids 'a', 'b', 'c'); no tokenizer is needed to build a
    memory without a gate or covariance."""
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(2, 370, 8)), list(rng.integers(2, 370, 6)), list(rng.integers(2, 370, 5))]
    answers = [list(rng.integers(2, 370, 6)), list(rng.integers(2, 370, 4)), list(rng.integers(2, 370, 3))]
    facts = tuple(Fact(f"p {w}", "a", where=w) for w in "abc")
    return Facts(facts, ("s",) * 3, tuple(map(tuple, prompts)), tuple(map(tuple, answers)), ((2, 5), (1, 3), (4, 5)),
                 378)


CAPTURE = mem.SamplerCapture(gen_length=8, steps=4, block_length=4, capture_steps=(0, 1, 3))


@pytest.mark.parametrize("positions", mem.KEY_POSITIONS)
def test_capture_at_the_tracers_states_equals_the_tracers_capture(llada, positions):
    batch, _ = make_batch()
    kw = dict(module="attn", noise_samples=2, noise_scale=3.0, positions=positions)
    args = (jnp.float32(0.5), jax.random.key(3), jnp.int32(1))
    keys, deltas = capturing._at_tracer_states(llada, batch, *args, trace_steps=4, steps=(2,), **kw)
    states = jnp.stack([tr.clean_run(llada, batch.input_ids_FT[f], batch.attention_mask_FT[f],
                                     batch.answer_mask_FT[f], batch.subject_pos_FS[f], 4)[0][2] for f in range(3)])
    rows = (states, batch.attention_mask_FT, batch.subject_pos_FS, batch.subject_valid_FS, batch.fact_index_F)
    at_k, at_d = capturing._at_states(llada, rows, *args, **kw)
    np.testing.assert_allclose(at_k, keys[:, 0], atol=1e-6)
    np.testing.assert_allclose(at_d, deltas[:, 0], atol=1e-6)


def test_sampler_states_are_the_greedy_samplers(llada):
    """Before step k: the left-padded prompt, then the tokens the greedy sampler revealed at steps
    < k and masks elsewhere; the last state plus the last step's reveals is its output, and the
    subject positions still point at the subject tokens."""
    batch, prompts = make_batch()
    states = mem.sampler_states(llada, batch, CAPTURE)
    assert sorted(states) == [0, 1, 3]
    P, G = 8, 8
    out = sampler.sample_many(llada, prompts, jax.random.key(0), pad_id=0, gen_length=G, steps=4, block_length=4)
    counts = np.cumsum(np.concatenate([[0], sampler.reveal_counts(G, 4, 4)]))
    mask_id = llada.mask_token_id
    for k, (ids, attn, pos, valid_S) in states.items():
        assert pos.shape == valid_S.shape == (3, 3) and np.array_equal(valid_S, batch.subject_valid_FS)
        assert ids.shape == attn.shape == (3, P + G)
        for f, p in enumerate(prompts):
            assert ids[f, P - len(p):P].tolist() == p and attn[f, :P].sum() == len(p) and attn[f, P:].all()
            answer = ids[f, P:]
            assert (answer != mask_id).sum() == counts[k]
            assert np.all((answer == mask_id) | (answer == out[f]))
            valid = np.asarray(batch.subject_valid_FS[f])
            np.testing.assert_array_equal(ids[f, pos[f][valid]], np.asarray(batch.input_ids_FT)[f, np.asarray(batch.subject_pos_FS[f])[valid]])
    assert (states[0][0][:, P:] == mask_id).all()


def test_capture_along_sampler_reads_the_samplers_states_fact_major(llada):
    batch, _ = make_batch()
    coordinate = tr.Coordinate(1, 0, "resid", 4)
    keys, deltas, rows = mem.capture(llada, batch, coordinate, jax.random.key(1), sampler_capture=CAPTURE,
                                     noise_samples=2, facts_per_chunk=2)
    # per fact: its tracer entry at k* = 0, then one per sampler step
    assert rows.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and keys.shape == (12, llada.config.d_model)
    tracer_only = mem.capture(llada, batch, coordinate, jax.random.key(1), noise_samples=2)
    np.testing.assert_allclose(keys[::4], tracer_only.keys, atol=1e-6)
    states = mem.sampler_states(llada, batch, CAPTURE)
    for j, k in enumerate(CAPTURE.capture_steps):          # fact 1's entry at step k: its last subject token
        ids, attn, pos, _ = states[k]
        _, acts = activations(llada, jnp.asarray(ids[1:2]), jnp.asarray(attn[1:2]))
        np.testing.assert_allclose(keys[4 + 1 + j], acts["resid"][1, 0, pos[1, 1]], atol=1e-5)
    one_by_one = mem.capture(llada, batch, coordinate, jax.random.key(1), sampler_capture=CAPTURE, noise_samples=2,
                             facts_per_chunk=1)
    for a, b in zip((keys, deltas, rows), one_by_one):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_sampler_captured_gated_memory_fires_on_the_first_generation_step(llada):
    """The sampler's first state is what a generation sees first: every subject key there is a
    stored key (cosine 1), so a gate below 1 passes it."""
    batch, _ = make_batch()
    coordinate = tr.Coordinate(1, 0, "resid", 4)
    spec = mem.MemorySpec(noise_samples=2, key_positions="subject", sampler=CAPTURE)
    record = api.build_memory(llada, None, make_facts(), coordinate, spec)
    n_subject = np.asarray(batch.subject_valid_FS).sum(1)
    assert record.memory.size == (1 + len(CAPTURE.capture_steps)) * n_subject.sum()
    assert record.fact_ids == tuple(np.repeat(make_facts().ids, 4 * n_subject))
    ids, attn, pos, _ = mem.sampler_states(llada, batch, CAPTURE)[0]
    _, (site,) = llada.apply(jnp.asarray(ids), jnp.asarray(attn), capture=(ports.Site(1, "resid"),))
    scores = np.asarray(record.memory.match(site.key))
    for f in range(3):
        valid = np.asarray(batch.subject_valid_FS[f])
        np.testing.assert_allclose(scores[f, pos[f][valid]], 1.0, atol=1e-5)


def test_mentions_are_the_subjects_revealed_copies_in_the_answer(llada, monkeypatch):
    """With mentions, every copy of the subject in the sampler's answer becomes a subject position
    once revealed, is corrupted with the prompt's, and gives an entry per revealed token."""
    batch, prompts = make_batch()
    subject0 = list(np.asarray(batch.input_ids_FT)[0, 2:5])
    fake = np.full((3, 8), 7, np.int32)
    fake[0, 1:4] = subject0                      # fact 0's answer restates its subject at 1..3
    fake[0, 5:8] = subject0                      # and again at 5..7
    order = np.tile(np.array([[0, 0, 1, 1, 2, 2, 3, 3]], np.int32), (3, 1))
    monkeypatch.setattr(capturing.sampler, "sample_jit", lambda *a, **k: (fake, order))
    states = mem.sampler_states(llada, batch, CAPTURE, mentions=True)
    ids, attn, pos, valid = states[3]            # revealed before step 3: answer positions 0..5
    assert pos.shape == valid.shape == (3, 9)
    P = 8
    assert pos[0, 3:9].tolist() == [P + 1, P + 2, P + 3, P + 5, P + 6, P + 7]
    assert valid[0, 3:9].tolist() == [True, True, True, True, False, False]
    assert not valid[1:, 3:].any()
    assert states[0][3][:, 3:].sum() == 0
    capture = mem.SamplerCapture(8, 4, 4, (3,), mentions=True)
    keys, deltas, rows = mem.capture(llada, batch, tr.Coordinate(1, 0, "resid", 4), jax.random.key(0),
                                     sampler_capture=capture, noise_samples=1, positions="subject")
    n = np.asarray(batch.subject_valid_FS).sum(1)
    # per fact: its tracer entries (one per subject token), then the sampler state's, mentions included
    assert rows.tolist() == [0] * (2 * n[0] + 4) + [1] * (2 * n[1]) + [2] * (2 * n[2])
    _, acts = activations(llada, jnp.asarray(ids[:1]), jnp.asarray(attn[:1]))
    np.testing.assert_allclose(keys[2 * n[0]:2 * n[0] + 4], acts["resid"][1, 0, [P + 1, P + 2, P + 3, P + 5]],
                               atol=1e-5)
    no_mentions = dataclasses.replace(capture, mentions=False)
    _, _, rows = mem.capture(llada, batch, tr.Coordinate(1, 0, "resid", 4), jax.random.key(0),
                             sampler_capture=no_mentions, noise_samples=1, positions="subject")
    assert len(rows) == 2 * n.sum()


def test_sampler_capture_survives_save_and_load_and_a_bad_one_is_refused(llada, tmp_path):
    record = api.build_memory(llada, None, make_facts(), tr.Coordinate(1, 0, "resid", 4),
                              mem.MemorySpec(noise_samples=1, sampler=CAPTURE))
    mem.save(record, tmp_path / "m")
    assert mem.load(tmp_path / "m", llada).sampler_capture == CAPTURE
    meta = json.loads((tmp_path / "m" / "memory.json").read_text())
    meta["sampler_capture"]["capture_steps"] = [0, 9]
    (tmp_path / "m" / "memory.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="corrupted: sampler capture steps must be distinct steps in 0..3"):
        mem.load(tmp_path / "m", llada)
    del meta["sampler_capture"]                 # saved before sampler captures existed
    (tmp_path / "m" / "memory.json").write_text(json.dumps(meta))
    assert mem.load(tmp_path / "m", llada).sampler_capture is None


@pytest.mark.parametrize("make, message", [
    (lambda: mem.SamplerCapture(10, 4, 4, (0,)), "gen length 10 is not divisible by block length 4"),
    (lambda: mem.SamplerCapture(8, 3, 4, (0,)), "steps 3 is not divisible by the number of blocks 2"),
    (lambda: mem.SamplerCapture(8, 4, 4, (0, 4)), "sampler capture steps must be distinct steps in 0..3"),
    (lambda: mem.SamplerCapture(8, 4, 4, ()), "sampler capture steps must be distinct steps in 0..3"),
    (lambda: mem.SamplerCapture.evenly(5, gen_length=8, steps=4, block_length=4),
     "number of sampler steps to capture must lie in 1..4"),
])
def test_bad_sampler_captures(make, message):
    with pytest.raises(InputError, match=message):
        make()


def test_evenly_spread_steps_start_at_the_first():
    assert mem.SamplerCapture.evenly(8, gen_length=96, steps=48, block_length=32).capture_steps == (
        0, 6, 12, 18, 24, 30, 36, 42)
    assert mem.SamplerCapture.evenly(3, gen_length=8, steps=4, block_length=4).capture_steps == (0, 1, 2)
