"""Membership inference and memorisation metrics: hand-computed cases and an MDLM reference."""

import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ports
from timerome_jax import privacy
from timerome_jax.errors import InputError
from timerome_jax.likelihood import Pair

FIXTURES = Path(__file__).parent / "fixtures"


def test_auc_counts_pairs_and_half_ties():
    # members 3, 1; non-members 2, 1: pairs (3>2) (3>1) (1<2) (1=1) -> (1 + 1 + 0 + 0.5) / 4
    assert privacy.auc([3, 1], [2, 1]) == pytest.approx(0.625)
    assert privacy.auc([5, 6], [1, 2]) == 1.0 and privacy.auc([1, 2], [5, 6]) == 0.0
    with pytest.raises(InputError, match="at least one member"):
        privacy.auc([], [1.0])


def test_attack_scores_by_hand():
    stats = {"token_lp": np.array([-1.0, -4.0, -0.5, -2.0, -3.0]), "mean": np.array([-1.0, -2.0, -1.0, -1.0, -1.0]),
             "std": np.array([1.0, 2.0, 0.5, 1.0, 2.0]), "correct": np.array([True, False, True, False, True]),
             "prefix": 2}
    text = "an answer"
    assert privacy.attack_score("loss", stats, text) == pytest.approx(-10.5 / 5)
    # open-unlearning's ZLib: the mean token score over the zlib length of the answer text
    assert privacy.attack_score("zlib", stats, text) == pytest.approx(-10.5 / 5 / len(zlib.compress(text.encode())))
    # k = 0.4 of 5 tokens = the 2 lowest: -4, -3
    assert privacy.attack_score("min_k", stats, text) == pytest.approx(-3.5)
    # z = (lp - mean) / std = 0, -1, 1, -1, -1 -> the 2 lowest: -1, -1
    assert privacy.attack_score("min_k_plus_plus", stats, text) == pytest.approx(-1.0)
    assert privacy.exact_memorization(stats) == pytest.approx(0.6)
    assert privacy.extraction_strength(stats) == pytest.approx(1 - 2 / 5)
    # open-unlearning (after MUSE) scores 1 - AUC: ((1 - a) - (1 - r)) / (1 - r) * 100
    assert privacy.privleak(0.75, 0.5) == pytest.approx((0.25 - 0.5) / 0.5 * 100)   # -50
    assert privacy.privleak(1.0, 0.6) == pytest.approx(-100.0)
    assert privacy.privleak(0.6, 0.6) == 0.0
    assert privacy.privleak(0.3, 0.6) == pytest.approx((0.7 - 0.4) / 0.4 * 100)      # +75: over-unlearned
    with pytest.raises(InputError, match="unknown attack"):
        privacy.attack_score("gradnorm", stats, text)
    with pytest.raises(InputError, match="reference AUC below 1"):
        privacy.privleak(0.5, 1.0)


def test_min_k_keeps_floor_k_n_tokens():
    lp = np.array([-1.0, -7.0, -2.0, -6.0, -3.0, -5.0, -4.0])       # 7 tokens, k = 0.4: floor(2.8) = 2
    assert privacy.lowest_mean(lp) == pytest.approx(-6.5)
    assert privacy.lowest_mean(lp[:2]) == pytest.approx(-7.0)        # floor(0.8) = 0 -> at least one
    assert privacy.lowest_mean(lp, k=1.0) == pytest.approx(-4.0)


def test_membership_report_direction():
    """Members with higher token log-probabilities than non-members: every attack's AUC is 1."""
    def stats(lp):
        lp = np.asarray(lp, np.float64)
        return {"token_lp": lp, "mean": np.full_like(lp, -3.0), "std": np.ones_like(lp),
                "correct": lp > -1, "prefix": 0}
    members = [stats([-0.1, -0.2, -0.3]), stats([-0.2, -0.1, -0.5])]
    others = [stats([-2.0, -3.0, -2.5]), stats([-4.0, -1.5, -2.0])]
    report = privacy.membership_report(members, ["abc", "abd"], others, ["xyz", "xyw"])
    assert all(report[f"mia_{a}_auc"] == 1.0 for a in privacy.ATTACKS)
    assert report["exact_memorization"] == 1.0 and report["extraction_strength"] == 1.0


def test_token_statistics_match_a_direct_forward():
    """One-step statistics from a forward written here: prompt + fully masked answer."""
    bb = ports.load_pretrained(FIXTURES / "llada")
    rng = np.random.default_rng(0)
    pairs = [Pair("a", tuple(rng.integers(0, 370, 5).tolist()), tuple(rng.integers(0, 370, 3).tolist())),
             Pair("b", tuple(rng.integers(0, 370, 7).tolist()), tuple(rng.integers(0, 370, 4).tolist()))]
    stats = privacy.token_statistics(bb, pairs, pad_id=378, pairs_per_call=2)
    mask_id = bb.mask_token_id
    for pair, s in zip(pairs, stats):
        P, A = len(pair.prompt_ids), len(pair.answer_ids)

        def logp_at(revealed):
            ids = list(pair.prompt_ids) + [t if j < revealed else mask_id for j, t in enumerate(pair.answer_ids)]
            logits = bb.logits(jnp.asarray([ids]))[0]           # llada: no logit shift
            return np.asarray(jax.nn.log_softmax(logits[P:], -1))

        logp = logp_at(0)
        np.testing.assert_allclose(s["token_lp"], logp[np.arange(A), pair.answer_ids], atol=1e-4)
        probs = np.exp(logp)
        np.testing.assert_allclose(s["mean"], (probs * logp).sum(-1), atol=1e-4)
        np.testing.assert_array_equal(s["correct"], logp.argmax(-1) == np.asarray(pair.answer_ids))
        prefix = next((k for k in range(A) if (logp_at(k).argmax(-1)[k:] == np.asarray(pair.answer_ids)[k:]).all()), A)
        assert s["prefix"] == prefix


def test_membership_inference_api_against_itself_has_no_privleak(tiny_model_dir_with_tokenizer):
    from timerome_jax import api

    bb = ports.load_pretrained(tiny_model_dir_with_tokenizer)
    tok = api.tokenizer(bb)
    members = [api.Fact(prompt="the cat sat on the", answer="mat", subject="the cat"),
               api.Fact(prompt="the old city is", answer="far away", subject="the old city")]
    others = [api.Fact(prompt="the author speaks", answer="at home", subject="the author")]
    report = api.membership_inference(bb, tok, members, others, reference=bb)
    for attack in privacy.ATTACKS:
        assert 0.0 <= report[f"mia_{attack}_auc"] <= 1.0
        assert report[f"mia_{attack}_auc"] == report["reference"][f"mia_{attack}_auc"]
    # 0 against itself, undefined (None) where the reference separates the sets perfectly
    assert report["privleak"] == (0.0 if report["reference"]["mia_min_k_auc"] < 1 else None)
    assert 0.0 <= report["exact_memorization"] <= 1.0 and 0.0 <= report["extraction_strength"] <= 1.0
