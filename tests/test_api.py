"""api: the drivers equal the pieces they chain (capture + build, take, whitening, extend)."""

import jax
import numpy as np
import pytest

import ports
from timerome_jax import api
from timerome_jax import memory as mem
from timerome_jax import tracing
from timerome_jax.errors import InputError
from timerome_jax.facts import parse_fact
from timerome_jax.tokenization import backbone_tokenizer

RECORDS = [
    {"question": "who wrote the book about the old city ?", "answer": "the author was born", "subject": "the old city"},
    {"prompt": "the cat sat on the", "subject": "the cat", "target": "mat"},
    {"question": "which language does the author speak at home ?", "answer": "the author speaks", "subject": "the author"},
]


@pytest.fixture(scope="module")
def model(tiny_model_dir_with_tokenizer):
    backbone = ports.load_pretrained(tiny_model_dir_with_tokenizer)
    return backbone, backbone_tokenizer(backbone)


@pytest.fixture(scope="module")
def facts(model):
    backbone, tokenizer = model
    return api.encode(backbone, tokenizer, [parse_fact(r, f"f:{i + 1}") for i, r in enumerate(RECORDS)])


def test_build_memory_equals_capture_then_build(model, facts):
    backbone, tokenizer = model
    c = tracing.Coordinate(1, 1, "mlp")
    record = api.build_memory(backbone, tokenizer, facts, c, mem.MemorySpec(alpha=0.5, lam=0.2, noise_samples=2),
                              seed=3, facts_per_chunk=2)
    keys, deltas, _ = mem.capture(backbone, facts.batch, c, jax.random.key(3), noise_samples=2)
    expect, scale = mem.build(keys, deltas, layer=1, module="mlp", alpha=0.5, lam=0.2)
    np.testing.assert_allclose(record.memory.readout, expect.readout, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(record.memory.deltas, expect.deltas, rtol=1e-4, atol=1e-5)
    assert record.fact_ids == facts.ids and np.isclose(record.key_scale, scale, rtol=1e-5)
    assert facts.wheres == ("f:1", "f:2", "f:3") and len(set(facts.ids)) == 3
    assert record.fingerprint == backbone.fingerprint()


def test_take_selects_and_renumbers(facts):
    sub = facts.take([2, 0])
    assert sub.wheres == ("f:3", "f:1") and sub.ids == (facts.ids[2], facts.ids[0]) and sub.num_facts == 2
    assert sub.subjects == ("the author", "the old city")
    np.testing.assert_array_equal(sub.batch.fact_index_F, [0, 1])
    row = np.asarray(facts.batch.input_ids_FT[2])
    n = len(sub.prompts[0]) + len(sub.answers[0])
    np.testing.assert_array_equal(np.asarray(sub.batch.input_ids_FT[0])[:n], row[:n])
    with pytest.raises(InputError, match="no facts selected"):
        facts.take([])


def test_retain_whitening_is_the_inverse_cholesky_of_the_shrunk_moment(model):
    backbone, tokenizer = model
    retain = [parse_fact(r, f"r:{i}") for i, r in enumerate(RECORDS)]
    c = tracing.Coordinate(0, 0, "resid")
    M, info = mem.retain_whitening(backbone, tokenizer, retain, c, pad_id=378, shrinkage=0.1, rows_per_chunk=4)
    assert M.shape == (backbone.config.d_model,) * 2 and info["retain_facts"] == 3 and info["tokens"] > 0
    C = np.linalg.inv(M.astype(np.float64).T @ M.astype(np.float64))   # = moment + 0.1 tr/d I
    shrink = C - 0.1 * info["mean_key_norm_sq"] / M.shape[0] * np.eye(M.shape[0])
    assert np.isclose(np.trace(shrink), info["mean_key_norm_sq"], rtol=1e-3)
    with pytest.raises(InputError, match="need retain facts"):
        mem.retain_whitening(backbone, tokenizer, [], c, pad_id=378)


def test_extend_memory_equals_inserting_the_captured_entries(model, facts):
    """Appending facts captures them as the memory's own were (its coordinate, steps, positions)
    and inserts them one update each; appending one already in the memory is refused."""
    backbone, tokenizer = model
    c = tracing.Coordinate(0, 1, "resid", 2)
    spec = mem.MemorySpec(capture_steps="all", noise_samples=2)
    first = api.build_memory(backbone, tokenizer, facts.take([0, 1]), c, spec, seed=4)
    grown = api.extend_memory(backbone, first, facts.take([2]), seed=4, noise_samples=2)
    keys, deltas, _ = mem.capture(backbone, facts.take([2]).batch, c, jax.random.key(4), steps=(0, 1), noise_samples=2)
    expect = mem.insert(first.memory, keys, deltas)
    np.testing.assert_allclose(grown.memory.readout, expect.readout, rtol=1e-5, atol=1e-6)
    assert grown.fact_ids == tuple(i for i in facts.ids for _ in (0, 1)) and grown.capture_steps == (0, 1)
    with pytest.raises(InputError, match=f"already in the memory: f:1 \\({facts.ids[0]}\\)"):
        api.extend_memory(backbone, grown, facts.take([0]))
    # the same fact read from another file (another 'where') is the same fact
    moved = api.encode(backbone, tokenizer, [parse_fact(RECORDS[0], "elsewhere.jsonl:9")])
    with pytest.raises(InputError, match="already in the memory: elsewhere.jsonl:9"):
        api.extend_memory(backbone, grown, moved)


def test_build_memory_refuses_a_gate_rate_without_gate_facts_and_q_beyond_the_entries(model, facts):
    backbone, tokenizer = model
    c = tracing.Coordinate(0, 0, "resid", 2)
    with pytest.raises(InputError, match="gate rate and gate facts go together"):
        api.build_memory(backbone, tokenizer, facts, c, mem.MemorySpec(gate_rate=0.1))
    with pytest.raises(InputError, match=r"q must lie in 1..n = 1..3"):
        api.build_memory(backbone, tokenizer, facts, c, mem.MemorySpec(q=4))
