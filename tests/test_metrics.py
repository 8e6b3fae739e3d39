"""timerome_jax.metrics: each metric against a hand computation, and the suite driver on the tiny
llada fixture (same seed -> identical numbers, pairing, aggregation, reference)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

import ports
from timerome_jax import data, evaluate, likelihood, metrics, suites, tokenization
from timerome_jax.errors import InputError


# ----------------------------------------------------------------------------- pure metrics

def test_truth_ratio_by_hand():
    # correct: LP -2 over 2 tokens -> P_norm e^-1; perturbed: -3/1 -> e^-3, -2/4 -> e^-0.5
    lp_t, len_t = np.array([-2.0]), np.array([2])
    lp_f, len_f = np.array([[-3.0, -2.0]]), np.array([[1, 4]])
    geo = metrics.truth_ratio(lp_t, len_t, lp_f, len_f)
    assert geo == pytest.approx([math.exp((-3 - 0.5) / 2) / math.exp(-1)], rel=1e-12)
    ari = metrics.truth_ratio(lp_t, len_t, lp_f, len_f, mean="arithmetic")
    assert ari == pytest.approx([(math.exp(-3) + math.exp(-0.5)) / 2 / math.exp(-1)], rel=1e-12)
    # ragged K: NaN marks a missing perturbed answer
    ragged = metrics.truth_ratio(np.array([-2.0, -2.0]), np.array([2, 2]),
                                 np.array([[-3.0, -2.0], [-3.0, np.nan]]), np.array([[1, 4], [1, 1]]))
    assert ragged == pytest.approx([geo[0], math.exp(-3) / math.exp(-1)], rel=1e-12)
    # batched over seeds [S, N]; log space survives probabilities that underflow float64
    far = metrics.truth_ratio(np.array([[-2000.0]]), np.array([1]), np.array([[[-2001.0]]]),
                              np.array([[1]]))
    assert far.shape == (1, 1) and far[0, 0] == pytest.approx(math.exp(-1), rel=1e-12)
    with pytest.raises(InputError, match="geometric or arithmetic"):
        metrics.truth_ratio(lp_t, len_t, lp_f, len_f, mean="median")


def test_truth_ratio_scores_by_hand():
    assert metrics.truth_ratio_forget_score([0.5, 2.0, 1.0]) == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert metrics.truth_ratio_utility_score([0.25, 2.0, 1.0]) == pytest.approx(0.75 / 3)


def test_probability_with_options_by_hand():
    # P_norm: answer e^-1 (LP -3 over 3 tokens), perturbed e^-2 and e^-0.5
    got = metrics.probability_with_options(np.array([-3.0]), np.array([3]),
                                           np.array([[-4.0, -1.0]]), np.array([[2, 2]]))
    a, b, c = math.exp(-1), math.exp(-2), math.exp(-0.5)
    assert got == pytest.approx([a / (a + b + c)], rel=1e-12)
    missing = metrics.probability_with_options(np.array([-3.0]), np.array([3]),
                                               np.array([[-4.0, np.nan]]), np.array([[2, 1]]))
    assert missing == pytest.approx([a / (a + b)], rel=1e-12)


def test_forget_quality_is_the_ks_p_value():
    # n = m = 3, completely separated samples: D = 1, exact two-sided p = 2 / C(6, 3) = 0.1
    assert metrics.forget_quality([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]) == pytest.approx(0.1)
    # identical samples: D = 0, p = 1
    assert metrics.forget_quality([0.3, 0.7, 1.5], [0.3, 0.7, 1.5]) == pytest.approx(1.0)
    # KS on log R equals KS on R (monotone map), the value scipy reports on the raw ratios
    from scipy import stats

    rng = np.random.default_rng(0)
    a, b = np.exp(rng.normal(size=12)), np.exp(rng.normal(0.8, size=15))
    assert metrics.forget_quality(a, b) == pytest.approx(stats.ks_2samp(a, b).pvalue, rel=1e-12)


def test_harmonic_mean_and_model_utility_by_hand():
    assert metrics.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert metrics.harmonic_mean([0.9, 0.0, 0.4]) == 0.0
    with pytest.raises(InputError):
        metrics.harmonic_mean([0.5, -0.1])
    components = dict(zip(metrics.UTILITY_COMPONENTS, [0.5, 0.25, 1.0, 0.5, 0.5, 0.5, 1.0, 1.0, 0.25]))
    assert metrics.model_utility(components) == pytest.approx(9 / (2 + 4 + 1 + 2 + 2 + 2 + 1 + 1 + 4))
    assert metrics.model_utility({**components, "rouge_world_facts": 0.0}) == 0.0
    assert len(metrics.UTILITY_COMPONENTS) == 9
    with pytest.raises(InputError, match="retain_probability"):
        metrics.model_utility({k: v for k, v in components.items() if k != "retain_probability"})


def test_first_words_match_by_hand():
    assert metrics.first_words_match("French, and English", "French") == 1.0
    assert metrics.first_words_match("  french", "French") == 1.0            # case and spaces
    assert metrics.first_words_match("Frenchman", "French") == 0.0           # a word, not a prefix
    assert metrics.first_words_match("English French", "French") == 0.0      # first, not anywhere
    assert metrics.first_words_match("New York.", "New York") == 1.0
    assert metrics.first_words_match("New", "New York") == 0.0
    assert metrics.first_words_match("", "Paris") == 0.0
    with pytest.raises(InputError, match="no words"):
        metrics.first_words_match("Paris", " ... ")


def test_rouge_l_recall_by_hand():
    # LCS("the cat on mat", "the cat sat on the mat") = 4 words of 6
    assert metrics.rouge_l_recall("the cat on mat", "the cat sat on the mat") == pytest.approx(4 / 6)
    assert metrics.rouge_l_recall("cats running", "cat run") == pytest.approx(1.0)  # stemmed
    assert metrics.rouge_l_recall("", "the cat") == 0.0
    assert metrics.rouge_l_recall("mat the", "the mat") == pytest.approx(0.5)  # order matters


def test_bootstrap_ci():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.bootstrap_ci([2.5, 2.5, 2.5, 2.5, 2.5]) == (2.5, 2.5, 2.5)
        # two values: the resampled means are a, (a+b)/2, b with probabilities 1/4, 1/2, 1/4
        mean, low, high = metrics.bootstrap_ci([1.0, 3.0])
        assert (mean, low, high) == (2.0, 1.0, 3.0)
        values = [0.1, 0.4, 0.35, 0.2, 0.3]
        mean, low, high = metrics.bootstrap_ci(values)
        assert mean == pytest.approx(np.mean(values)) and min(values) <= low < mean < high <= max(values)
        assert metrics.bootstrap_ci(values) == (mean, low, high)  # reproducible
        _, blow, bhigh = metrics.bootstrap_ci(values, method="BCa")
        assert min(values) <= blow < bhigh <= max(values)
    assert metrics.bootstrap_ci([4.0]) == (4.0, None, None)
    assert metrics.bootstrap_ci([1.0, float("nan")])[1:] == (None, None)


# ----------------------------------------------------------------------------- suites

def test_load_suite_tofu():
    suite = suites.load_suite("tofu-forget01")
    assert [len(suite.split(s)) for s in suites.SPLITS] == [40, 40, 100, 117]
    assert suite.forget == data.load_split("forget01_perturbed")
    retain90 = data.load_split("retain90")
    assert [r["question"] for r in suite.retain] == [r["question"] for r in retain90[:40]]
    assert len(suites.load_suite("tofu-forget05", num_retain=10).forget) == 200
    quick = suites.load_suite("tofu-forget10", limit=3)
    assert [len(quick.split(s)) for s in suites.SPLITS] == [3, 3, 3, 3]
    with pytest.raises(InputError, match="unknown suite"):
        suites.load_suite("tofu-forget02")


def test_relearn_prompt_text():
    assert evaluate.relearn_prompt(" Who? ", " Her. ") == "Question: Who?\nAnswer: Her.\nQuestion: Who?\nAnswer:"


# ----------------------------------------------------------------------------- the driver

# Every question <= 12 words, every answer 4..8 words: one prompt bucket (plus the relearn one),
# one answer bucket, one generation length -> few compilations. Shared with test_eval_cli.py and
# multidevice/check_eval_mesh.py.
TINY_SUITE = json.loads((Path(__file__).parent / "fixtures" / "tiny_suite.json").read_text())
GEN = evaluate.GenerationConfig(gen_length=8, steps=4, block_length=8, batch_size=8)
SMALL = dict(mc_samples=4, generation=GEN, pairs_per_call=4, batch_size=16)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir_with_tokenizer):
    backbone = ports.load_pretrained(tiny_model_dir_with_tokenizer)
    return backbone, tokenization.backbone_tokenizer(backbone)


@pytest.fixture(scope="module")
def suite():
    return suites.suite_from_records(TINY_SUITE, name="tiny")


@pytest.fixture(scope="module")
def result(tiny, suite):
    backbone, tok = tiny
    return evaluate.evaluate_suite(backbone, tok, suite, seeds=(0, 1, 2), reference=backbone,
                                  reference_name="itself", **SMALL)


def _numbers(res):
    return {k: v for k, v in res.items() if k in metrics.METRICS}


def test_same_seed_gives_identical_metrics(tiny, suite, result):
    backbone, tok = tiny
    again = evaluate.evaluate_suite(backbone, tok, suite, seeds=(0, 1, 2), reference=backbone,
                                   reference_name="itself", **SMALL)
    assert _numbers(again) == _numbers(result)
    assert again["items"] == result["items"]
    # seed s fixes its own masks: seed 1 alone reproduces seed 1 of the 3-seed run
    one = evaluate.evaluate_suite(backbone, tok, suite, seeds=(1,), **SMALL)
    np.testing.assert_allclose(one["forget_lp"]["per_seed"], result["forget_lp"]["per_seed"][1:2],
                               rtol=1e-5)
    assert one["forget_lp"]["ci_low"] is None  # one seed: no CI
    # different seeds draw different masks
    per_seed = result["forget_lp"]["per_seed"]
    assert len(set(per_seed)) == 3


def test_result_layout(result):
    for name in metrics.METRICS:
        m = result[name]
        if name == "privleak" and m["mean"] is None:   # the model is its own reference: 0, or undefined at AUC 1
            assert result["mia_min_k"]["mean"] == 1.0 and "undefined" in m["reason"]
            continue
        assert set(m) >= {"mean", "ci_low", "ci_high", "per_seed", "n_seeds"}
        assert m["mean"] == pytest.approx(np.mean(m["per_seed"]))
        assert m["ci_low"] <= m["mean"] + 1e-12 and m["mean"] <= m["ci_high"] + 1e-12
    cost = result["cost"]
    assert cost["wall_clock_s"] > 0 and cost["peak_rss_bytes"] > 10 * 2**20
    # forget: paraphrased + 2 perturbed + answer + paraphrased question + relearn; retain: 4;
    # real authors / world facts: answer (also the truth-ratio "correct") + perturbed
    assert cost["scored_pairs"] == 2 * 6 + 4 + 3 + (3 + 2)
    assert result["config"]["splits"]["forget"] == {"source": "tiny:forget", "n": 2}


def test_lp_matches_the_likelihood_with_the_pair_keys(tiny, result):
    backbone, tok = tiny
    rec = TINY_SUITE["forget"][1]
    prompt = data.encode_prompt(tok, rec["question"])
    answer = data.encode_answer(tok, rec["answer"])
    pair = likelihood.Pair("forget/1/answer", tuple(prompt), tuple(answer))
    pad = tokenization.pad_token_id(tok, backbone)
    for s in (0, 2):
        key = jax.random.fold_in(jax.random.key(s), pair.key_data)
        lp = likelihood.answer_log_likelihood_jit(
            backbone, np.asarray([prompt]), np.ones((1, len(prompt))), np.asarray([answer]),
            np.ones((1, len(answer))), key[None], mc_samples=4)
        assert result["items"][1]["lp_per_seed"][s] == pytest.approx(float(lp[0]), rel=1e-5)


def test_aggregates_match_the_items(result):
    items = {s: [i for i in result["items"] if i["split"] == s] for s in suites.SPLITS}
    lp = np.array([i["lp_per_seed"] for i in items["forget"]])  # [N, S]
    assert result["forget_lp"]["per_seed"] == pytest.approx(lp.mean(axis=0).tolist(), rel=1e-12)
    para = np.array([i["paraphrase_lp_per_seed"] for i in items["forget"]])
    assert result["paraphrase_forget_lp"]["per_seed"] == pytest.approx(para.mean(axis=0).tolist())
    relearn = np.array([i["relearn_lp_per_seed"] for i in items["forget"]])
    assert result["relearn_forget_lp"]["per_seed"] == pytest.approx(relearn.mean(axis=0).tolist())
    # truth ratio of the forget set: mean min(R, 1/R), per seed
    tr = np.array([i["truth_ratio_per_seed"] for i in items["forget"]])
    assert result["truth_ratio_forget"]["per_seed"] == pytest.approx(
        np.minimum(tr, 1 / tr).mean(axis=0).tolist(), rel=1e-12)
    tr = np.array([i["truth_ratio_per_seed"] for i in items["retain"]])
    assert result["retain_truth_ratio"]["per_seed"] == pytest.approx(
        np.maximum(0, 1 - tr).mean(axis=0).tolist(), abs=1e-12)
    # retain probability: mean exp(LP / |a|)
    lp = np.array([i["lp_per_seed"] for i in items["retain"]])
    n = np.array([i["answer_tokens"] for i in items["retain"]])[:, None]
    assert result["retain_probability"]["per_seed"] == pytest.approx(
        np.exp(lp / n).mean(axis=0).tolist(), rel=1e-12)
    # ROUGE: greedy, seed-independent, recomputed from the stored generations
    for s in suites.SPLITS:
        expect = np.mean([metrics.rouge_l_recall(i["generation"], i["answer"]) for i in items[s]])
        assert result[f"rouge_{s}"]["per_seed"] == [pytest.approx(expect)] * 3
        assert result[f"rouge_{s}"]["ci_low"] == result[f"rouge_{s}"]["ci_high"] == result[f"rouge_{s}"]["mean"]
    # model utility: harmonic mean of the 9 per-seed components
    for k in range(3):
        comps = {c: result[c]["per_seed"][k] for c in metrics.UTILITY_COMPONENTS}
        assert result["model_utility"]["per_seed"][k] == pytest.approx(metrics.model_utility(comps))


def test_reference_itself_gives_forget_quality_one(result):
    # the reference scored on the same masks has the same forget-set truth ratios: KS p = 1
    assert result["forget_quality"]["per_seed"] == [1.0, 1.0, 1.0]
    assert result["config"]["reference"] == "itself"
    for item in result["items"]:
        if item["split"] == "forget":
            assert item["reference_truth_ratio_per_seed"] == item["truth_ratio_per_seed"]


def test_no_reference_is_null_with_reason(tiny, suite):
    backbone, tok = tiny
    res = evaluate.evaluate_suite(backbone, tok, suite, seeds=(0,), estimator="one_step",
                                 no_reference_reason="no twin here", generation=GEN,
                                 pairs_per_call=4, batch_size=16)
    fq = res["forget_quality"]
    assert fq["mean"] is None and fq["ci_low"] is None and fq["reason"] == "no twin here"
    assert res["config"]["mc_samples"] is None


def test_deterministic_estimator_shared_by_seeds(tiny, suite):
    backbone, tok = tiny
    res = evaluate.evaluate_suite(backbone, tok, suite, seeds=(0, 1), estimator="one_step",
                                 generation=GEN, pairs_per_call=4, batch_size=16)
    m = res["forget_lp"]
    assert m["per_seed"][0] == m["per_seed"][1] and m["ci_low"] == m["ci_high"] == m["mean"]
    assert res["cost"]["scored_rows"] == res["cost"]["scored_pairs"]


def test_plain_question_answer_suites_are_scored_and_the_rest_is_not_available(tiny):
    """A suite of plain question/answer records (no paraphrases, no perturbed answers, no utility
    splits): every metric the records allow is computed, the others are null with their reason."""
    backbone, tok = tiny
    plain = {s: [{"question": r["question"], "answer": r["answer"]} for r in TINY_SUITE[s]] for s in ("forget", "retain")}
    res = evaluate.evaluate_suite(backbone, tok, suites.suite_from_records(plain), seeds=(0,), **SMALL)
    assert res["forget_lp"]["mean"] is not None and res["rouge_retain"]["mean"] is not None
    assert res["relearn_forget_lp"]["mean"] is not None and res["retain_probability"]["mean"] is not None
    assert res["truth_ratio_forget"]["reason"] == ("not available: the suite's forget records do not all have "
                                                   "paraphrased_answer and perturbed_answer")
    assert res["paraphrase_forget_lp"]["reason"].endswith("a paraphrased_question")
    assert res["world_facts_lp"]["reason"] == "the suite has no world_facts records"
    assert res["model_utility"]["reason"].startswith("not available: it needs retain_truth_ratio")
    assert res["forget_quality"]["mean"] is None
    full = evaluate.evaluate_suite(backbone, tok, suites.suite_from_records(TINY_SUITE), seeds=(0,), **SMALL)
    np.testing.assert_array_equal(res["forget_lp"]["per_seed"], full["forget_lp"]["per_seed"])  # same pairs, keys


def test_bad_inputs(tiny, suite):
    backbone, tok = tiny
    with pytest.raises(InputError, match="no records for retain"):
        suites.suite_from_records({k: v for k, v in TINY_SUITE.items() if k != "retain"})
    with pytest.raises(InputError, match="unknown suite split"):
        suites.suite_from_records({**TINY_SUITE, "holdouts": TINY_SUITE["retain"]})
    with pytest.raises(InputError, match="distinct non-negative"):
        evaluate.evaluate_suite(backbone, tok, suite, seeds=(0, 0), **SMALL)
    with pytest.raises(InputError, match="unknown log-likelihood method"):
        evaluate.evaluate_suite(backbone, tok, suite, estimator="exact", **SMALL)


def test_privacy_metrics_match_the_privacy_functions(tiny, suite, result):
    """The eval's MIA AUCs, exact memorisation and extraction strength are `timerome_jax.privacy`
    on the forget (members) and holdout (non-members) answers; seed-independent, so CI = [m, m]."""
    from timerome_jax import api, facts, privacy

    backbone, tok = tiny
    as_facts = {s: [facts.Fact(prompt=r["question"], answer=r["answer"], kind="question") for r in suite.split(s)]
                for s in ("forget", "holdout")}
    report = api.membership_inference(backbone, tok, as_facts["forget"], as_facts["holdout"])
    for attack in privacy.ATTACKS:
        assert result[f"mia_{attack}"]["mean"] == pytest.approx(report[f"mia_{attack}_auc"])
        assert result[f"mia_{attack}"]["per_seed"] == [result[f"mia_{attack}"]["mean"]] * 3
    for name in ("exact_memorization", "extraction_strength"):
        assert result[name]["mean"] == pytest.approx(report[name])
        assert result[name]["ci_low"] == result[name]["ci_high"] == result[name]["mean"]
    holdout = [i for i in result["items"] if i["split"] == "holdout"]
    assert len(holdout) == 2 and set(holdout[0]["mia_scores"]) == set(privacy.ATTACKS)
    # no holdout records: the attacks are null with the reason, memorisation is still there
    plain = suites.suite_from_records({k: v for k, v in TINY_SUITE.items() if k != "holdout"}, name="tiny")
    res = evaluate.evaluate_suite(backbone, tok, plain, seeds=(0,), **SMALL)
    assert res["mia_loss"]["mean"] is None and "no holdout" in res["mia_loss"]["reason"]
    assert res["exact_memorization"]["mean"] == pytest.approx(report["exact_memorization"])


def test_fact_bootstrap_ci_against_the_enumerated_two_way_bootstrap():
    import itertools

    from timerome_jax.metrics import fact_bootstrap_ci

    x = np.array([[0.0, -1.0, -9.0], [2.0, 1.0, -3.0]])  # [builds, facts]
    # every (builds drawn, facts drawn) pair is equally likely: 2^2 x 3^3 = 108 resamples
    exact = [x[np.ix_(b, f)].mean() for b in itertools.product(range(2), repeat=2)
             for f in itertools.product(range(3), repeat=3)]
    want_low, want_high = np.quantile(exact, [0.025, 0.975])
    mean, low, high = fact_bootstrap_ci(x, n_resamples=20000)
    assert mean == pytest.approx(x.mean())
    spread = max(exact) - min(exact)
    assert abs(low - want_low) < spread / 10 and abs(high - want_high) < spread / 10


def test_fact_bootstrap_ci_widens_with_the_spread_between_builds():
    from timerome_jax.metrics import fact_bootstrap_ci

    facts = np.array([-3.0, -1.0, 0.0, 0.5, -0.5, -2.0, 1.0, -1.5])
    same = np.stack([facts] * 5)
    _, low0, high0 = fact_bootstrap_ci(same)
    offsets = np.array([-4.0, -2.0, 0.0, 2.0, 4.0])[:, None]
    _, low1, high1 = fact_bootstrap_ci(same + offsets)       # same mean, builds disagree
    assert high1 - low1 > 1.5 * (high0 - low0)
    # a shift moves the interval with it; one build is a facts-only bootstrap; degenerate inputs
    m2, low2, high2 = fact_bootstrap_ci(same + 10.0)
    assert (low2, high2) == pytest.approx((low0 + 10.0, high0 + 10.0))
    assert fact_bootstrap_ci(facts)[1:] == pytest.approx(fact_bootstrap_ci(facts[None])[1:])
    assert fact_bootstrap_ci([[2.0]]) == (2.0, None, None)
    assert fact_bootstrap_ci(np.full((3, 4), -1.0)) == (-1.0, -1.0, -1.0)
    with pytest.raises(InputError, match="builds, facts"):
        fact_bootstrap_ci(np.zeros((2, 2, 2)))


def test_loss_tail_counts_the_facts_losing_more_than_each_threshold():
    from timerome_jax.metrics import loss_tail

    change = [0.2, -0.5, -1.5, -7.0, -30.0, 3.0, -1.0, -5.0]
    tail = loss_tail(change, [f"q{i}" for i in range(8)])
    assert tail["num_facts"] == 8
    assert tail["share_losing_over_1"] == 4 / 8        # -1.5, -7, -30, -5 (exactly -1 does not count)
    assert tail["share_losing_over_5"] == 2 / 8        # -7, -30 (exactly -5 does not count)
    assert [w["fact"] for w in tail["worst"]] == ["q4", "q3", "q7", "q2", "q6"]
    assert tail["worst"][0]["change"] == -30.0
    with pytest.raises(InputError, match="3 labels for 8 facts"):
        loss_tail(change, ["a", "b", "c"])
