"""Baselines (timerome_jax.baselines): losses against hand computations on fixed masks, training
steps, convergence rule, reproducibility, steering / CAA wrappers, the random-coordinate memory.

Shapes are shared between tests (and with tests/test_unlearn_cli.py) so that compiled functions
are reused: 4 forget and 4 retain QA pairs of tofu-forget01 on the tiny llada fixture with its
word tokenizer, batch 4.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ports
from ports import MODULES, Site
from timerome_jax import api, resources, suites, tracing
from timerome_jax import memory as mem
from timerome_jax.baselines import inference, training
from timerome_jax.edits import Steering
from timerome_jax.errors import InputError
from timerome_jax.masking import forward_process, masked_diffusion_loss
from timerome_jax.tokenization import backbone_tokenizer

from conftest import activations

N_FORGET = N_RETAIN = 4
BATCH = 4
EOS = 378


@pytest.fixture(scope="module")
def model(tiny_model_dir_with_tokenizer):
    return ports.load_pretrained(tiny_model_dir_with_tokenizer)


@pytest.fixture(scope="module")
def suite(model):
    """The training rows of `timerome unlearn --suite tofu-forget01 --num-forget 4 --num-retain 4`."""
    tok = backbone_tokenizer(model)
    records = suites.load_suite("tofu-forget01", num_retain=N_RETAIN)
    rows = dict(tokenizer=tok, eos_id=EOS, max_len=model.config.max_seq_len)
    forget = suites.encode_rows(records.forget[:N_FORGET], score="answer", where="forget01", **rows)
    retain = suites.encode_rows(records.retain, score="window", where="retain90", **rows)
    return type("Rows", (), {"forget": forget, "retain": retain})


@pytest.fixture(scope="module")
def batches(suite):
    return training.Batch.of(suite.forget), training.Batch.of(suite.retain)


def skeleton(model):
    return dataclasses.replace(model, params=None)


@pytest.fixture(scope="module")
def objectives(model):
    """One jitted function: every method's (loss, terms) plus −masked_diffusion_loss on rows whose
    scored tokens are the noised ones, at given params / reference params."""
    skel = skeleton(model)
    L = model.config.n_layers

    @jax.jit
    def run(params, ref_params, key, forget, retain, control):
        m, ref = dataclasses.replace(skel, params=params), dataclasses.replace(skel, params=ref_params)
        out = {name: training.objective_terms(training.TrainConfig(method=name).objective(L), m, ref, key, forget,
                                              retain, control)
               for name in training.TRAINING_METHODS}
        k_forget, _ = jax.random.split(key)
        full = dataclasses.replace(forget, score_mask=forget.noise_mask)
        out["ga_full"] = training.objective_terms(training.TrainConfig(method="gradascent").objective(L), m, ref,
                                                  key, full, retain, control)
        out["mdl"] = masked_diffusion_loss(m, k_forget, forget.input_ids, forget.noise_mask, forget.attention_mask)
        return out

    return run


# --- data layout -------------------------------------------------------------------------------

def test_rows_follow_the_training_layout(suite):
    f, r = suite.forget, suite.retain
    assert f.input_ids.shape[1] % 16 == 0 and f.num_rows == N_FORGET and r.num_rows == N_RETAIN
    for i in range(f.num_rows):
        p = int(f.prompt_mask[i].sum())
        a = int(f.answer_mask[i].sum())
        np.testing.assert_array_equal(f.input_ids[i, :p], f.prompt_ids[i, -p:])
        np.testing.assert_array_equal(f.input_ids[i, p:p + a], f.answer_ids[i, :a])
        window = np.flatnonzero(f.noise_mask[i])
        assert window[0] == p and np.all(f.input_ids[i, p + a: window[-1] + 1] == EOS)  # answer + eos run
        assert np.array_equal(np.flatnonzero(f.score_mask[i]), np.arange(p, p + a + 1))  # answer + first eos
        assert f.attention_mask[i, : window[-1] + 1].all()
    np.testing.assert_array_equal(r.score_mask, r.noise_mask)  # retain: the whole window (the SFT loss)
    assert suite.forget.ids[0] == "forget01:1" and suite.retain.ids[-1] == "retain90:4"


def test_unknown_suite_and_bad_counts(model):
    tok = backbone_tokenizer(model)
    with pytest.raises(InputError, match="unknown suite 'tofu-forget02'"):
        suites.load_suite("tofu-forget02")
    with pytest.raises(InputError, match="--num-retain must be >= 1"):
        suites.load_suite("tofu-forget01", num_retain=0)
    with pytest.raises(InputError, match="exceeds the 3600 retain QA pairs"):
        suites.load_suite("tofu-forget01", num_retain=3601)
    assert len(suites.load_suite("tofu-forget01", num_retain=500).retain) == 500   # past 400: plain retain90
    with pytest.raises(InputError, match="the answer window must be >= 2"):
        suites.encode_rows(suites.load_suite("tofu-forget01").forget, tok, EOS, 256, score="answer", where="f",
                           answer_window=1)


# --- losses = hand computations on fixed masks ------------------------------------------------------

def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _hand_nll(backbone, key, batch):
    """(NLL [B], n [B], masked [B,T], noisy [B,T]) by hand from the logits of the noised rows."""
    noisy, masked, p = (np.asarray(a) for a in forward_process(key, batch.input_ids, batch.noise_mask,
                                                                 backbone.mask_token_id))
    logp = _log_softmax(backbone.logits(noisy, batch.attention_mask))
    ids = np.asarray(batch.input_ids)
    token_nll = -np.take_along_axis(logp, ids[..., None], -1)[..., 0]
    score = np.asarray(batch.score_mask)
    nll = np.where(masked & score, token_nll / p[:, None], 0.0).sum(-1)
    return nll, score.sum(-1), noisy


def _softplus(x):
    return np.logaddexp(0.0, x)


@pytest.fixture(scope="module")
def reference(model):
    """A second model for NPO's reference: the fixture with every weight scaled by 0.98."""
    return dataclasses.replace(model, params=jax.tree.map(lambda x: x * 0.98, model.params))


def test_losses_equal_hand_computation(model, reference, batches, objectives):
    forget, retain = batches
    key = jax.random.key(7)
    control = training.control_vector(jax.random.key(3), model.config.d_model, 2.0)
    out = jax.tree.map(np.asarray, objectives(model.params, reference.params, key, forget, retain, control))
    k_forget, k_retain = jax.random.split(key)
    nll_f, n_f, noisy_f = _hand_nll(model, k_forget, forget)
    nll_ref, _, _ = _hand_nll(reference, k_forget, forget)
    nll_r, n_r, noisy_r = _hand_nll(model, k_retain, retain)
    sft_f, sft_r = np.mean(nll_f / n_f), np.mean(nll_r / n_r)
    close = dict(rtol=2e-5, atol=2e-4)

    # GradAscent: −ℓ(F); equals −masked_diffusion_loss when every noised token is scored
    np.testing.assert_allclose(out["gradascent"][0], -sft_f, **close)
    np.testing.assert_allclose(out["ga_full"][0], -out["mdl"], rtol=1e-6)
    # GradDiff: the forget term enters with a minus sign, the retain term with a plus sign
    np.testing.assert_allclose(out["graddiff"][0], -sft_f + sft_r, **close)
    np.testing.assert_allclose(out["graddiff"][1]["forget"], -sft_f, **close)
    np.testing.assert_allclose(out["graddiff"][1]["retain"], sft_r, **close)
    # NPO: (2/β) mean softplus(β (log π_θ − log π_ref)) + ℓ(R), paired masks
    beta = 0.1
    log_ratio = nll_ref - nll_f
    assert np.abs(log_ratio).max() > 1e-2  # the reference really differs
    np.testing.assert_allclose(out["npo"][1]["log_ratio"], log_ratio.mean(), **close)
    np.testing.assert_allclose(out["npo"][0], 2 / beta * np.mean(_softplus(beta * log_ratio)) + sft_r, **close)
    # SimNPO: 0.125 (2/β) mean softplus(−β NLL/|y|) + ℓ(R), β = 4.5, δ = 0
    beta = 4.5
    np.testing.assert_allclose(out["simnpo"][0],
                               0.125 * 2 / beta * np.mean(_softplus(-beta * nll_f / n_f)) + sft_r, **close)
    # RMU: per-element MSE of layer-ℓ block outputs to c·u on forget + MSE to the frozen model on retain
    layer = model.config.n_layers // 2
    inter = jax.jit(lambda b, ids, am: activations(b, ids, am)[1]["resid"])
    h_f = np.asarray(inter(model, noisy_f, forget.attention_mask))[layer].astype(np.float64)
    h_r = np.asarray(inter(model, noisy_r, retain.attention_mask))[layer].astype(np.float64)
    h_r_ref = np.asarray(inter(reference, noisy_r, retain.attention_mask))[layer].astype(np.float64)
    u = np.asarray(jax.random.uniform(jax.random.key(3), (model.config.d_model,)), np.float64)
    target = 2.0 * u / np.linalg.norm(u)
    np.testing.assert_allclose(np.asarray(control), target, rtol=1e-6)

    def mse(h, g, m):
        per_token = ((h - g) ** 2).mean(-1)
        return np.mean((per_token * m).sum(-1) / m.sum(-1))

    f_term = mse(h_f, target, np.asarray(forget.score_mask))
    r_term = mse(h_r, h_r_ref, np.asarray(retain.score_mask))
    assert r_term > 0
    np.testing.assert_allclose(out["rmu"][1]["forget"], f_term, **close)
    np.testing.assert_allclose(out["rmu"][1]["retain"], r_term, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["rmu"][0], f_term + r_term, rtol=1e-4, atol=2e-4)


def test_npo_at_the_reference_is_two_log_two_over_beta(model, batches, objectives):
    forget, retain = batches
    out = objectives(model.params, model.params, jax.random.key(1), forget, retain,
                     training.control_vector(jax.random.key(3), model.config.d_model, 2.0))
    np.testing.assert_allclose(out["npo"][1]["forget"], 2 / 0.1 * np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(out["npo"][1]["log_ratio"], 0.0, atol=1e-6)
    np.testing.assert_allclose(out["rmu"][1]["retain"], 0.0, atol=1e-12)  # frozen = current


# --- training ---------------------------------------------------------------------------------------

def fast_config(method, **kw):
    base = dict(method=method, lr=1e-3, max_steps=3, batch_size=BATCH, eval_every=3, mc_samples=2)
    return training.TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(model, suite):
    """Three steps of every method (shared by the tests below)."""
    return {m: training.train(model, suite.forget, suite.retain, fast_config(m)) for m in training.TRAINING_METHODS}


@pytest.mark.parametrize("method", training.TRAINING_METHODS)
def test_a_few_steps_lower_the_objective_and_keep_the_tree(method, model, batches, objectives, trained):
    forget, retain = batches
    control = training.control_vector(jax.random.fold_in(jax.random.key(0), 2), model.config.d_model, 2.0)
    result = trained[method]
    losses = []
    for params in (model.params, result.params):
        values = []
        for k in range(2):  # two fixed keys: the same masks before and after
            out = objectives(params, model.params, jax.random.key(100 + k), forget, retain, control)
            values.append(float(out[method][0]))
        losses.append(np.mean(values))
    assert losses[1] < losses[0] - 1e-3, losses
    assert jax.tree.structure(result.params) == jax.tree.structure(model.params)
    for new, old in zip(jax.tree.leaves(result.params), jax.tree.leaves(model.params)):
        assert new.shape == old.shape and new.dtype == old.dtype
        assert np.all(np.isfinite(np.asarray(new)))
    stats = result.stats
    assert stats["steps"] == 3 and stats["stop_reason"] == "max_steps" and not stats["converged"]
    assert [e["step"] for e in stats["evaluations"]] == [0, 3] and len(stats["loss_curve"]) == 3
    assert all(np.isfinite(e["forget_lp"]) for e in stats["evaluations"])
    assert stats["compile_seconds"] > 0 and stats["train_seconds"] > 0
    assert stats["wall_clock_seconds"] >= stats["train_seconds"] + stats["eval_seconds"] - 1e-6
    assert stats["peak_memory"]["host_peak_rss_bytes"] > 10 * 2 ** 20


def test_rmu_trains_only_the_down_projections_of_layers_l_minus_2_to_l(model, trained):
    new = trained["rmu"].params
    layer = model.config.n_layers // 2
    trained_layers = [l for l in range(layer - 2, layer + 1) if l >= 0]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(model.params), jax.tree.leaves(new)):
        a, b = np.asarray(a), np.asarray(b)
        if "down_proj" in jax.tree_util.keystr(path) and "mlp" in jax.tree_util.keystr(path):
            for l in range(model.config.n_layers):
                changed = not np.array_equal(a[l], b[l])
                assert changed == (l in trained_layers), (l, trained_layers)
        else:
            np.testing.assert_array_equal(a, b)
    assert trained["rmu"].stats["trained_parameters"] == len(trained_layers) * model.config.mlp_hidden * model.config.d_model


def test_rmu_target_norm_is_coeff_times_the_mean_activation_norm(model, suite, trained):
    """Relative scale (the default): c = 2 x mean ||h_l|| over the forget set's scored tokens,
    computed here by hand on the same noised rows (one chunk: 4 rows = the batch size)."""
    layer = model.config.n_layers // 2
    control_key = jax.random.fold_in(jax.random.key(0), 2)
    h = np.asarray(training.residual_activations(model, control_key, training.Batch.of(suite.forget), layer))
    scored = np.asarray(suite.forget.training_arrays()[3])
    expected = float(np.linalg.norm(h, axis=-1)[scored].mean())
    stats = trained["rmu"].stats
    np.testing.assert_allclose(stats["rmu_activation_norm"], expected, rtol=1e-5)
    np.testing.assert_allclose(stats["rmu_target_norm"], training.RMU_COEFF * expected, rtol=1e-5)
    absolute = training.train(model, suite.forget, suite.retain, fast_config("rmu", max_steps=1, eval_every=1,
                                                                             rmu_scale="absolute"))
    assert absolute.stats["rmu_activation_norm"] is None
    assert absolute.stats["rmu_target_norm"] == training.RMU_COEFF


def test_same_seed_same_params_other_seed_differs(model, suite, trained):
    again = training.train(model, suite.forget, suite.retain, fast_config("gradascent"))
    for a, b in zip(jax.tree.leaves(trained["gradascent"].params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert again.stats["loss_curve"] == trained["gradascent"].stats["loss_curve"]
    other = training.train(model, suite.forget, suite.retain, fast_config("gradascent", seed=1))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(trained["gradascent"].params), jax.tree.leaves(other.params)))


def test_stop_rules():
    cfg = training.TrainConfig(method="npo", patience=2, tol=0.5, target_drop=10.0)
    assert training._stop_reason([-5.0], cfg) is None
    assert training._stop_reason([-5.0, -8.0], cfg) is None            # too few evaluations for a plateau
    assert training._stop_reason([-5.0, -8.0, -9.0], cfg) is None      # fell 4 nats over the last 2
    assert training._stop_reason([-5.0, -8.0, -9.0, -8.6], cfg) is None      # 0.6 nats over the last 2
    assert training._stop_reason([-5.0, -8.0, -8.3, -8.1], cfg) == "plateau"  # 0.1 nats (a rise included)
    assert training._stop_reason([-5.0, -8.0, -8.2, -8.4], cfg) == "plateau"  # 0.4 < 0.5
    assert training._stop_reason([-5.0, -8.0, -8.2, -8.4], cfg, plateau_allowed=False) is None  # < min_epochs
    assert training._stop_reason([-5.0, -15.0], cfg) == "target"
    assert training._stop_reason([-5.0, -15.0], cfg, plateau_allowed=False) == "target"
    assert training._stop_reason([-5.0, -8.0, -8.2, -8.4],
                                 dataclasses.replace(cfg, tol=0.0)) is None


def test_training_stops_on_plateau_and_on_target(model, suite):
    plateau = training.train(model, suite.forget, suite.retain,
                             fast_config("gradascent", max_steps=50, eval_every=1, patience=1, tol=1e9, min_epochs=0))
    assert plateau.stats["stop_reason"] == "plateau" and plateau.stats["steps"] == 1 and plateau.stats["converged"]
    target = training.train(model, suite.forget, suite.retain,
                            fast_config("gradascent", max_steps=50, eval_every=1, target_drop=1e-3))
    assert target.stats["stop_reason"] == "target" and target.stats["steps"] == 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="dpo"), "unknown training method 'dpo'"),
    (dict(method="npo", lr=0.0), "learning rate must be a finite number > 0"),
    (dict(method="npo", lr=float("nan")), "learning rate must be a finite number > 0"),
    (dict(method="npo", max_steps=0), "--max-steps must be an integer >= 1"),
    (dict(method="npo", beta=-1.0), "--beta must be a finite number > 0"),
    (dict(method="rmu", rmu_layer=7), r"--rmu-layer must lie in 0\.\.2"),
    (dict(method="npo", target_drop=0.0), "--target-drop must be a finite number > 0"),
    (dict(method="rmu", rmu_scale="log"), "--rmu-scale must be 'relative' or 'absolute'"),
    (dict(method="rmu", rmu_coeff=0.0), "--rmu-coeff must be a finite number > 0"),
])
def test_bad_training_configs(kwargs, message):
    with pytest.raises(InputError, match=message):
        training.TrainConfig(**kwargs).objective(3)


def test_retain_weight_without_retain_set_is_refused(model, suite):
    with pytest.raises(InputError, match="uses a retain set"):
        training.train(model, suite.forget, None, fast_config("graddiff"))


# --- measurement utilities ---------------------------------------------------------------------------

def test_measure_reads_the_process():
    with resources.Measure() as m:
        block = np.ones(64 * 2 ** 20 // 8)  # 64 MiB touched inside the block
        block.sum()
    d = m.as_dict()
    assert d["seconds"] > 0 and d["host_peak_rss_bytes"] >= d["host_rss_at_start_bytes"]
    if d["host_peak_reset"]:
        assert d["host_peak_rss_bytes"] - d["host_rss_at_start_bytes"] >= 60 * 2 ** 20
    assert resources.host_peak_rss_bytes() >= resources.host_rss_bytes()
    assert d["device_peak_bytes_after"] is None or d["device_peak_bytes_after"] > 0


# --- inference-time baselines ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def facts_batch(model):
    tok = backbone_tokenizer(model)
    encoded = api.encode(model, tok, suites.forget_facts("tofu-forget01", N_FORGET))
    assert encoded.num_facts == N_FORGET
    return encoded


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_steering_changes_logits_only_through_the_vector(model, alpha):
    """resid at the last layer: logits = head(final_norm(resid + α v)), by hand; α = 0 is bit-identical."""
    L, D = model.config.n_layers, model.config.d_model
    v = np.random.default_rng(0).normal(size=D).astype(np.float32)
    ids = np.random.default_rng(1).integers(0, 370, size=(2, 9)).astype(np.int32)
    steered = inference.steer(model, v, L - 1, "resid", alpha)
    got = np.asarray(steered.logits(ids))
    if alpha == 0.0:
        np.testing.assert_array_equal(got, np.asarray(model.logits(ids)))
        return
    _, inter = jax.jit(activations)(model, ids)
    h = np.asarray(inter["resid"][L - 1], np.float64) + alpha * v
    p = model.params
    normed = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + model.config.norm_eps) * np.asarray(p["final_norm"]["scale"])
    expected = normed @ np.asarray(p["lm_head"]["kernel"], np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_steering_adds_exactly_at_its_layer_and_module(model):
    v = np.random.default_rng(2).normal(size=model.config.d_model).astype(np.float32)
    ids = np.random.default_rng(3).integers(0, 370, size=(2, 9)).astype(np.int32)
    inter = jax.jit(lambda b, x: activations(b, x)[1])
    base = jax.tree.map(np.asarray, inter(model, ids))
    steered = jax.tree.map(np.asarray, inter(inference.steer(model, v, 1, "mlp", 0.5), ids))
    np.testing.assert_array_equal(steered["mlp"][0], base["mlp"][0])  # layers before: untouched
    np.testing.assert_array_equal(steered["resid"][0], base["resid"][0])
    np.testing.assert_allclose(steered["mlp"][1], base["mlp"][1] + 0.5 * v, rtol=1e-5, atol=1e-5)
    assert not np.allclose(steered["resid"][2], base["resid"][2])


def test_steering_rejects_bad_shapes_and_places(model):
    with pytest.raises(InputError, match="shape"):
        inference.steer(model, np.zeros(5), 0, "resid", 1.0)
    with pytest.raises(InputError, match="outside"):
        inference.steer(model, np.zeros(model.config.d_model), 9, "resid", 1.0)
    with pytest.raises(InputError, match="unknown module"):
        inference.steer(model, np.zeros(model.config.d_model), 0, "ffn", 1.0)


CAA = dict(coordinate=tracing.Coordinate(1, 0, "attn"), steps=1, noise_samples=2, facts_per_chunk=2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FromLayer:
    """The reference's edit: the block output of layer 0 replaced by a given stream (so layer 1
    runs on the hand-corrupted residual stream)."""

    x: jax.Array
    site: Site = dataclasses.field(default_factory=lambda: Site(jnp.int32(0), "resid"))

    def __call__(self, key, value):
        return self.x.astype(value.dtype)


def test_caa_difference_equals_a_python_loop(model, facts_batch):
    """d = mean_facts mean_{k, r, p ∈ subject ∪ answer} (clean − corrupted) at (layer, module).
    One step (K = 1): the state is the prompt with the whole answer masked."""
    batch = facts_batch.batch
    key = jax.random.key(0)
    R = CAA["noise_samples"]
    got = inference.caa_difference(model, batch, CAA["coordinate"], key, steps=CAA["steps"], noise_samples=R,
                                   facts_per_chunk=CAA["facts_per_chunk"])

    sigma = tracing.subject_embedding_std(model, batch)
    S, D = batch.subject_pos_FS.shape[1], model.config.d_model
    noise = np.asarray(tracing.noise_draws(key, batch.fact_index_F, R, (S, D))) * (3.0 * float(sigma))
    # the reference corrupts the embeddings by hand: the embed -> layer -> ... pieces, noise added
    # to the subject rows, the attention output of layer 1 read where it is produced
    def attn_output(state, mask, noise_SD, pos):
        x = np.asarray(model.embed(jnp.asarray(state)[None])).copy()
        x[0, pos] += noise_SD[: len(pos)]
        x = model.layer(jnp.asarray(x), 0, jnp.asarray(mask)[None])
        _, (attn,) = model.apply(jnp.asarray(state)[None], jnp.asarray(mask)[None], capture=(Site(1, "attn"),),
                                 edits=(FromLayer(x),))
        return np.asarray(attn.value[0])

    per_fact = []
    for f in range(batch.num_facts):
        answer = np.asarray(batch.answer_mask_FT[f]).astype(bool)
        state = np.where(answer, model.mask_token_id, np.asarray(batch.input_ids_FT[f]))
        pos = np.asarray(batch.subject_pos_FS[f])[np.asarray(batch.subject_valid_FS[f])]
        where = answer.copy()
        where[pos] = True
        clean = attn_output(state, batch.attention_mask_FT[f], np.zeros((S, D)), pos)
        diffs = []
        for r in range(R):
            diffs.append((clean - attn_output(state, batch.attention_mask_FT[f], noise[f, r], pos))[where])
        per_fact.append(np.concatenate(diffs).mean(axis=0))
    np.testing.assert_allclose(got, np.mean(per_fact, axis=0), rtol=1e-4, atol=1e-6)
    assert np.abs(got).max() > 1e-4


TRACED = tracing.Coordinate(0, 1, "mlp")


def _seed_with_module(module):
    return next(s for s in range(100) if inference.random_coordinate(3, TRACED, s).module == module)


def test_random_coordinate_is_seeded_and_never_the_traced_layer():
    draws = [inference.random_coordinate(3, TRACED, s) for s in range(40)]
    assert all(c.layer != TRACED.layer and c.step == TRACED.step for c in draws)
    assert {c.layer for c in draws} == {1, 2} and {c.module for c in draws} == set(MODULES)
    assert [inference.random_coordinate(3, TRACED, s) for s in range(40)] == draws
    assert inference.random_coordinate(1, TRACED, 0).layer == 0  # one layer: nothing else to draw


def test_random_memory_is_reproducible_and_differs_from_the_traced_one(model, facts_batch):
    batch = facts_batch.batch
    key = jax.random.key(0)
    seed = _seed_with_module(TRACED.module)  # same module: the capture compiles once
    first = inference.random_memory(model, facts_batch, TRACED, key, seed=seed, alpha=1.0, lam=0.1)
    again = inference.random_memory(model, facts_batch, TRACED, key, seed=seed, alpha=1.0, lam=0.1)
    assert first.coordinate == again.coordinate and first.coordinate.layer != TRACED.layer
    for a, b in zip(jax.tree.leaves(first.memory), jax.tree.leaves(again.memory)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    keys, deltas, _ = mem.capture(model, batch, TRACED, key)
    traced, _ = mem.build(keys, deltas, layer=TRACED.layer, module=TRACED.module, alpha=1.0, lam=0.1)
    assert first.memory.size == traced.size == N_FORGET  # same rank budget
    assert float(first.memory.alpha) == float(traced.alpha) and float(first.lam) == 0.1
    assert int(first.memory.layer) != int(traced.layer)
    assert not np.allclose(np.asarray(first.memory.keys), np.asarray(traced.keys))
    ids_in = np.asarray(batch.input_ids_FT[:2])
    edited = model.with_edits(first.memory)
    assert not np.allclose(np.asarray(edited.logits(ids_in)), np.asarray(model.logits(ids_in)))


def test_save_load_round_trip_and_refusals(model, facts_batch, tmp_path):
    v = np.linspace(-1, 1, model.config.d_model).astype(np.float32)
    baseline = inference.InferenceBaseline("steer", TRACED, TRACED, 0.5, model.fingerprint(), facts_batch.ids,
                                           vector=v, difference=v)
    out = inference.save_inference_baseline(baseline, tmp_path / "steer", model=model.source)
    assert inference.is_inference_baseline(out) and inference.read_kind(out) == "steer"
    loaded = inference.load_inference_baseline(out, model)
    (steering,) = loaded.edits
    assert isinstance(steering, Steering) and loaded.source == model.source
    np.testing.assert_array_equal(np.asarray(steering.vector_D), v)
    assert float(steering.alpha) == 0.5 and int(steering.site.layer) == TRACED.layer and steering.site.module == "mlp"
    assert inference.load_inference_baseline(out).fingerprint() == model.fingerprint()  # model from baseline.json
    other = dataclasses.replace(model, params=jax.tree.map(lambda x: x + 1, model.params))
    with pytest.raises(ports.errors.CheckpointError, match="built for model"):
        inference.load_inference_baseline(out, other)
    (out / "kind").write_text("teleport\n")
    with pytest.raises(ports.errors.CheckpointError, match="unknown baseline 'teleport'"):
        inference.load_inference_baseline(out, model)
    with pytest.raises(ports.errors.CheckpointError, match="not an inference-time baseline"):
        inference.read_kind(tmp_path)
    assert not inference.is_inference_baseline(tmp_path)


def test_steered_backbone_pieces_carry_the_vector():
    """The layer-by-layer path (used by the tracer) must steer exactly like apply."""
    import ports
    from pathlib import Path
    from timerome_jax.baselines import inference

    bb = ports.load_pretrained(Path(__file__).parent / "fixtures" / "llada")
    steered = inference.steer(bb, np.ones(bb.config.d_model, np.float32), 1, "resid", 0.5)
    ids = jnp.asarray([[5, 9, 11, 3, 7]], jnp.int32)
    x = steered.embed(ids)
    for i in range(bb.config.n_layers):
        x = steered.layer(x, i)
    np.testing.assert_allclose(steered.head(x), steered.apply(ids), atol=1e-5)
    assert np.abs(np.asarray(steered.apply(ids)) - np.asarray(bb.logits(ids))).max() > 1e-3
