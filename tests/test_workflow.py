"""workflow: the drivers equal the pieces they chain (capture + build, take, whitening)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ports
from timerome_jax import memory as mem
from timerome_jax import tracing, workflow
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
    return workflow.encode(backbone, tokenizer, [parse_fact(r, f"f:{i + 1}") for i, r in enumerate(RECORDS)])


def test_build_memory_equals_capture_then_build(model, facts):
    backbone, _ = model
    c = tracing.Coordinate(1, 1, "mlp")
    record = workflow.build_memory(backbone, facts, c, alpha=0.5, lam=0.2, seed=3, noise_samples=2,
                                   facts_per_chunk=2)
    sigma = tracing.subject_embedding_std(backbone, facts.batch)
    keys, deltas = mem.capture_keys_and_deltas(backbone, facts.batch, sigma, jax.random.key(3), layer=jnp.int32(1),
                                               module="mlp", step=1, noise_samples=2)
    expect, scale = mem.build(keys, deltas, layer=1, module="mlp", alpha=0.5, lam=0.2)
    np.testing.assert_allclose(record.memory.readout, expect.readout, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(record.memory.deltas, expect.deltas, rtol=1e-4, atol=1e-5)
    assert record.fact_ids == ("f:1", "f:2", "f:3") and np.isclose(record.key_scale, scale, rtol=1e-5)
    assert record.fingerprint == backbone.fingerprint()


def test_take_selects_and_renumbers(facts):
    sub = facts.take([2, 0])
    assert sub.fact_ids == ("f:3", "f:1") and sub.num_facts == 2
    np.testing.assert_array_equal(sub.batch.fact_index_F, [0, 1])
    row = np.asarray(facts.batch.input_ids_FT[2])
    n = len(sub.encoded[0].prompt_ids) + len(sub.encoded[0].answer_ids)
    np.testing.assert_array_equal(np.asarray(sub.batch.input_ids_FT[0])[:n], row[:n])
    with pytest.raises(InputError, match="no facts selected"):
        facts.take([])


def test_retain_whitening_is_the_inverse_cholesky_of_the_shrunk_moment(model):
    backbone, tokenizer = model
    retain = [parse_fact(r, f"r:{i}") for i, r in enumerate(RECORDS)]
    c = tracing.Coordinate(0, 0, "resid")
    M, info = workflow.retain_whitening(backbone, tokenizer, retain, c, shrinkage=0.1, rows_per_chunk=4)
    assert M.shape == (backbone.config.d_model,) * 2 and info["retain_facts"] == 3 and info["tokens"] > 0
    C = np.linalg.inv(M.astype(np.float64).T @ M.astype(np.float64))   # = moment + 0.1 tr/d I
    shrink = C - 0.1 * info["mean_key_norm_sq"] / M.shape[0] * np.eye(M.shape[0])
    assert np.isclose(np.trace(shrink), info["mean_key_norm_sq"], rtol=1e-3)
    with pytest.raises(InputError, match="need retain facts"):
        workflow.retain_whitening(backbone, tokenizer, [], c)
