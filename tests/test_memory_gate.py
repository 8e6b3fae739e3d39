"""Gated memories, capture at several denoising steps, and the K of a coordinate."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ports
from timerome_jax import api
from timerome_jax import memory as mem
from timerome_jax import tracing as tr
from timerome_jax.errors import CheckpointError, InputError
from timerome_jax.facts import Fact, Facts, fact_batch
from timerome_jax.memory import capturing

from conftest import activations, random_facts


@pytest.fixture(scope="module")
def llada(llada_backbone):
    return llada_backbone


def cosine_to_nearest(x, keys):
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    k = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    return (x @ k.T).max(-1)


def test_match_is_the_cosine_with_the_nearest_stored_key():
    keys, deltas = random_facts(5)
    m, _ = mem.build(keys, deltas, layer=0, module="mlp", alpha=1.0, lam=0.1)  # capacity 8: 3 invalid rows
    x = np.random.default_rng(3).normal(size=(2, 4, 12)).astype(np.float32)
    np.testing.assert_allclose(m.match(jnp.asarray(x)), cosine_to_nearest(x, keys), atol=1e-5)
    W = np.random.default_rng(4).normal(size=(12, 12)).astype(np.float32)
    w, _ = mem.build(keys, deltas, layer=0, module="mlp", alpha=1.0, lam=0.1, whitening=W)
    np.testing.assert_allclose(w.match(jnp.asarray(x)), cosine_to_nearest(x @ W.T, keys @ W.T), atol=1e-5)


def test_gated_term_is_the_plain_term_where_the_match_passes_and_zero_elsewhere():
    keys, deltas = random_facts(5)
    plain, _ = mem.build(keys, deltas, layer=0, module="mlp", alpha=0.8, lam=0.1, q=3)
    rng = np.random.default_rng(5)
    x = np.concatenate([keys[:2] + 0.01 * rng.normal(size=(2, 12)), rng.normal(size=(6, 12))]).astype(np.float32)
    tau = 0.9
    gated = mem.with_gate(plain, tau)
    passes = cosine_to_nearest(x, keys) >= tau
    assert passes[:2].all() and not passes.all()  # near-copies of stored keys pass, random keys do not
    expected = np.where(passes[:, None], np.asarray(plain.term(jnp.asarray(x))), 0.0)
    np.testing.assert_allclose(gated.term(jnp.asarray(x)), expected, atol=1e-6)
    # the lowest gate passes everything: the paper's memory, bit for bit
    np.testing.assert_array_equal(mem.with_gate(plain, -1.0).term(jnp.asarray(x)), plain.term(jnp.asarray(x)))
    assert mem.with_gate(gated, None).gate is None
    # a call where no token passes skips the read-out (lax.cond): exact zeros, jitted or not, and
    # the same gated memory still edits a call that has one passing token
    term = jax.jit(lambda m, x: m.term(x))
    none_pass = jnp.asarray(x[2:][~passes[2:]])
    np.testing.assert_array_equal(term(gated, none_pass), np.zeros((none_pass.shape[0], 6), np.float32))
    np.testing.assert_allclose(term(gated, jnp.asarray(x)), expected, atol=1e-6)


def test_gate_survives_insert_remove_and_save_load(llada, tmp_path):
    keys, deltas = random_facts(4, dk=128, d=64)
    m, scale = mem.build(keys[:3], deltas[:3], layer=1, module="mlp", alpha=0.5, lam=0.1)
    m = mem.with_gate(m, 0.3)
    grown = mem.insert(m, keys[3:], deltas[3:])
    assert float(grown.gate) == pytest.approx(0.3) and float(mem.remove(grown, [0]).gate) == pytest.approx(0.3)
    record = mem.MemoryRecord(grown, tr.Coordinate(1, 2, "mlp", 4), 0.1, scale, ("a", "a", "b", "b"),
                              llada.fingerprint(), capture_steps=(1, 2))
    mem.save(record, tmp_path / "m")
    loaded = mem.load(tmp_path / "m", llada)
    for a, b in zip(jax.tree.leaves(record.memory), jax.tree.leaves(loaded.memory)):
        np.testing.assert_array_equal(a, b)
    assert loaded.capture_steps == (1, 2) and loaded.coordinate == tr.Coordinate(1, 2, "mlp", 4)
    # removing a fact id removes all of its entries
    assert loaded.remove_facts(["a"]).memory.size == 2


def test_gate_for_rate_is_the_upper_quantile():
    scores = np.linspace(-1, 1, 1001)
    tau = mem.gate_for_rate(scores, 0.1)
    assert np.mean(scores >= tau) == pytest.approx(0.1, abs=2e-3)


@pytest.mark.parametrize("call, message", [
    (lambda m: mem.with_gate(m, 1.5), "cosine threshold in [-1, 1]"),
    (lambda m: mem.with_gate(m, float("nan")), "cosine threshold in [-1, 1]"),
    (lambda m: mem.gate_for_rate(np.ones(3), 0.0), "fraction in (0, 1)"),
    (lambda m: mem.gate_for_rate(np.ones(0), 0.5), "no retain keys"),
])
def test_bad_gates(call, message):
    m, _ = mem.build(*random_facts(2), layer=0, module="mlp", alpha=1.0, lam=0.1)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        call(m)


def test_coordinate_step_must_lie_in_its_trajectory():
    assert tr.Coordinate(0, 7, "mlp").steps == 8
    with pytest.raises(InputError, match="step 3 is outside 0..2"):
        tr.Coordinate(0, 3, "mlp", 3)


def make_batch():
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 370, 8)), list(rng.integers(0, 370, 6))]
    answers = [list(rng.integers(0, 370, 6)), list(rng.integers(0, 370, 4))]
    return fact_batch(prompts, answers, [(2, 5), (1, 3)], pad_id=378)


def make_facts() -> Facts:
    """make_batch's facts as an encoded set (ids 'a', 'b')."""
    batch = make_batch()
    ids, ans = np.asarray(batch.input_ids_FT), np.asarray(batch.answer_mask_FT)
    lengths = np.asarray(batch.attention_mask_FT).sum(1)
    prompts = tuple(tuple(int(t) for t in ids[f, :lengths[f]][~ans[f, :lengths[f]]]) for f in range(2))
    answers = tuple(tuple(int(t) for t in ids[f, :lengths[f]][ans[f, :lengths[f]]]) for f in range(2))
    facts = (Fact("p a", "a", where="a"), Fact("p b", "a", where="b"))
    return Facts(facts, ("s", "s"), prompts, answers, ((2, 5), (1, 3)), 378)


def test_captured_key_at_step_k_reads_the_tracers_state_x_k(llada):
    """The key at step 1 of a 4-step trajectory is read from the tracer's x_1 (6 answer tokens,
    revealed 2, 2, 1, 1: 4 still masked), not from the last state of a 2-step one (3 masked)."""
    batch = make_batch()
    keys = mem.capture(llada, batch, tr.Coordinate(1, 1, "resid", 4), jax.random.key(0), noise_samples=1).keys
    states, masked, _, _ = tr.clean_run(llada, batch.input_ids_FT[0], batch.attention_mask_FT[0],
                                        batch.answer_mask_FT[0], batch.subject_pos_FS[0], 4)
    assert int(jnp.sum(masked[1])) == 4
    _, acts = activations(llada, states[1][None], batch.attention_mask_FT[:1])
    np.testing.assert_allclose(keys[0], acts["resid"][1, 0, 4], atol=1e-5)
    with pytest.raises(InputError, match=r"capture steps must lie in 0..3, got \[4\]"):
        mem.capture(llada, batch, tr.Coordinate(1, 1, "resid", 4), jax.random.key(0), steps=(4,), noise_samples=1)


def test_capture_at_steps_is_fact_major_and_equals_single_step_captures(llada):
    batch = make_batch()
    c = tr.Coordinate(1, 0, "attn", 4)
    keys, deltas, rows = mem.capture(llada, batch, c, jax.random.key(2), steps=(0, 3), noise_samples=2)
    assert rows.tolist() == [0, 0, 1, 1]
    for j, k in enumerate((0, 3)):
        one_k, one_d, one_rows = mem.capture(llada, batch, dataclasses.replace(c, step=k), jax.random.key(2),
                                             noise_samples=2)
        np.testing.assert_allclose(keys[j::2], one_k, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(deltas[j::2], one_d, rtol=1e-6, atol=1e-6)
        assert one_rows.tolist() == [0, 1]
    with pytest.raises(InputError, match="capture steps must be distinct steps in 0..3"):
        mem.MemorySpec(capture_steps=(0, 4)).steps_for(c)
    with pytest.raises(InputError, match="capture steps must be distinct"):
        mem.MemorySpec(capture_steps=(0, 0))


class _Tokenizer:
    """Whitespace tokens -> ids < 370 (the fixture's vocabulary), enough for retain rows."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (sum(map(ord, w)) % 360) for w in text.split()]}

    pad_token_id = 378
    eos_token_id = None


def test_retain_gate_edits_the_requested_share_of_retain_tokens(llada):
    keys, deltas = random_facts(3, dk=64, d=64)
    m, _ = mem.build(keys, deltas, layer=1, module="resid", alpha=1.0, lam=0.1)
    retain = [Fact(f"what is item {i} of the list", f"item {i} is a small red box", where=f"r:{i}", kind="question")
              for i in range(6)]
    tau, info = mem.retain_gate(llada, _Tokenizer(), retain, m, pad_id=378, rate=0.2)
    ids, attn = capturing.retain_rows(llada, _Tokenizer(), retain, pad_id=378)
    _, (site,) = llada.apply(jnp.asarray(ids), jnp.asarray(attn), capture=(ports.Site(1, "resid"),))
    scores = np.asarray(m.match(site.key))[attn.astype(bool)]     # the match of every real retain token
    assert info["tokens"] == scores.size and np.mean(scores >= tau) == pytest.approx(0.2, abs=0.03)


def test_retain_rows_cover_every_token_at_every_reveal_level(llada):
    """The gate and C are statistics over what the memory sees: every token (prompt included) of
    each fact at each reveal level, from all-masked to all-visible answers, reproducibly."""
    tok = _Tokenizer()
    retain = [Fact("what is item one", "item one is a small red box", where="r:0", kind="question"),
              Fact("what is item two of it", "a big blue one", where="r:1", kind="question")]
    ids, attn = capturing.retain_rows(llada, tok, retain, pad_id=378)
    take = attn.astype(bool)
    levels = capturing.RETAIN_REVEAL_LEVELS
    assert ids.shape[0] == len(retain) * len(levels)
    mask_id = llada.mask_token_id
    for f, fact in enumerate(retain):
        prompt, answer = (len(tok(t)["input_ids"]) for t in fact.texts())
        rows = ids[f * len(levels):(f + 1) * len(levels)]
        visible = [(rows[j, prompt:prompt + answer] != mask_id).sum() for j in range(len(levels))]
        assert visible == [round(level * answer) for level in levels]
        assert (rows[:, :prompt] == rows[0, :prompt]).all() and (rows[:, :prompt] != mask_id).all()
        assert take[f * len(levels):(f + 1) * len(levels), :prompt].all()   # prompt tokens of masked rows too
    np.testing.assert_array_equal(ids, capturing.retain_rows(llada, tok, retain, pad_id=378)[0])
    assert not np.array_equal(ids, capturing.retain_rows(llada, tok, retain, pad_id=378, seed=1)[0])


def test_subject_positions_capture_every_subject_token_and_the_last_is_the_papers(llada):
    """positions="subject" gives one entry per subject token (2..4 and 1..2 here, so 3 + 2); the
    entry at the last subject token is exactly the paper's single entry; entries stay fact-major
    over steps, and the memory's fact ids repeat per entry."""
    batch = make_batch()
    c = tr.Coordinate(1, 0, "resid", 4)
    last_k, last_d, _ = mem.capture(llada, batch, c, jax.random.key(0), noise_samples=2)
    all_k, all_d, rows = mem.capture(llada, batch, c, jax.random.key(0), noise_samples=2, positions="subject")
    n_subject = np.asarray(batch.subject_valid_FS).sum(1)
    assert rows.tolist() == [0] * n_subject[0] + [1] * n_subject[1]
    last = np.cumsum(n_subject) - 1       # each fact's last subject entry
    np.testing.assert_allclose(all_k[last], last_k, atol=1e-6)
    np.testing.assert_allclose(all_d[last], last_d, atol=1e-6)
    keys, deltas, rows = mem.capture(llada, batch, c, jax.random.key(0), steps=(0, 2), noise_samples=2,
                                     positions="subject")
    assert rows.tolist() == [0] * (2 * n_subject[0]) + [1] * (2 * n_subject[1])
    spec = mem.MemorySpec(capture_steps=(0, 2), key_positions="subject", noise_samples=2)
    record = api.build_memory(llada, _Tokenizer(), make_facts(), c, spec)
    facts = make_facts()
    assert record.fact_ids == (facts.ids[0],) * (2 * n_subject[0]) + (facts.ids[1],) * (2 * n_subject[1])
    assert record.memory.size == len(keys) and record.key_positions == "subject"
    with pytest.raises(InputError, match="key positions must be one of last, subject"):
        mem.MemorySpec(key_positions="all")


def test_key_positions_survive_save_and_load(llada, tmp_path):
    keys, deltas = random_facts(3, dk=64, d=64)
    m, scale = mem.build(keys, deltas, layer=1, module="resid", alpha=1.0, lam=0.1)
    record = mem.MemoryRecord(m, tr.Coordinate(1, 0, "resid", 4), 0.1, scale, ("a", "a", "b"), llada.fingerprint(),
                              (0,), "subject")
    mem.save(record, tmp_path / "m")
    assert mem.load(tmp_path / "m", llada).key_positions == "subject"
    meta = json.loads((tmp_path / "m" / "memory.json").read_text())
    del meta["key_positions"]                     # saved before key positions were recorded
    (tmp_path / "m" / "memory.json").write_text(json.dumps(meta))
    assert mem.load(tmp_path / "m", llada).key_positions == "last"
    meta["key_positions"] = "middle"
    (tmp_path / "m" / "memory.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="corrupted: key_positions 'middle'"):
        mem.load(tmp_path / "m", llada)
