"""The TOFU metrics (DESIGN.md §4) as pure functions on arrays, checked by hand in the tests.

The driver that scores a model and computes them is `timerome_jax.evaluate.evaluate_suite`.

Definitions (TOFU / open-unlearning, adapted to masked diffusion LMs, where LP(a | q) is the answer
log-likelihood estimate of `timerome_jax.likelihood`, in nats summed over the |a| answer tokens):

* ForgetLP / RetainLP / RealAuthorLP (and WorldFactsLP): mean over the QA pairs of LP(answer | q).
* Normalised probability: P_norm(a) = exp(LP(a | q) / |a|) (open-unlearning's exp(-avg_loss)).
* Truth ratio of a question: R = P_norm(perturbed) / P_norm(correct), where "correct" is the
  paraphrased answer (the answer itself when a record has none: real authors, world facts) and the
  perturbed answers are combined by a geometric mean (`truth_ratio_mean="geometric"`, default:
  open-unlearning averages the per-token losses of the perturbed answers before exponentiating,
  i.e. R = exp(mean_k log P_norm(pert_k) - log P_norm(correct))) or an arithmetic one
  (`"arithmetic"`: R = mean_k P_norm(pert_k) / P_norm(correct)). Computed in log space.
  truth_ratio_forget = mean over questions of min(R, 1/R); the utility component on the other
  splits = mean of max(0, 1 - R).
* Forget quality: the two-sample Kolmogorov-Smirnov p-value (`scipy.stats.ks_2samp`, default exact /
  asymptotic choice) between the forget-set R values of the evaluated model and those of the retain
  twin (`reference`), computed per seed with the same MC masks for both models. KS is invariant
  under the monotone map R -> log R, which is what is compared (no overflow).
* Probability component of model utility: retain = mean P_norm(answer); real authors / world
  facts = mean of P_norm(answer) / (P_norm(answer) + sum_k P_norm(perturbed_k)).
* ROUGE-L recall: `rouge_score` `rougeL` (stemmed, as TOFU), recall of the greedy generation
  (decoded with `data.decode_answer`) against the reference `answer`.
* model_utility: harmonic mean of the 9 numbers {retain, real_authors, world_facts} x
  {probability, ROUGE-L recall, truth-ratio component}; 0 if any of them is 0.
* Robustness: paraphrase_forget_lp = ForgetLP with `paraphrased_question` in place of the question;
  relearn_forget_lp = LP of the forget answer after the prompt
  `format_prompt(q) + " " + answer + "\\n" + format_prompt(q)` (the QA pair shown once, then asked).
* Uncertainty: each metric is computed per seed; `mean` is the mean over seeds and
  [`ci_low`, `ci_high`] the 95% bootstrap CI of that mean (`scipy.stats.bootstrap`, percentile
  method by default, 9,999 resamples, generator seeded with 0, so the CI is reproducible). With one
  seed there is no CI (null); when all seeds agree the CI is [mean, mean] (no resampling).
"""

from __future__ import annotations

import functools
import string
import warnings
from typing import Sequence

import numpy as np

from timerome_jax.errors import InputError
from timerome_jax.suites import UTILITY_SPLITS

# metric name -> one-line description (the order of the table printed by `timerome eval`)
METRICS = {
    "forget_lp": "ForgetLP: mean LP(answer | question) on the forget set (nats per answer)",
    "retain_lp": "RetainLP: the same on the retain subset",
    "real_author_lp": "RealAuthorLP: the same on real authors",
    "world_facts_lp": "the same on world facts",
    "paraphrase_forget_lp": "ForgetLP with the paraphrased question",
    "relearn_forget_lp": "ForgetLP with the QA pair shown in the prompt first",
    "truth_ratio_forget": "mean min(R, 1/R) on the forget set",
    "forget_quality": "KS-test p-value of forget-set R vs the retain twin",
    "model_utility": "harmonic mean of the 9 utility components",
    "rouge_forget": "ROUGE-L recall of greedy generations, forget set",
    "rouge_retain": "ROUGE-L recall, retain subset",
    "rouge_real_authors": "ROUGE-L recall, real authors",
    "rouge_world_facts": "ROUGE-L recall, world facts",
    "forget_probability": "mean P_norm(answer), forget set",
    "retain_probability": "mean P_norm(answer), retain subset",
    "real_authors_probability": "mean P(answer) / (P(answer) + sum P(perturbed)), real authors",
    "world_facts_probability": "the same, world facts",
    "retain_truth_ratio": "mean max(0, 1 - R), retain subset",
    "real_authors_truth_ratio": "mean max(0, 1 - R), real authors",
    "world_facts_truth_ratio": "mean max(0, 1 - R), world facts",
    # membership inference and memorisation (timerome_jax.privacy: one-step per-token statistics)
    "mia_loss": "LOSS attack AUC, forget vs holdout (1: members fully visible, 0.5: chance)",
    "mia_zlib": "ZLib attack AUC, forget vs holdout",
    "mia_min_k": "Min-K % attack AUC (k = 0.4), forget vs holdout",
    "mia_min_k_plus_plus": "Min-K %++ attack AUC, forget vs holdout",
    "privleak": "open-unlearning's PrivLeak on mia_min_k vs the retain twin (0: as private as it)",
    "exact_memorization": "share of forget answer tokens that are the argmax, answer masked",
    "extraction_strength": "1 - shortest revealed forget-answer prefix after which the rest is the argmax",
}
# metrics from `timerome_jax.privacy`: seed-independent (one-step), computed once per model
PRIVACY_METRICS = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "privleak", "exact_memorization",
                   "extraction_strength")
UTILITY_COMPONENTS = tuple(f"{kind}_{split}" if kind == "rouge" else f"{split}_{kind}"
                           for split in UTILITY_SPLITS
                           for kind in ("probability", "rouge", "truth_ratio"))

def normalized_log_probability(lp, lengths) -> np.ndarray:
    """log P_norm = LP / |a| (float64; NaN stays NaN)."""
    lp, lengths = np.asarray(lp, np.float64), np.asarray(lengths, np.float64)
    if np.any(lengths[np.isfinite(lengths)] <= 0):
        raise InputError("answer lengths must be positive")
    return lp / lengths


def log_truth_ratio(lp_true, len_true, lp_false, len_false, *, mean: str = "geometric") -> np.ndarray:
    """log R per question: float64 [..., N].

    lp_true, len_true: [..., N] LP and token count of the correct (paraphrased) answer.
    lp_false, len_false: [..., N, K] the same for the K perturbed answers; NaN in `lp_false` marks a
    missing perturbed answer (ragged K).
    mean: 'geometric' (open-unlearning) or 'arithmetic' over the perturbed answers.
    """
    if mean not in ("geometric", "arithmetic"):
        raise InputError(f"unknown truth-ratio mean {mean!r}; choose geometric or arithmetic")
    true = normalized_log_probability(lp_true, len_true)
    false = normalized_log_probability(lp_false, len_false)
    present = ~np.isnan(false)
    if not np.all(present.any(axis=-1)):
        raise InputError("every question needs at least one perturbed answer")
    count = present.sum(axis=-1)
    if mean == "geometric":
        combined = np.where(present, false, 0.0).sum(axis=-1) / count
    else:
        top = np.max(np.where(present, false, -np.inf), axis=-1)
        shifted = np.where(present, np.exp(false - top[..., None]), 0.0).sum(axis=-1)
        combined = top + np.log(shifted) - np.log(count)
    return combined - true


def truth_ratio(lp_true, len_true, lp_false, len_false, *, mean: str = "geometric") -> np.ndarray:
    """R = P_norm(perturbed) / P_norm(correct) per question (see `log_truth_ratio`)."""
    return np.exp(log_truth_ratio(lp_true, len_true, lp_false, len_false, mean=mean))


def truth_ratio_forget_score(ratios) -> float:
    """Forget set: mean over questions of min(R, 1/R) (1 = the model cannot tell true from false)."""
    log_r = np.log(np.asarray(ratios, np.float64))
    return float(np.mean(np.exp(-np.abs(log_r))))


def truth_ratio_utility_score(ratios) -> float:
    """Retain / real authors / world facts: mean over questions of max(0, 1 - R)."""
    return float(np.mean(np.maximum(0.0, 1.0 - np.asarray(ratios, np.float64))))


def probability_with_options(lp_true, len_true, lp_false, len_false) -> np.ndarray:
    """P_norm(answer) / (P_norm(answer) + sum_k P_norm(perturbed_k)) per question, float64 [..., N]
    (log-sum-exp; NaN in `lp_false` marks a missing perturbed answer)."""
    true = normalized_log_probability(lp_true, len_true)
    false = normalized_log_probability(lp_false, len_false)
    both = np.concatenate([true[..., None], np.where(np.isnan(false), -np.inf, false)], axis=-1)
    top = np.max(both, axis=-1, keepdims=True)
    log_total = top[..., 0] + np.log(np.exp(both - top).sum(axis=-1))
    return np.exp(true - log_total)


def forget_quality(ratios_model, ratios_reference) -> float:
    """KS two-sample p-value between the forget-set truth ratios of two models."""
    from scipy import stats

    a = np.log(np.asarray(ratios_model, np.float64))
    b = np.log(np.asarray(ratios_reference, np.float64))
    if a.size == 0 or b.size == 0:
        raise InputError("forget quality needs at least one truth ratio per model")
    return float(stats.ks_2samp(a, b).pvalue)


def harmonic_mean(values) -> float:
    """Harmonic mean of non-negative numbers; 0 if any of them is 0."""
    x = np.asarray(values, np.float64).reshape(-1)
    if x.size == 0 or not np.all(np.isfinite(x)) or np.any(x < 0):
        raise InputError(f"the harmonic mean needs finite non-negative numbers, got {x.tolist()}")
    if np.any(x == 0):
        return 0.0
    return float(x.size / np.sum(1.0 / x))


def model_utility(components: dict[str, float] | Sequence[float]) -> float:
    """Harmonic mean of the utility components (a dict with the 9 `UTILITY_COMPONENTS`, or numbers)."""
    if isinstance(components, dict):
        missing = [c for c in UTILITY_COMPONENTS if c not in components]
        if missing:
            raise InputError(f"model utility needs {', '.join(missing)}")
        return harmonic_mean([components[c] for c in UTILITY_COMPONENTS])
    return harmonic_mean(components)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(generated: str, reference: str) -> float:
    """ROUGE-L recall (rouge_score 'rougeL', stemmed): LCS(words) / words in the reference."""
    return float(_rouge_scorer().score(reference, generated)["rougeL"].recall)


def _words(text: str) -> list[str]:
    return [w for w in (w.strip(string.punctuation).casefold() for w in text.split()) if w]


def first_words_match(generated: str, target: str) -> float:
    """1.0 when the generation begins with the target's words, else 0.0: the exact match of a
    completion-style fact (CounterFact's "the ground truth is the first generated word(s)").
    Words are split on whitespace, compared case-insensitively, punctuation at their ends ignored
    ("Paris." matches "Paris")."""
    want = _words(target)
    if not want:
        raise InputError(f"the target {target!r} has no words to match")
    return float(_words(generated)[:len(want)] == want)


def bootstrap_ci(values, *, confidence: float = 0.95, n_resamples: int = 9999,
                 method: str = "percentile", rng_seed: int = 0) -> tuple[float, float | None, float | None]:
    """(mean, ci_low, ci_high) of the mean of `values` (one per seed).

    `scipy.stats.bootstrap` with `method` ('percentile' or 'BCa') and a generator seeded with
    `rng_seed`. All values equal: (mean, mean, mean), no resampling. One value: (value, None, None).
    """
    x = np.asarray(values, np.float64).reshape(-1)
    if x.size == 0:
        raise InputError("no values to bootstrap")
    if method not in ("percentile", "BCa"):
        raise InputError(f"unknown bootstrap method {method!r}; choose percentile or BCa")
    mean = float(np.mean(x))
    if not np.all(np.isfinite(x)):
        return mean, None, None
    if x.size == 1:
        return mean, None, None
    if np.all(x == x[0]):
        return mean, mean, mean
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.bootstrap((x,), np.mean, n_resamples=n_resamples, vectorized=True,
                                 confidence_level=confidence, method=method,
                                 rng=np.random.default_rng(rng_seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):
        return mean, None, None
    return mean, low, high


def fact_bootstrap_ci(values_BF, *, confidence: float = 0.95, n_resamples: int = 4000,
                      rng_seed: int = 0) -> tuple[float, float | None, float | None]:
    """(mean, ci_low, ci_high) of the mean of `values_BF` [builds, facts], resampling both units.

    Each resample draws B builds and F facts with replacement, independently, and takes the mean of
    the B x F sub-table (a two-way bootstrap, percentile interval): the interval covers the spread
    between the facts a result is measured on *and* between the memories one could have built (noise
    seeds), not only the MC masks. One build: facts only; one fact: builds only; one of each, or any
    non-finite value: (mean, None, None).
    """
    x = np.asarray(values_BF, np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.size == 0:
        raise InputError(f"fact_bootstrap_ci expects [builds, facts] values, got shape {x.shape}")
    mean = float(np.mean(x))
    if not np.all(np.isfinite(x)) or x.size == 1:
        return mean, None, None
    if np.all(x == x.flat[0]):
        return mean, mean, mean
    rng = np.random.default_rng(rng_seed)
    builds, facts = x.shape
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, 500):  # chunks keep the [chunk, B, F] gather small
        n = min(500, n_resamples - start)
        b = rng.integers(0, builds, size=(n, builds))
        f = rng.integers(0, facts, size=(n, facts))
        means[start:start + n] = x[b[:, :, None], f[:, None, :]].mean(axis=(1, 2))
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return mean, float(low), float(high)


def loss_tail(change_F, labels=None, *, thresholds=(1.0, 5.0), worst: int = 5) -> dict:
    """The tail of a per-fact change (edited − unedited LP, nats; negative = the fact lost
    probability): the share of facts losing more than each threshold, and the `worst` facts with
    their labels, most negative first. A mean hides a few facts that lose tens of nats; this shows
    them."""
    x = np.asarray(change_F, np.float64).reshape(-1)
    if x.size == 0:
        raise InputError("no facts to summarise")
    labels = [str(i) for i in range(x.size)] if labels is None else [str(label) for label in labels]
    if len(labels) != x.size:
        raise InputError(f"{len(labels)} labels for {x.size} facts")
    order = np.argsort(x, kind="stable")[:worst]
    return {"num_facts": int(x.size),
            **{f"share_losing_over_{t:g}": float(np.mean(x < -t)) for t in thresholds},
            "worst": [{"fact": labels[i], "change": float(x[i])} for i in order]}


__all__ = [
    "METRICS", "PRIVACY_METRICS", "UTILITY_COMPONENTS", "bootstrap_ci", "fact_bootstrap_ci", "first_words_match",
    "forget_quality", "loss_tail",
    "harmonic_mean", "log_truth_ratio",
    "model_utility", "normalized_log_probability", "probability_with_options", "rouge_l_recall", "truth_ratio",
    "truth_ratio_forget_score", "truth_ratio_utility_score",
]
