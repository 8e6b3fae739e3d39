"""TIE grid: equals a plain Python loop over cells, invariants, determinism, batching."""

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ports
from ports import MODULES, Site
from timerome_jax import tracing as tr
from timerome_jax.errors import InputError
from timerome_jax.facts import fact_batch

from conftest import activations

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def llada():
    return ports.load_pretrained(FIXTURES / "llada")


@pytest.fixture(scope="module")
def facts():
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 370, 9)), list(rng.integers(0, 370, 6))]
    answers = [list(rng.integers(0, 370, 5)), list(rng.integers(0, 370, 7))]
    return prompts, answers, [(2, 5), (1, 3)]


@pytest.fixture(scope="module")
def batch(facts):
    return fact_batch(*facts, pad_id=378)


CFG = tr.TraceConfig(steps=3, noise_samples=2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SetRows:
    """The reference's own edit (not the tracer's): rows `pos` of the site's value become `rows`,
    or get `rows` added; written from DESIGN.md §2 with a scatter."""

    site: Site
    pos: jax.Array
    rows: jax.Array
    add: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def __call__(self, key, value):
        new = value[0, self.pos] + self.rows if self.add else self.rows
        return value.at[0, self.pos].set(new.astype(value.dtype))


def reference_clean_run(bb, batch, f, K):
    """Fact f's teacher-forced clean trajectory, from DESIGN.md §2 in plain numpy: per step the
    state, the still-masked answer positions, every module's value at the subject [L, S, D], and
    the read-out."""
    true_ids, am = batch.input_ids_FT[f], batch.attention_mask_FT[f]
    answer = np.asarray(batch.answer_mask_FT[f])
    pos = np.asarray(batch.subject_pos_FS[f])[np.asarray(batch.subject_valid_FS[f])]
    n = int(answer.sum())
    counts = [n // K + (k < n % K) for k in range(K)]
    cur = np.where(answer, bb.mask_token_id, np.asarray(true_ids))
    masked = answer.copy()
    states, masks, cleans, lps = [], [], [], []
    for k in range(K):
        logits, acts = activations(bb, jnp.asarray(cur)[None], am[None])
        logp = np.asarray(jax.nn.log_softmax(logits[0], -1))
        lps.append(sum(logp[j, int(true_ids[j])] for j in np.flatnonzero(masked)))
        probs = np.asarray(jax.nn.softmax(logits[0], -1))
        conf = probs.max(-1)
        candidates = sorted(np.flatnonzero(masked), key=lambda j: (-conf[j], j))[: counts[k]]
        cleans.append({m: np.asarray(acts[m][:, 0])[:, pos] for m in MODULES})   # [L, S, D]
        states.append(cur.copy()); masks.append(masked.copy())
        cur[candidates] = np.asarray(true_ids)[candidates]
        masked[candidates] = False
    return states, masks, cleans, lps


def reference_noise(batch, key, f, r, sigma, cfg, n_pos, D):
    S = batch.subject_pos_FS.shape[1]
    noise = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, int(batch.fact_index_F[f])), r), (S, D))
    return noise[:n_pos] * cfg.noise_scale * sigma


def reference_grid(bb, batch, sigma, key, cfg):
    """Plain Python loops, one jitted forward per cell, written from the definitions (DESIGN.md §2)
    without tie_grid's vmaps or the tracer's edits."""
    L, D, K, R = bb.config.n_layers, bb.config.d_model, cfg.steps, cfg.noise_samples
    F = batch.subject_pos_FS.shape[0]
    forward = jax.jit(lambda bb, ids, am, edits: bb.apply(ids[None], am[None], edits=edits)[0])
    tie = np.zeros((F, K, L, len(cfg.modules)))
    clean_lp, corrupted_lp = np.zeros((F, K)), np.zeros((F, K))
    for f in range(F):
        true_ids, am = batch.input_ids_FT[f], batch.attention_mask_FT[f]
        pos = np.asarray(batch.subject_pos_FS[f])[np.asarray(batch.subject_valid_FS[f])]
        states, masks, cleans, clean_lp[f] = reference_clean_run(bb, batch, f, K)
        for k in range(K):
            corrupted = []
            for r in range(R):
                noise = reference_noise(batch, key, f, r, sigma, cfg, len(pos), D)
                corrupt = SetRows(Site(None, "embed"), jnp.asarray(pos), noise, add=True)
                def lp(*patch):
                    logp = np.asarray(jax.nn.log_softmax(forward(bb, jnp.asarray(states[k]), am, (corrupt, *patch)), -1))
                    return sum(logp[j, int(true_ids[j])] for j in np.flatnonzero(masks[k]))
                base = lp()
                corrupted.append(base)
                for layer in range(L):
                    for mi, m in enumerate(cfg.modules):
                        low = layer - cfg.window // 2
                        window = [l for l in range(low, low + cfg.window) if 0 <= l < L]
                        patch = [SetRows(Site(jnp.int32(l), m), jnp.asarray(pos), jnp.asarray(cleans[k][m][l])) for l in window]
                        tie[f, k, layer, mi] += (lp(*patch) - base) / R
            corrupted_lp[f, k] = np.mean(corrupted)
    return tie, clean_lp, corrupted_lp


def test_vmapped_grid_equals_python_loop(llada, batch):
    sigma = tr.subject_embedding_std(llada, batch)
    key = jax.random.key(3)
    result = tr.tie_grid(llada, batch, sigma, key, CFG)
    tie, clean_lp, corrupted_lp = reference_grid(llada, batch, sigma, key, CFG)
    np.testing.assert_allclose(result.clean_lp, clean_lp, atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(result.corrupted_lp, corrupted_lp, atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(result.tie, tie, atol=1e-3)
    assert np.abs(tie).max() > 1e-2  # the comparison is not between zeros


def test_chunk_size_does_not_change_the_grid(llada, batch):
    sigma = tr.subject_embedding_std(llada, batch)
    a = tr.tie_grid(llada, batch, sigma, jax.random.key(0), CFG)
    b = tr.tie_grid(llada, batch, sigma, jax.random.key(0), dataclasses.replace(CFG, cells_per_batch=7))
    np.testing.assert_allclose(a.tie, b.tie, atol=1e-5)


def test_same_seed_same_arrays_other_seed_differs(llada, batch):
    sigma = tr.subject_embedding_std(llada, batch)
    a = tr.tie_grid(llada, batch, sigma, jax.random.key(1), CFG)
    b = tr.tie_grid(llada, batch, sigma, jax.random.key(1), CFG)
    c = tr.tie_grid(llada, batch, sigma, jax.random.key(2), CFG)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a.corrupted_lp, c.corrupted_lp)


def test_clean_run_reveals_true_tokens_on_the_linear_schedule(llada, batch):
    f = 1
    states, masked, clean, lp = tr.clean_run(llada, batch.input_ids_FT[f], batch.attention_mask_FT[f],
                                             batch.answer_mask_FT[f], batch.subject_pos_FS[f], 3)
    # 7 answer tokens over 3 steps: 3, 2, 2 revealed
    np.testing.assert_array_equal(np.asarray(masked).sum(-1), [7, 4, 2])
    true = np.asarray(batch.input_ids_FT[f])
    for k in range(3):
        shown = np.asarray(batch.answer_mask_FT[f]) & ~np.asarray(masked[k])
        np.testing.assert_array_equal(np.asarray(states[k])[shown], true[shown])
        assert (np.asarray(states[k])[np.asarray(masked[k])] == llada.mask_token_id).all()
    assert clean.shape == (3, 3, 3, 3, 64)  # [K, L, M, S, D]
    _, acts = activations(llada, states[1][None], batch.attention_mask_FT[f][None])
    pos = np.asarray(batch.subject_pos_FS[f])
    for m, module in enumerate(MODULES):     # the clean activations are the forward's, at the subject
        np.testing.assert_array_equal(clean[1][:, m], np.asarray(acts[module][:, 0])[:, pos])


def test_zero_noise_means_no_effect_anywhere(llada, batch):
    result = tr.tie_grid(llada, batch, jnp.float32(1.0), jax.random.key(0), dataclasses.replace(CFG, noise_scale=0.0))
    np.testing.assert_allclose(result.corrupted_lp, result.clean_lp, atol=1e-4)
    np.testing.assert_allclose(result.tie, 0.0, atol=1e-4)


def test_no_op_patch_gives_corrupted_and_full_restore_gives_clean(llada, facts):
    """Subject = every real position. Restoring the residual stream of every layer everywhere
    must give back the clean read-out; a patch at no layer gives the corrupted read-out."""
    prompts, answers, _ = facts
    full = fact_batch(prompts[:1], answers[:1], [(0, len(prompts[0]))], pad_id=378)
    T = int(full.attention_mask_FT.sum())
    full = dataclasses.replace(full, subject_pos_FS=jnp.arange(T)[None], subject_valid_FS=jnp.ones((1, T), bool))
    sigma = tr.subject_embedding_std(llada, full)
    cfg = tr.TraceConfig(steps=3, noise_samples=2, modules=("resid",), window=2 * llada.config.n_layers)
    result = tr.tie_grid(llada, full, sigma, jax.random.key(0), cfg)
    for layer in range(llada.config.n_layers):
        np.testing.assert_allclose(result.patched_lp[0, :, layer, 0], result.clean_lp[0], atol=1e-4)
    assert np.abs(result.clean_lp - result.corrupted_lp).max() > 0.1

    pos, valid = full.subject_pos_FS[0], full.subject_valid_FS[0]
    ids, am = full.input_ids_FT[0], full.attention_mask_FT[0]
    no_patch = tr.patch_edits(jnp.ones((3, 3, T, 64)), pos, valid, jnp.int32(-1), jnp.int32(0), 3)
    zero_noise = tr.noise_edit(pos, valid, jnp.zeros((T, 64)))
    np.testing.assert_array_equal(llada.apply(ids[None], am[None], edits=(zero_noise, *no_patch)),
                                  llada.apply(ids[None], am[None]))


def test_last_layer_residual_patch_cannot_reach_the_answer(llada, batch):
    """Restoring the final block output at subject positions changes nothing downstream."""
    sigma = tr.subject_embedding_std(llada, batch)
    result = tr.tie_grid(llada, batch, sigma, jax.random.key(0), CFG)
    np.testing.assert_allclose(result.tie[:, :, -1, 0], 0.0, atol=1e-4)


def test_facts_of_different_lengths_batch_like_singletons(llada, facts, batch):
    sigma = tr.subject_embedding_std(llada, batch)
    together = tr.tie_grid(llada, batch, sigma, jax.random.key(5), CFG)
    prompts, answers, spans = facts
    for i in range(2):
        alone = fact_batch([prompts[i]], [answers[i]], [spans[i]], pad_id=378, fact_index=[i])
        single = tr.tie_grid(llada, alone, sigma, jax.random.key(5), CFG)
        np.testing.assert_allclose(single.tie[0], together.tie[i], atol=1e-4)
        np.testing.assert_allclose(single.clean_lp[0], together.clean_lp[i], atol=1e-4)


def test_propagated_mode_shapes_and_patch_step_readout(llada, batch):
    sigma = tr.subject_embedding_std(llada, batch)
    key = jax.random.key(0)
    teacher = tr.tie_grid(llada, batch, sigma, key, CFG)
    prop = tr.tie_grid(llada, batch, sigma, key, dataclasses.replace(CFG, mode="propagated"))
    assert prop.tie.shape == teacher.tie.shape and prop.tie_by_readout.shape == (2, 3, 3, 3, 3)
    # at the patched step itself both modes read the same forward
    diag = np.stack([prop.tie_by_readout[:, k, k] for k in range(3)], axis=1)
    np.testing.assert_allclose(diag, teacher.tie, atol=1e-4)
    # read-outs before the patch step are zero by construction
    assert np.all(np.asarray(prop.tie_by_readout[:, 2, 0]) == 0)


def test_select_coordinate_on_a_planted_maximum():
    tie = np.zeros((2, 4, 5, 3))
    tie[:, 2, 3, 1] = 5.0
    tie[:, 0, 1, 0] = 9.0  # large, but only at step 0
    assert tr.select_coordinate(tie, MODULES).as_dict() == {"layer": 1, "step": 0, "module": "resid", "steps": 4}
    assert tr.select_coordinate(tie, MODULES, k_min=1).as_dict() == {"layer": 3, "step": 2, "module": "attn", "steps": 4}
    with pytest.raises(InputError, match="k_min"):
        tr.select_coordinate(tie, MODULES, k_min=4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps must be"), (dict(modules=("mlp", "ffn")), "unknown module name"),
    (dict(noise_samples=0), "noise samples"), (dict(window=0), "window"), (dict(mode="free"), "trace mode"),
])
def test_bad_trace_settings(kwargs, message):
    with pytest.raises(InputError, match=message):
        tr.TraceConfig(**kwargs)


def test_bad_subject_span():
    with pytest.raises(InputError, match="not inside"):
        fact_batch([[1, 2, 3]], [[4]], [(2, 5)], pad_id=0)
    with pytest.raises(InputError, match="no facts"):
        fact_batch([], [], [], pad_id=0)


@pytest.mark.parametrize("window", [1, 3])
def test_cached_prefix_grid_equals_full_forwards(llada, batch, window):
    sigma = tr.subject_embedding_std(llada, batch)
    cfg = dataclasses.replace(CFG, window=window)
    shared = tr.tie_grid(llada, batch, sigma, jax.random.key(4), cfg)
    full = tr.tie_grid(llada, batch, sigma, jax.random.key(4), dataclasses.replace(cfg, share_prefix=False))
    for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(full)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_trace_driver_chunks_equal_one_grid_and_select_the_coordinate(llada, batch):
    sigma = tr.subject_embedding_std(llada, batch)
    whole = tr.tie_grid(llada, batch, sigma, jax.random.key(6), CFG)
    traced = tr.trace(llada, batch, CFG, jax.random.key(6), facts_per_chunk=1)
    np.testing.assert_allclose(traced.result.tie, whole.tie, atol=1e-5)
    assert traced.coordinate == tr.select_coordinate(traced.result.tie, CFG.modules)
    assert np.isclose(traced.sigma, float(sigma))


def test_coordinate_parse_and_from_trace(tmp_path):
    assert tr.Coordinate.parse("2,mlp,1", n_layers=3, steps=4) == tr.Coordinate(2, 1, "mlp", 4)
    for text, message in [("2,mlp", "LAYER,MODULE,STEP"), ("x,mlp,1", "integers"), ("2,ffn,1", "unknown module"),
                          ("3,mlp,1", "layer 3 is outside"), ("2,mlp,4", "step 4 is outside")]:
        with pytest.raises(InputError, match=message):
            tr.Coordinate.parse(text, n_layers=3, steps=4)
    (tmp_path / "summary.json").write_text('{"coordinate": {"layer": 1, "step": 0, "module": "attn", "steps": 2}}')
    assert tr.Coordinate.from_trace(tmp_path, n_layers=3) == tr.Coordinate(1, 0, "attn", 2)
    with pytest.raises(InputError, match="cannot read a coordinate"):
        tr.Coordinate.from_trace(tmp_path / "missing", n_layers=3)


# --- attribution patching (method 'atp') and the hybrid -------------------------------------------

def test_attribution_patching_is_exact_for_a_linear_readout():
    """y = Σ w·(value + δ): restoring site x changes y by exactly w_x·(clean_x − corrupted_x)."""
    rng = np.random.default_rng(0)
    w, corrupted, clean = (jnp.asarray(rng.normal(size=(4, 3, 5)), jnp.float32) for _ in range(3))
    valid = jnp.asarray([True, True, False])

    def forward(delta):
        return jnp.sum(w * (corrupted + delta)), (corrupted, None)

    y, _, estimate = tr.attribution_patching(forward, clean, valid)
    exact = jnp.stack([jnp.sum(w[x] * (clean[x] - corrupted[x]) * valid[:, None]) for x in range(4)])
    np.testing.assert_allclose(estimate, exact, rtol=1e-5)
    np.testing.assert_allclose(y, jnp.sum(w * corrupted), rtol=1e-5)

    def squared(delta):   # not linear: the estimate is the tangent, not the difference
        return jnp.sum((w * (corrupted + delta)) ** 2), (corrupted, None)

    _, _, estimate = tr.attribution_patching(squared, clean, valid)
    change = [jnp.sum((w[x] * jnp.where(valid[:, None], clean[x], corrupted[x])) ** 2 - (w[x] * corrupted[x]) ** 2)
              for x in range(4)]
    assert not np.allclose(estimate, change, rtol=1e-2)


def test_atp_equals_the_derivative_along_clean_minus_corrupted(llada, batch):
    """One draw: each cell's estimate is d/dα of the read-out with the site's subject rows moved
    by α·(clean − corrupted), at α = 0 (`jax.jvp` of the reference's own edit)."""
    cfg = tr.TraceConfig(steps=2, noise_samples=1, method="atp")
    sigma = tr.subject_embedding_std(llada, batch)
    key = jax.random.key(7)
    result = tr.tie_grid(llada, batch, sigma, key, cfg)
    L, D = llada.config.n_layers, llada.config.d_model

    @functools.partial(jax.jit, static_argnames="module")
    def derivative(ids, am, true_ids, read, pos, corrupt, direction, layer, module):
        def readout(alpha):
            move = SetRows(Site(layer, module), pos, alpha * direction, add=True)
            logp = jax.nn.log_softmax(llada.apply(ids, am[None], edits=(corrupt, move))[0], -1)
            return jnp.sum(jnp.where(read, jnp.take_along_axis(logp, true_ids[:, None], -1)[:, 0], 0.0))
        return jax.jvp(readout, (jnp.float32(0.0),), (jnp.float32(1.0),))[1]

    for f in range(batch.num_facts):
        true_ids, am = batch.input_ids_FT[f], batch.attention_mask_FT[f]
        pos = jnp.asarray(np.asarray(batch.subject_pos_FS[f])[np.asarray(batch.subject_valid_FS[f])])
        states, masks, cleans, _ = reference_clean_run(llada, batch, f, cfg.steps)
        corrupt = SetRows(Site(None, "embed"), pos, reference_noise(batch, key, f, 0, sigma, cfg, len(pos), D), add=True)
        for k in range(cfg.steps):
            ids = jnp.asarray(states[k])[None]
            _, captured = llada.apply(ids, am[None], capture=tuple(Site(None, m) for m in MODULES), edits=(corrupt,))
            for layer in range(L):
                for mi, m in enumerate(cfg.modules):
                    direction = jnp.asarray(cleans[k][m][layer]) - captured[MODULES.index(m)].value[layer, 0][pos]
                    expected = derivative(ids, am, true_ids, jnp.asarray(masks[k]), pos, corrupt, direction,
                                          jnp.int32(layer), m)
                    np.testing.assert_allclose(result.tie[f, k, layer, mi], expected, rtol=2e-3, atol=2e-3)
    assert np.abs(result.tie).max() > 1e-2


def test_hybrid_confirming_every_column_equals_exact(llada, batch):
    cfg = dataclasses.replace(CFG, window=3)     # a window: several layers per patched cell
    sigma = tr.subject_embedding_std(llada, batch)
    exact = tr.tie_grid(llada, batch, sigma, jax.random.key(2), cfg)
    hybrid = tr.tie_grid(llada, batch, sigma, jax.random.key(2),
                         dataclasses.replace(cfg, method="hybrid", confirm_top=llada.config.n_layers * len(MODULES)))
    assert np.asarray(hybrid.confirmed).all()
    np.testing.assert_allclose(hybrid.tie, exact.tie, atol=1e-5)
    np.testing.assert_allclose(hybrid.corrupted_lp, exact.corrupted_lp, atol=1e-5)
    atp = tr.tie_grid(llada, batch, sigma, jax.random.key(2), dataclasses.replace(cfg, method="atp"))
    np.testing.assert_allclose(hybrid.estimated_tie, atp.tie, atol=1e-5)


def test_hybrid_confirms_the_best_estimated_columns_exactly(llada, batch):
    sigma = tr.subject_embedding_std(llada, batch)
    exact = tr.tie_grid(llada, batch, sigma, jax.random.key(3), CFG)
    hybrid = tr.tie_grid(llada, batch, sigma, jax.random.key(3), dataclasses.replace(CFG, method="hybrid", confirm_top=2))
    confirmed, estimated = np.asarray(hybrid.confirmed), np.asarray(hybrid.estimated_tie)
    F, K, L, M = confirmed.shape
    assert (confirmed.sum(axis=(1, 2, 3)) == 2 * K).all()
    for f in range(F):
        columns = confirmed[f].all(axis=0)                      # whole columns, every step
        assert columns.sum() == 2 and (confirmed[f].any(axis=0) == columns).all()
        best = np.argsort(-estimated[f].mean(axis=0).ravel())[:2]
        assert set(np.flatnonzero(columns.ravel())) == set(best)
    np.testing.assert_allclose(np.where(confirmed, hybrid.tie, 0), np.where(confirmed, exact.tie, 0), atol=1e-5)
    np.testing.assert_allclose(np.where(confirmed, 0, hybrid.tie), np.where(confirmed, 0, estimated), atol=1e-6)
    # the coordinate comes from confirmed cells: an unconfirmed column never outranks them
    grid = tr.selection_grid(hybrid)
    for f, c in enumerate(tr.per_fact_coordinates(grid, CFG.modules)):
        assert confirmed[f, c.step, c.layer, CFG.modules.index(c.module)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="fast"), "unknown trace method"), (dict(method="atp", mode="propagated"), "teacher-forced"),
    (dict(method="hybrid", confirm_top=0), "confirm-top"),
])
def test_bad_method_settings(kwargs, message):
    with pytest.raises(InputError, match=message):
        tr.TraceConfig(**kwargs)
