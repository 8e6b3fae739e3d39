"""Edit memory: dual = primal, sparsification, interception = weight edit, incremental insertion
= batch build, removal, persistence (atomic, fingerprinted), no recompilation, bad inputs."""

import dataclasses
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ports
from ports.errors import CheckpointError
from timerome_jax import memory as mem
from timerome_jax import tracing as tr
from timerome_jax.errors import InputError
from timerome_jax.facts import fact_batch
from timerome_jax.memory import capturing

from conftest import activations, random_facts

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def llada(llada_backbone):
    return llada_backbone


def test_dual_form_equals_primal_ridge():
    keys, deltas = random_facts(5)
    m, scale = mem.build(keys, deltas, layer=0, module="mlp", alpha=0.7, lam=0.3)
    lam_t = 0.3 * np.mean(np.sum(keys.astype(np.float64) ** 2, 1))
    assert np.isclose(scale * 0.3, lam_t)
    K, D = keys.T.astype(np.float64), deltas.T.astype(np.float64)  # d_k x n, d x n (DESIGN's layout)
    W = 0.7 * D @ K.T @ np.linalg.inv(K @ K.T + lam_t * np.eye(K.shape[0]))
    np.testing.assert_allclose(m.primal_weight(), W, atol=1e-4)
    x = np.random.default_rng(1).normal(size=(3, 12)).astype(np.float32)
    np.testing.assert_allclose(m.term(jnp.asarray(x)), x @ W.T, atol=1e-4)


def test_q_equal_n_is_no_sparsification_and_q_keeps_top_entries():
    keys, deltas = random_facts(6)
    full, _ = mem.build(keys, deltas, layer=0, module="mlp", alpha=1.0, lam=0.1)
    q6, _ = mem.build(keys, deltas, layer=0, module="mlp", alpha=1.0, lam=0.1, q=6)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 12)), jnp.float32)
    np.testing.assert_array_equal(full.term(x), q6.term(x))
    q2 = mem.with_hyperparameters(full, q=2)
    c_full, c2 = np.asarray(full.coefficients(x)), np.asarray(q2.coefficients(x))
    for row_full, row2 in zip(c_full, c2):
        top = np.argsort(-np.abs(row_full[:6]))[:2]
        assert set(np.flatnonzero(row2)) == set(top)
        np.testing.assert_array_equal(row2[top], row_full[top])


@pytest.mark.parametrize("dk, form", [(32, "dual"), (12, "primal"), (4, "primal")])
def test_incremental_insertion_equals_batch_build(dk, form):
    """11 facts inserted into a 3-fact memory: capacity 8 -> 16. With d_k = 32 it stays dual
    (Schur complements); with d_k = 12 the dual memory becomes primal when it grows past d_k;
    with d_k = 4 it is primal from the start (Sherman–Morrison updates)."""
    keys, deltas = random_facts(11, dk=dk)
    first, scale = mem.build(keys[:3], deltas[:3], layer=1, module="mlp", alpha=0.5, lam=0.2)
    assert first.form == ("primal" if dk < 8 else "dual")
    grown = mem.insert(first, keys[3:], deltas[3:])  # crosses the capacity of 8: one doubling
    batch, _ = mem.build(keys, deltas, layer=1, module="mlp", alpha=0.5, lam=0.2, key_scale=scale)
    assert grown.size == 11 and grown.capacity == batch.capacity == 16 and grown.form == batch.form == form
    np.testing.assert_allclose(grown.readout, batch.readout, atol=1e-4)
    factor = "cholesky" if form == "dual" else "inverse"
    np.testing.assert_allclose(getattr(grown, factor), getattr(batch, factor), rtol=1e-4, atol=1e-4)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(5, dk)), jnp.float32)
    np.testing.assert_allclose(grown.term(x), batch.term(x), atol=1e-4)


@pytest.mark.parametrize("n, dk", [(5, 12), (40, 12), (300, 16)])
def test_primal_and_dual_forms_give_the_same_memory(n, dk):
    """(K Kᵀ + λ̃ I)⁻¹ K = K (Kᵀ K + λ̃ I)⁻¹: the readout, the term and the primal weight agree;
    "auto" picks the smaller system (dual while the capacity is ≤ d_k)."""
    keys, deltas = random_facts(n, dk=dk, d=6, seed=n)
    dual, _ = mem.build(keys, deltas, layer=0, module="mlp", alpha=0.7, lam=0.1, form="dual")
    primal, _ = mem.build(keys, deltas, layer=0, module="mlp", alpha=0.7, lam=0.1, form="primal")
    auto, _ = mem.build(keys, deltas, layer=0, module="mlp", alpha=0.7, lam=0.1)
    assert (dual.form, primal.form) == ("dual", "primal") and primal.cholesky is None and dual.inverse is None
    assert auto.form == ("dual" if auto.capacity <= dk else "primal")
    np.testing.assert_allclose(primal.readout, dual.readout, rtol=1e-3, atol=2e-5)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(7, dk)), jnp.float32)
    np.testing.assert_allclose(primal.term(x), dual.term(x), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(primal.primal_weight(), dual.primal_weight(), rtol=1e-3, atol=1e-4)
    K = keys.astype(np.float64)
    lam_t = 0.1 * np.mean(np.sum(K ** 2, 1))
    np.testing.assert_allclose(primal.inverse, np.linalg.inv(K.T @ K + lam_t * np.eye(dk)), rtol=1e-3, atol=1e-6)
    with pytest.raises(InputError, match="the memory form must be one of auto, dual, primal, got 'qr'"):
        mem.build(keys, deltas, layer=0, module="mlp", alpha=1.0, lam=0.1, form="qr")


def test_primal_memory_removes_and_round_trips(llada, tmp_path):
    keys, deltas = random_facts(20, dk=llada.config.mlp_hidden, d=llada.config.d_model, seed=3)
    m, scale = mem.build(keys, deltas, layer=1, module="mlp", alpha=1.0, lam=0.5, form="primal")
    removed = mem.remove(m, [2, 5])
    keep = [i for i in range(20) if i not in (2, 5)]
    expect, _ = mem.build(keys[keep], deltas[keep], layer=1, module="mlp", alpha=1.0, lam=0.5, key_scale=scale)
    assert removed.form == "primal" and expect.form == "dual"     # capacity 32 ≤ d_k: auto is dual
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, keys.shape[1])), jnp.float32)
    np.testing.assert_allclose(removed.term(x), expect.term(x), rtol=1e-3, atol=1e-4)
    record = mem.MemoryRecord(m, tr.Coordinate(1, 0, "mlp"), 0.5, scale, tuple(map(str, range(20))), llada.fingerprint())
    mem.save(record, tmp_path / "p")
    back = mem.load(tmp_path / "p", llada).memory
    assert back.form == "primal" and back.cholesky is None
    for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)


def test_removing_a_fact_equals_building_without_it():
    keys, deltas = random_facts(7)
    m, scale = mem.build(keys, deltas, layer=0, module="mlp", alpha=1.0, lam=0.5)
    removed = mem.remove(m, [2, 5])
    keep = [0, 1, 3, 4, 6]
    expect, _ = mem.build(keys[keep], deltas[keep], layer=0, module="mlp", alpha=1.0, lam=0.5, key_scale=scale)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 12)), jnp.float32)
    np.testing.assert_allclose(removed.term(x), expect.term(x), atol=1e-5)
    with pytest.raises(InputError, match="positions in 0..6"):
        mem.remove(m, [9])


def test_mlp_memory_through_interception_equals_editing_the_down_projection(llada):
    """Without sparsification the memory adds W h after down_proj at layer ℓ: the same as
    adding Wᵀ to that layer's down-projection kernel in a plain forward."""
    F, D = llada.config.mlp_hidden, llada.config.d_model
    keys, deltas = random_facts(4, dk=F, d=D)
    m, _ = mem.build(keys, deltas, layer=1, module="mlp", alpha=0.8, lam=0.5)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 380, (2, 10)), jnp.int32)
    edited = jax.jit(lambda bb, m, ids: bb.apply(ids, edits=(m,)))(llada, m, ids)
    params = jax.tree.map(lambda x: x, llada.params)
    kernel = params["blocks"]["mlp"]["down_proj"]["kernel"]
    params["blocks"]["mlp"]["down_proj"]["kernel"] = kernel.at[1].add(m.primal_weight().T)
    np.testing.assert_allclose(edited, llada.apply(ids, params=params), atol=1e-4)
    assert np.abs(np.asarray(edited) - np.asarray(llada.logits(ids))).max() > 1e-3


@pytest.mark.parametrize("module", ["attn", "resid", "mlp"])
def test_alpha_zero_is_bit_identical(llada, module):
    dk = {"attn": 64, "resid": 64, "mlp": 128}[module]
    keys, deltas = random_facts(3, dk=dk, d=64)
    m, _ = mem.build(keys, deltas, layer=2, module=module, alpha=0.0, lam=1.0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 380, (1, 9)), jnp.int32)
    out = jax.jit(lambda bb, m, ids: bb.apply(ids, edits=(m,)))(llada, m, ids)
    np.testing.assert_array_equal(out, llada.logits(ids))


def test_new_memory_of_same_capacity_does_not_recompile(llada):
    forward = jax.jit(lambda bb, m, ids: bb.apply(ids, edits=(m,)))
    ids = jnp.zeros((1, 6), jnp.int32)
    for seed, n in [(0, 3), (1, 5), (2, 8)]:
        keys, deltas = random_facts(n, dk=128, d=64, seed=seed)
        m, _ = mem.build(keys, deltas, layer=seed, module="mlp", alpha=1.0 + seed, lam=0.1, q=2)
        jax.block_until_ready(forward(llada, m, ids))
    assert forward._cache_size() == 1


def make_batch():
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 370, 8)), list(rng.integers(0, 370, 6))]
    answers = [list(rng.integers(0, 370, 5)), list(rng.integers(0, 370, 4))]
    return fact_batch(prompts, answers, [(2, 5), (1, 3)], pad_id=378)


@pytest.mark.parametrize("module, dk", [("mlp", 128), ("attn", 64), ("resid", 64)])
def test_capture_shapes_and_zero_noise_zero_delta(llada, module, dk):
    batch = make_batch()
    where = tr.Coordinate(1, 1, module, 8)
    keys, deltas, rows = mem.capture(llada, batch, where, jax.random.key(0), noise_samples=3)
    assert keys.shape == (2, dk) and deltas.shape == (2, 64) and list(rows) == [0, 1]
    assert np.abs(np.asarray(deltas)).max() > 1e-3
    zero = mem.capture(llada, batch, where, jax.random.key(0), noise_samples=2, noise_scale=0.0).deltas
    np.testing.assert_allclose(zero, 0.0, atol=1e-5)


def test_captured_clean_key_is_the_down_projection_input(llada):
    batch = make_batch()
    keys = mem.capture(llada, batch, tr.Coordinate(2, 0, "mlp", 8), jax.random.key(0), noise_samples=1).keys
    # step 0 state = prompt + all-mask answer; recompute the MLP hidden by hand at the last subject token
    ids = np.asarray(batch.input_ids_FT[0]).copy()
    ids[np.asarray(batch.answer_mask_FT[0])] = llada.mask_token_id
    _, acts = activations(llada, jnp.asarray(ids)[None], batch.attention_mask_FT[:1])
    p = jax.tree.map(lambda x: x[2], llada.params["blocks"])
    x = acts["resid"][1, 0, 4]  # input of block 2 at the last subject position (4)
    x = x + acts["attn"][2, 0, 4]
    h = x * jax.lax.rsqrt(jnp.mean(x * x) + 1e-5) * p["mlp_norm"]["scale"]
    hidden = jax.nn.silu(h @ p["mlp"]["gate_proj"]["kernel"]) * (h @ p["mlp"]["up_proj"]["kernel"])
    np.testing.assert_allclose(keys[0], hidden, atol=1e-4)


def record_for(llada, n=3):
    keys, deltas = random_facts(n, dk=128, d=64)
    m, scale = mem.build(keys, deltas, layer=1, module="mlp", alpha=0.5, lam=0.1, q=2)
    return mem.MemoryRecord(m, tr.Coordinate(1, 2, "mlp"), 0.1, scale, tuple(f"f{i}" for i in range(n)),
                            llada.fingerprint())


def test_save_load_round_trip_exact(llada, tmp_path):
    record = record_for(llada)
    mem.save(record, tmp_path / "m")
    loaded = mem.load(tmp_path / "m", llada)
    for a, b in zip(jax.tree.leaves(record.memory), jax.tree.leaves(loaded.memory)):
        np.testing.assert_array_equal(a, b)
    assert (loaded.coordinate, loaded.fact_ids, loaded.lam, loaded.key_scale, loaded.memory.module) == \
        (record.coordinate, record.fact_ids, record.lam, record.key_scale, "mlp")


def test_memory_from_another_model_is_refused(llada, tmp_path):
    record = dataclasses.replace(record_for(llada), fingerprint="0123456789abcdef")
    mem.save(record, tmp_path / "m")
    with pytest.raises(CheckpointError, match="built for model 0123456789abcdef"):
        mem.load(tmp_path / "m", llada)


def test_corrupted_memory_directory(llada, tmp_path):
    mem.save(record_for(llada), tmp_path / "m")
    (tmp_path / "m" / "memory.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="corrupted"):
        mem.load(tmp_path / "m")
    mem.save(record_for(llada), tmp_path / "m2")
    for f in (tmp_path / "m2" / "arrays").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="corrupted or incomplete"):
        mem.load(tmp_path / "m2")
    with pytest.raises(CheckpointError, match="not an edit-memory directory"):
        mem.load(tmp_path)


def test_killed_save_leaves_previous_memory_intact(llada, tmp_path):
    out = tmp_path / "m"
    mem.save(record_for(llada, 3), out)
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import ports
        from timerome_jax import memory as mem
        import test_memory as t
        bb = ports.load_pretrained({str(FIXTURES / 'llada')!r})
        from timerome_jax.memory import storage
        real_save = storage.atomic_directory
        import contextlib
        @contextlib.contextmanager
        def slow(out_dir, overwrite=False):
            with real_save(out_dir, overwrite) as tmp:
                yield tmp
                print("WRITTEN", flush=True)
                time.sleep(60)   # killed here: files written, rename not done
        storage.atomic_directory = slow
        mem.save(t.record_for(bb, 5), {str(out)!r}, overwrite=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITTEN"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert mem.load(out, llada).memory.size == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=-1.0), "alpha"), (dict(lam=0.0), "lambda"), (dict(q=0), "q must lie"), (dict(q=4), "q must lie"),
])
def test_bad_hyperparameters(kwargs, message):
    keys, deltas = random_facts(3)
    args = dict(layer=0, module="mlp", alpha=1.0, lam=0.1) | kwargs
    with pytest.raises(InputError, match=message):
        mem.build(keys, deltas, **args)


def test_empty_fact_set():
    with pytest.raises(InputError, match="at least one fact"):
        mem.build(np.zeros((0, 4)), np.zeros((0, 2)), layer=0, module="mlp", alpha=1.0, lam=0.1)


def test_edited_backbone_runs_the_sampler_and_likelihood_with_the_memory(llada):
    """An edited backbone is a Backbone: method code runs on it unchanged, with the memory on."""
    from timerome_jax import likelihood, sampler

    keys, deltas = random_facts(3, dk=128, d=64)
    m, _ = mem.build(keys, deltas, layer=1, module="mlp", alpha=4.0, lam=0.1)
    edited = llada.with_edits(m)
    assert type(edited) is ports.Backbone and edited.edits == (m,) and llada.edits == ()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 370, (1, 6)), jnp.int32)
    np.testing.assert_array_equal(edited.apply(ids), llada.apply(ids, edits=(m,)))
    assert edited.fingerprint() == llada.fingerprint()     # the weights are untouched
    prompt_mask = jnp.ones_like(ids)
    answer = jnp.asarray([[5, 9, 11, 3]], jnp.int32)
    lp = lambda bb: likelihood.answer_log_likelihood(bb, ids, prompt_mask, answer, jnp.ones_like(answer),
                                                     method="one_step")
    assert not np.allclose(jax.jit(lp)(edited), jax.jit(lp)(llada))
    zero = llada.with_edits(mem.with_hyperparameters(m, alpha=0.0))
    np.testing.assert_array_equal(jax.jit(lp)(zero), jax.jit(lp)(llada))
    out = sampler.sample_jit(edited, ids, prompt_mask, jax.random.key(0), gen_length=4, steps=4, block_length=4)
    assert np.asarray(out).shape == (1, 4)


def test_remove_facts_by_id(llada):
    record = record_for(llada, 4)
    smaller = record.remove_facts(["f1"])
    assert smaller.fact_ids == ("f0", "f2", "f3") and smaller.memory.size == 3
    with pytest.raises(InputError, match="not in this memory: nope"):
        record.remove_facts(["nope"])


def test_edited_backbone_pieces_carry_the_memory(llada):
    keys, deltas = random_facts(3, dk=128, d=64)
    m, _ = mem.build(keys, deltas, layer=1, module="mlp", alpha=3.0, lam=0.1)
    edited = llada.with_edits(m)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 370, (1, 7)), jnp.int32)
    x = edited.embed(ids)
    for i in range(llada.config.n_layers):
        x = edited.layer(x, i)
    np.testing.assert_allclose(edited.head(x), edited.apply(ids), atol=1e-5)


# --- covariance-regularised variant (λ̃ I -> λ̃ C) ------------------------------------------------

def random_moment(dk=12, tokens=40, seed=5):
    x = np.random.default_rng(seed).normal(size=(tokens, dk)) * np.linspace(0.2, 3.0, dk)
    return x.T @ x / tokens


def test_covariance_memory_equals_primal_with_lambda_times_C():
    keys, deltas = random_facts(5)
    moment = random_moment()
    M = mem.whitening_from_moment(moment, shrinkage=0.05)
    C = moment + 0.05 * np.trace(moment) / 12 * np.eye(12)
    np.testing.assert_allclose(np.linalg.inv(M.astype(np.float64).T @ M), C, rtol=1e-4, atol=1e-4)  # C = L Lᵀ
    m, scale = mem.build(keys, deltas, layer=0, module="mlp", alpha=0.7, lam=0.3, whitening=M)
    assert np.isclose(scale, np.mean(np.sum((keys.astype(np.float64) @ M.T) ** 2, 1)), rtol=1e-5)
    K, D = keys.T.astype(np.float64), deltas.T.astype(np.float64)
    W = 0.7 * D @ K.T @ np.linalg.inv(K @ K.T + 0.3 * scale * C)  # DESIGN's primal with λ̃ C for λ̃ I
    np.testing.assert_allclose(m.primal_weight(), W, atol=1e-4)
    plain, _ = mem.build(keys, deltas, layer=0, module="mlp", alpha=0.7, lam=0.3)
    assert np.abs(np.asarray(plain.primal_weight()) - W).max() > 1e-2  # C matters
    identity, _ = mem.build(keys, deltas, layer=0, module="mlp", alpha=0.7, lam=0.3, whitening=np.eye(12))
    np.testing.assert_allclose(identity.primal_weight(), plain.primal_weight(), atol=1e-5)


def test_covariance_memory_insert_and_remove_equal_batch_builds():
    keys, deltas = random_facts(11)
    M = mem.whitening_from_moment(random_moment())
    first, scale = mem.build(keys[:3], deltas[:3], layer=1, module="mlp", alpha=0.5, lam=0.2, whitening=M)
    grown = mem.insert(first, keys[3:], deltas[3:])
    batch, _ = mem.build(keys, deltas, layer=1, module="mlp", alpha=0.5, lam=0.2, key_scale=scale, whitening=M)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 12)), jnp.float32)
    np.testing.assert_allclose(grown.readout, batch.readout, atol=1e-4)
    np.testing.assert_allclose(grown.term(x), batch.term(x), atol=1e-4)
    removed = mem.remove(batch, [2, 5])
    keep = [i for i in range(11) if i not in (2, 5)]
    expect, _ = mem.build(keys[keep], deltas[keep], layer=1, module="mlp", alpha=0.5, lam=0.2, key_scale=scale,
                          whitening=M)
    np.testing.assert_allclose(removed.term(x), expect.term(x), atol=1e-4)


def test_covariance_memory_save_load_round_trip(llada, tmp_path):
    keys, deltas = random_facts(3, dk=128, d=64)
    M = mem.whitening_from_moment(random_moment(dk=128, tokens=300))
    m, scale = mem.build(keys, deltas, layer=1, module="mlp", alpha=0.5, lam=0.1, whitening=M)
    record = mem.MemoryRecord(m, tr.Coordinate(1, 2, "mlp"), 0.1, scale, ("a", "b", "c"), llada.fingerprint())
    mem.save(record, tmp_path / "m")
    loaded = mem.load(tmp_path / "m", llada)
    assert loaded.memory.whitening is not None
    for a, b in zip(jax.tree.leaves(record.memory), jax.tree.leaves(loaded.memory)):
        np.testing.assert_array_equal(a, b)


def test_key_second_moment_equals_hand_computation(llada):
    """Σ x xᵀ over the chosen tokens of the MLP hidden (the down projection's input) at layer 1."""
    rng = np.random.default_rng(7)
    ids = jnp.asarray(rng.integers(2, 380, (3, 9)), jnp.int32)
    attn = jnp.asarray(np.array([[1] * 9, [1] * 7 + [0] * 2, [1] * 9]), jnp.int32)
    take = jnp.asarray(rng.random((3, 9)) < 0.5) & (attn > 0)
    moment = capturing._second_moment(llada, ids, attn, take, jnp.int32(1), module="mlp")
    _, acts = activations(llada, ids, attn)
    p = jax.tree.map(lambda x: x[1], llada.params["blocks"])
    x = acts["resid"][0] + acts["attn"][1]
    h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * p["mlp_norm"]["scale"]
    hidden = np.asarray(jax.nn.silu(h @ p["mlp"]["gate_proj"]["kernel"]) * (h @ p["mlp"]["up_proj"]["kernel"]))
    chosen = hidden[np.asarray(take)]
    np.testing.assert_allclose(moment, chosen.T @ chosen, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("moment,shrinkage,message", [
    (np.ones((3, 4)), 0.01, "square matrix"),
    (np.array([[1.0, 2.0], [0.0, 1.0]]), 0.01, "finite symmetric"),
    (np.eye(3), 0.0, "shrinkage must be a finite number > 0"),
    (np.zeros((3, 3)), 0.01, "no positive trace: no retain keys"),
    (-np.eye(3) * 5 + 0.1, 0.01, "no positive trace"),
])
def test_bad_second_moments(moment, shrinkage, message):
    with pytest.raises(InputError, match=message):
        mem.whitening_from_moment(moment, shrinkage=shrinkage)


def test_whitening_of_the_wrong_width_is_refused():
    keys, deltas = random_facts(3)
    with pytest.raises(InputError, match=r"the whitening must be \[12, 12\]"):
        mem.build(keys, deltas, layer=0, module="mlp", alpha=1.0, lam=0.1, whitening=np.eye(5))


def test_dual_memories_beyond_the_capacity_limit_are_refused_before_any_solve(monkeypatch):
    """A dual capacity past MAX_CAPACITY (whose Gram matrices crashed XLA's CPU Cholesky) is one
    clear error, in a batch build and when insertion would grow the memory past it; the primal
    form (auto's choice there) builds."""
    n = mem.MAX_CAPACITY + 1
    with pytest.raises(InputError, match=f"capacity 32,768 entries .* the limit is {mem.MAX_CAPACITY:,} entries"):
        mem.build(np.ones((n, 2), np.float32), np.ones((n, 2), np.float32), layer=0, module="mlp", alpha=1.0, lam=0.1,
                  form="dual")
    rng = np.random.default_rng(0)
    big, _ = mem.build(rng.normal(size=(n, 2)), rng.normal(size=(n, 2)), layer=0, module="mlp", alpha=1.0, lam=0.1)
    assert big.form == "primal" and big.size == n and big.capacity == 32_768
    monkeypatch.setattr(mem.ridge, "MAX_CAPACITY", 16)
    m, _ = mem.build(rng.normal(size=(16, 40)), rng.normal(size=(16, 4)), layer=0, module="mlp", alpha=1.0, lam=0.1)
    assert m.form == "dual"
    with pytest.raises(InputError, match="capacity 32 entries"):
        mem.insert(m, rng.normal(size=(1, 40)), rng.normal(size=(1, 4)))
