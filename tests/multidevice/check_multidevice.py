"""Sharded loading, data-parallel tracing, edits and scoring on 8 CPU devices.

Not collected by the ordinary `pytest` run (the file name does not start with `test_`): the 8
devices must exist before JAX starts its backend, so `tests/test_sharding.py` runs this file in a
fresh process:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m pytest tests/multidevice -o python_files='check_*.py' -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

import ports
from ports import checkpoint, sharding
from timerome_jax import api, cli, distributed, likelihood, tracing
from timerome_jax import memory as mem

if jax.device_count() != 8:  # fail loudly: these checks mean nothing on one device
    raise RuntimeError(f"tests/multidevice needs 8 devices, found {jax.device_count()}: run it with "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_sharding.py does)")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TOL = dict(rtol=1e-5, atol=1e-5)


def on_mesh(family: str, profile: str) -> ports.Backbone:
    mesh = sharding.make_mesh(profile)
    return ports.load_pretrained(FIXTURES / family, mesh=mesh, rules=sharding.rules_for(profile))


@pytest.fixture(scope="module")
def reference():
    """Unsharded (one device) backbones, loaded once."""
    cache = {}

    def get(family: str) -> ports.Backbone:
        if family not in cache:
            cache[family] = ports.load_pretrained(FIXTURES / family)
        return cache[family]

    return get


def specs_of(params) -> dict[str, P]:
    return {"/".join(str(k.key) for k in path): leaf.sharding.spec
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def assert_same_values(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def token_batch(seed: int, rows: int = 2, length: int = 12) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 370, (rows, length)), jnp.int32)


# --- sharded loading and forward ------------------------------------------------------------------

# LLaDA (the dense layout MMaDA shares), Dream (GQA, q/k/v biases, shifted logits, the Llama key
# layout DiffuLLaMA shares) and LLaDA-MoE (experts split over 'model'), each with padding.
@pytest.mark.parametrize("family,profile", [("llada", "dp2tp4"), ("dream", "dp2tp4"), ("llada_moe", "tp8")])
def test_sharded_forward_equals_unsharded(family, profile, reference):
    ref = reference(family)
    bb = on_mesh(family, profile)
    assert_same_values(bb.params, ref.params)  # loading is exact, only placement differs
    mesh = sharding.make_mesh(profile)
    expected = sharding.param_specs(ref.config, mesh, sharding.rules_for(profile))
    assert specs_of(bb.params) == specs_of_tree(expected)
    for leaf in jax.tree.leaves(bb.params):  # every device holds exactly its block, nothing more
        assert leaf.sharding.mesh.shape == mesh.shape
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        assert all(s.data.shape == shard_shape for s in leaf.addressable_shards)
    ids = token_batch(1)
    mask = jnp.ones_like(ids).at[1, :3].set(0)  # padding exercises each family's convention
    np.testing.assert_allclose(np.asarray(bb.logits(ids, mask)), np.asarray(ref.logits(ids, mask)), **TOL)


def specs_of_tree(spec_tree) -> dict[str, P]:
    flat = jax.tree_util.tree_leaves_with_path(spec_tree, is_leaf=lambda x: isinstance(x, P))
    return {"/".join(str(k.key) for k in path): spec for path, spec in flat}


def test_tensor_parallel_placement_follows_the_rules():
    """tp8 on the tiny fixtures: 4 heads do not split 8 ways (replicated), the MLP width, the
    vocabulary and the experts do; an expert's own MLP width stays whole ('model' is taken)."""
    dense = specs_of(on_mesh("llada", "tp8").params)
    assert dense["blocks/attn/q_proj/kernel"] == P()
    assert dense["blocks/mlp/gate_proj/kernel"] == P(None, None, "model")
    assert dense["blocks/mlp/down_proj/kernel"] == P(None, "model")
    assert dense["embed/embedding"] == P("model")
    assert dense["lm_head/kernel"] == P(None, "model")
    moe = specs_of(on_mesh("llada_moe", "tp8").params)
    assert moe["blocks/mlp/gate_proj"] == P(None, "model")
    assert moe["blocks/mlp/down_proj"] == P(None, "model")
    assert moe["blocks/mlp/router/kernel"] == P(None, None, "model")
    hybrid = specs_of(on_mesh("dream", "dp2tp4").params)
    assert hybrid["blocks/attn/q_proj/kernel"] == P(None, None, "model")  # 4 heads over 4
    assert hybrid["blocks/attn/k_proj/kernel"] == P()  # 2 kv heads do not split 4 ways
    assert hybrid["blocks/attn/q_proj/bias"] == P(None, "model")


def test_multishard_checkpoint_streams_onto_the_mesh(tmp_path, reference):
    tensors = load_file(FIXTURES / "llada" / "model.safetensors")
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[:9], keys[9:20], keys[20:])):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: tensors[k] for k in part}, tmp_path / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(FIXTURES / "llada" / "config.json", tmp_path / "config.json")
    mesh = sharding.make_mesh("dp2tp4")
    bb = ports.load_pretrained(tmp_path, mesh=mesh, rules=sharding.rules_for("dp2tp4"), dtype=jnp.bfloat16)
    ref = reference("llada")
    for x, y in zip(jax.tree.leaves(bb.params), jax.tree.leaves(ref.params)):
        assert x.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y.astype(jnp.bfloat16)))


def test_save_on_one_mesh_restore_on_another(tmp_path, reference):
    source = on_mesh("llada_moe", "dp2tp4")
    raw = checkpoint.read_config_json(FIXTURES / "llada_moe")
    out = tmp_path / "converted"
    out.mkdir()
    checkpoint.save_converted(out, source.params, raw, {"family": "llada_moe", "dtype": "float32",
                                                        "mask_token_id": source.mask_token_id})
    ref = reference("llada_moe")
    for profile in ("tp8", "dp8"):
        mesh = sharding.make_mesh(profile)
        restored = ports.load_pretrained(out, mesh=mesh, rules=sharding.rules_for(profile))
        assert_same_values(restored.params, ref.params)
        assert specs_of(restored.params) == specs_of_tree(
            sharding.param_specs(ref.config, mesh, sharding.rules_for(profile)))
        assert {d.id for leaf in jax.tree.leaves(restored.params) for d in leaf.sharding.device_set} == set(range(8))
    single = ports.load_pretrained(out)
    assert_same_values(single.params, ref.params)
    assert single.fingerprint() == ref.fingerprint() == source.fingerprint()


# --- data-parallel tracing, edits and scoring (API and command line) -----------------------------
# The API checks and the command-line checks share one model directory, one fact file and one
# mesh profile, so the command line reuses the API checks' compilations.

FACTS = [
    {"question": "who wrote the book about the old city ?", "answer": "the author was born", "subject": "the old city"},
    {"prompt": "the cat sat on the", "subject": "the cat", "target": "mat"},
    {"question": "which language does the author speak at home ?", "answer": "the author speaks", "subject": "the author"},
]
PROFILE = "dp2tp4"  # facts over 2 data shards, each 4-way tensor parallel
STEPS, DRAWS, SEED, PER_CHUNK = 2, 2, 0, 2
COORDINATE = dict(layer=1, module="mlp", step=1)


@pytest.fixture(scope="module")
def setting(tiny_model_dir_with_tokenizer, tmp_path_factory):
    """(model dir, facts file, unsharded backbone, sharded backbone, mesh, encoded FactBatch)."""
    facts = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    model = tiny_model_dir_with_tokenizer
    single = ports.load_pretrained(model)
    mesh = sharding.make_mesh(PROFILE)
    sharded = ports.load_pretrained(model, mesh=mesh, rules=sharding.rules_for(PROFILE))
    batch = api.encode(single, api.tokenizer(single), api.read_facts(facts)).batch
    return model, facts, single, sharded, mesh, batch


@pytest.fixture(scope="module")
def single_device_grid(setting):
    _, _, single, _, _, batch = setting
    config = tracing.TraceConfig(steps=STEPS, noise_samples=DRAWS)
    return tracing.trace(single, batch, config, jax.random.key(SEED), facts_per_chunk=PER_CHUNK)


def test_data_parallel_grid_equals_single_device(setting, single_device_grid):
    """3 facts over a 2-way 'data' axis (one filler row), each replica 4-way tensor parallel."""
    _, _, _, sharded, mesh, batch = setting
    single, sigma_1 = single_device_grid.result, single_device_grid.sigma
    config = tracing.TraceConfig(steps=STEPS, noise_samples=DRAWS)
    traced = tracing.trace(sharded, batch, config, jax.random.key(SEED), facts_per_chunk=PER_CHUNK, mesh=mesh)
    parallel, sigma_8 = traced.result, traced.sigma
    assert sigma_8 == pytest.approx(sigma_1, rel=1e-6)
    assert parallel.tie.shape == single.tie.shape == (3, STEPS, 3, 3)
    for name in ("tie", "clean_lp", "corrupted_lp", "patched_lp"):
        np.testing.assert_allclose(getattr(parallel, name), getattr(single, name), **TOL, err_msg=name)
    assert np.abs(single.tie).max() > 1e-3  # the grid is not trivially zero


@pytest.mark.parametrize("method", ["atp", "hybrid"])
def test_attribution_and_hybrid_grids_on_a_mesh_equal_single_device(setting, method):
    """The estimate (one backward per fact, step and draw) and the hybrid's confirmation shard
    over facts like the exact grid."""
    _, _, single_bb, sharded, mesh, batch = setting
    config = tracing.TraceConfig(steps=STEPS, noise_samples=DRAWS, method=method, confirm_top=2)
    single = tracing.trace(single_bb, batch, config, jax.random.key(SEED), facts_per_chunk=PER_CHUNK).result
    parallel = tracing.trace(sharded, batch, config, jax.random.key(SEED), facts_per_chunk=PER_CHUNK, mesh=mesh).result
    for name in ("tie", "corrupted_lp", "estimated_tie"):
        np.testing.assert_allclose(getattr(parallel, name), getattr(single, name), **TOL, err_msg=name)
    if method == "hybrid":
        np.testing.assert_array_equal(parallel.confirmed, single.confirmed)
    assert np.abs(single.estimated_tie).max() > 1e-3


@pytest.fixture(scope="module")
def single_device_memory(setting):
    _, _, single, _, _, batch = setting
    keys, deltas, _ = mem.capture(single, batch, tracing.Coordinate(steps=STEPS, **COORDINATE), jax.random.key(SEED),
                                  noise_samples=DRAWS, facts_per_chunk=PER_CHUNK)
    memory, _ = mem.build(keys, deltas, layer=COORDINATE["layer"], module=COORDINATE["module"], alpha=1.0, lam=0.1)
    return keys, deltas, memory


def test_memory_built_on_sharded_model_equals_unsharded(setting, single_device_memory):
    _, _, single, sharded, mesh, batch = setting
    keys_1, deltas_1, m1 = single_device_memory
    keys_8, deltas_8, _ = mem.capture(sharded, batch, tracing.Coordinate(steps=STEPS, **COORDINATE),
                                      jax.random.key(SEED), noise_samples=DRAWS, facts_per_chunk=PER_CHUNK, mesh=mesh)
    np.testing.assert_allclose(keys_8, keys_1, **TOL)
    np.testing.assert_allclose(deltas_8, deltas_1, **TOL)
    m8, _ = mem.build(keys_8, deltas_8, layer=COORDINATE["layer"], module=COORDINATE["module"], alpha=1.0, lam=0.1)
    assert m8.form == m1.form
    for name in ("keys", "deltas", "readout", "cholesky" if m1.form == "dual" else "inverse"):
        np.testing.assert_allclose(np.asarray(getattr(m8, name)), np.asarray(getattr(m1, name)), rtol=1e-4,
                                   atol=1e-5, err_msg=name)
    ids = token_batch(2)
    edited_1 = np.asarray(single.with_edits(m1).logits(ids))
    edited_8 = np.asarray(sharded.with_edits(distributed.replicate(m8, mesh)).logits(ids))  # on the sharded model
    np.testing.assert_allclose(edited_8, edited_1, rtol=1e-4, atol=1e-4)
    assert np.abs(edited_1 - np.asarray(single.logits(ids))).max() > 1e-4  # the memory does change it


def test_cli_trace_and_edit_with_mesh_equal_single_device(setting, single_device_grid, single_device_memory,
                                                          tmp_path):
    model, facts, *_ = setting
    common = ["--model", str(model), "--facts", str(facts), "--steps", str(STEPS), "--noise-samples",
              str(DRAWS), "--facts-per-chunk", str(PER_CHUNK), "--seed", str(SEED), "--mesh", PROFILE]
    assert cli.main(["trace", *common, "--out", str(tmp_path / "trace")]) == 0
    traced = np.load(tmp_path / "trace" / "tie.npz")
    single = single_device_grid.result
    for name in ("tie", "clean_lp", "corrupted_lp", "patched_lp"):
        np.testing.assert_allclose(traced[name], getattr(single, name), **TOL, err_msg=name)
    summary = json.loads((tmp_path / "trace" / "summary.json").read_text())
    expected = tracing.select_coordinate(single.tie, ports.MODULES)
    assert summary["coordinate"] == expected.as_dict()

    c = COORDINATE
    assert cli.main(["edit", "--paper", *common, "--coordinate", f"{c['layer']},{c['module']},{c['step']}",
                     "--out", str(tmp_path / "memory")]) == 0
    record = mem.load(tmp_path / "memory", setting[2])  # fingerprint matches the unsharded model
    _, _, m1 = single_device_memory
    for name in ("keys", "deltas", "readout"):
        np.testing.assert_allclose(np.asarray(getattr(record.memory, name)), np.asarray(getattr(m1, name)),
                                   rtol=1e-4, atol=1e-5, err_msg=name)


def test_cli_refuses_a_profile_that_does_not_fit(setting, tmp_path, capsys):
    model, facts, *_ = setting
    code = cli.main(["trace", "--model", str(model), "--facts", str(facts), "--mesh", "dp3",
                     "--out", str(tmp_path / "t")])
    assert code == 2
    assert "does not fit the 8 device(s)" in capsys.readouterr().err


def test_data_parallel_likelihood_equals_single_device(reference):
    method = "mc_elbo"  # the evaluation default; its per-row PRNG keys are what could go wrong
    ref = reference("dream")  # shifted logits
    rng = np.random.default_rng(5)
    B = 5  # padded to 8 rows on the mesh
    prompt = rng.integers(0, 370, (B, 6)).astype(np.int32)
    prompt_mask = np.ones_like(prompt)
    prompt_mask[1, :2] = 0
    answer = rng.integers(0, 370, (B, 4)).astype(np.int32)
    answer_mask = np.ones_like(answer)
    answer_mask[2, 3:] = 0
    key = jax.random.key(11)
    kw = dict(method=method, mc_samples=4, batch_size=4)
    single = np.asarray(likelihood.answer_log_likelihood_jit(ref, prompt, prompt_mask, answer, answer_mask, key, **kw))
    mesh = sharding.make_mesh("dp4tp2")
    bb = ports.load_pretrained(FIXTURES / "dream", mesh=mesh, rules=sharding.rules_for("dp4tp2"))
    keys = np.asarray(jax.random.key_data(jax.random.split(key, B)))   # the row keys the single call draws
    parallel = distributed.map_chunks(likelihood._score_rows, (prompt, prompt_mask, answer, answer_mask, keys),
                                      chunk_size=1, before=(bb,), static=kw, mesh=mesh)
    assert parallel.shape == (B,)
    np.testing.assert_allclose(parallel, single, **TOL)
