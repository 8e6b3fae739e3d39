"""Evaluation (DESIGN.md §4): answer log-probabilities, the TOFU metrics, robustness, bootstrap CIs.

Every metric is a function of a model (a `Backbone`; an `EditedBackbone` carries its memory into
every forward, so an edited model is evaluated by passing it instead) and of QA records. Two layers:

* Pure functions on arrays, checked by hand in the tests: `normalized_log_probability`,
  `truth_ratio`, `truth_ratio_forget_score`, `truth_ratio_utility_score`,
  `probability_with_options`, `forget_quality`, `harmonic_mean`, `model_utility`,
  `rouge_l_recall`, `bootstrap_ci`.
* The driver `evaluate_suite(backbone, tokenizer, suite, ...)`: scores every needed (prompt,
  answer) pair under every seed with `likelihood.answer_log_likelihood` in length-bucketed batches,
  generates greedily once for ROUGE, and returns a dict with one entry per metric
  (`mean`, `ci_low`, `ci_high`, `per_seed`, `n_seeds`) plus `config`, `cost` and `items`.

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
* Seeds: seed s fixes the MC-ELBO masks; pair j's key is `fold_in(key(s), crc32(pair id))` where the
  pair id is "split/index/kind", so a pair's masks depend neither on the batch it is scored in nor
  on the model (edited / unedited / reference models are scored on the same masks). Greedy
  generation is seed-independent and runs once; the 'one_step' and 'chain' estimators are
  deterministic and are scored once and shared by all seeds.
* Uncertainty: each metric is computed per seed; `mean` is the mean over seeds and
  [`ci_low`, `ci_high`] the 95% bootstrap CI of that mean (`scipy.stats.bootstrap`, percentile
  method by default, 9,999 resamples, generator seeded with 0, so the CI is reproducible). With one
  seed there is no CI (null); when all seeds agree the CI is [mean, mean] (no resampling).

Cost: pairs are sorted by (prompt, answer) length, padded to bucket lengths from `BUCKETS` (ratio
<= 1.5 between neighbours) and scored `pairs_per_call` rows at a time (rows of all seeds share
batches), so there is one compilation per bucket pair. Generation pads each group of splits that
share a generation length to its longest prompt (one compilation per group); the generation length
of a split is the smallest multiple of the block length that holds its longest reference answer
plus one end-of-text token, capped at `gen_length` (steps per block unchanged).
"""

from __future__ import annotations

import dataclasses
import functools
import resource
import sys
import time
import warnings
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ports import Backbone
from timerome_jax import data, likelihood, sampler, tokenization
from timerome_jax.errors import InputError

# ----------------------------------------------------------------------------- names

SUITES = {"tofu-forget01": "forget01_perturbed", "tofu-forget05": "forget05_perturbed",
          "tofu-forget10": "forget10_perturbed"}
SPLITS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")

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
}
UTILITY_COMPONENTS = tuple(f"{kind}_{split}" if kind == "rouge" else f"{split}_{kind}"
                           for split in UTILITY_SPLITS
                           for kind in ("probability", "rouge", "truth_ratio"))

RELEARN_TEMPLATE = '{prompt} {answer}\n{prompt}'  # prompt = data.format_prompt(question)

# Padded lengths (prompt and answer separately); neighbours differ by a factor <= 1.5.
BUCKETS = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072,
           4096, 6144, 8192)

Array = jax.Array


# ----------------------------------------------------------------------------- pure metrics

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


# ----------------------------------------------------------------------------- suites

@dataclasses.dataclass(frozen=True)
class Suite:
    """The QA records of one evaluation: forget (with paraphrased_question, paraphrased_answer and
    perturbed_answer), retain (paraphrased_answer, perturbed_answer), real_authors and world_facts
    (perturbed_answer; paraphrased_answer optional). `sources` names where each split came from."""

    name: str
    forget: list[dict]
    retain: list[dict]
    real_authors: list[dict]
    world_facts: list[dict]
    sources: dict[str, str] = dataclasses.field(default_factory=dict)

    def split(self, name: str) -> list[dict]:
        return getattr(self, name)

    def limited(self, limit: int | None) -> "Suite":
        if limit is None:
            return self
        if limit < 1:
            raise InputError(f"the per-split limit must be >= 1, got {limit}")
        return dataclasses.replace(self, **{s: self.split(s)[:limit] for s in SPLITS})


def load_suite(name: str, *, num_retain: int = 40, limit: int | None = None) -> Suite:
    """A shipped TOFU suite ('tofu-forget01' | 'tofu-forget05' | 'tofu-forget10').

    forget = forgetXX_perturbed; retain = the first `num_retain` of retain_perturbed (the first QA
    pairs of retain90, which the embedded model was trained on); real_authors_perturbed;
    world_facts_perturbed. `limit` keeps the first `limit` records of every split (--quick).
    """
    if name not in SUITES:
        raise InputError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)} "
                         "(or a JSON suite file)")
    if num_retain < 1:
        raise InputError(f"--num-retain must be >= 1, got {num_retain}")
    retain = data.load_split("retain_perturbed")
    if num_retain > len(retain):
        raise InputError(f"--num-retain {num_retain} exceeds the {len(retain)} retain QA pairs")
    suite = Suite(name=name, forget=data.load_split(SUITES[name]), retain=retain[:num_retain],
                  real_authors=data.load_split("real_authors_perturbed"),
                  world_facts=data.load_split("world_facts_perturbed"),
                  sources={"forget": SUITES[name], "retain": f"retain_perturbed[:{num_retain}]",
                           "real_authors": "real_authors_perturbed",
                           "world_facts": "world_facts_perturbed"})
    return suite.limited(limit)


def suite_from_records(records: dict[str, list[dict]], name: str = "custom") -> Suite:
    """A suite from explicit records {"forget": [...], "retain": [...], "real_authors": [...],
    "world_facts": [...]} (e.g. read from a JSON suite file); every split must be non-empty."""
    if not isinstance(records, dict):
        raise InputError("a suite is a JSON object with forget, retain, real_authors, world_facts")
    missing = [s for s in SPLITS if not records.get(s)]
    if missing:
        raise InputError(f"the suite has no records for {', '.join(missing)}")
    return Suite(name=name, **{s: list(records[s]) for s in SPLITS},
                 sources={s: f"{name}:{s}" for s in SPLITS})


def _text(record: dict, field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: needs a non-empty '{field}' string")
    return value


def _perturbed(record: dict, where: str) -> list[str]:
    value = record.get("perturbed_answer")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise InputError(f"{where}: needs a non-empty 'perturbed_answer' list of strings")
    return value


# ----------------------------------------------------------------------------- scoring

@dataclasses.dataclass(frozen=True)
class Pair:
    """One (prompt, answer) pair to score; `id` = "split/index/kind" also fixes its MC keys."""

    id: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]

    @property
    def key_data(self) -> int:
        return zlib.crc32(self.id.encode()) & 0x7FFFFFFF


def bucket_length(n: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket >= n (n itself beyond the last bucket)."""
    for b in buckets:
        if b >= n:
            return b
    return n


def _bucket(pair: Pair, max_len: int) -> tuple[int, int]:
    P, A = len(pair.prompt_ids), len(pair.answer_ids)
    pb, ab = bucket_length(P), bucket_length(A)
    if pb + ab > max_len:
        ab = max(A, max_len - pb)
        pb = max(P, max_len - ab)
    return pb, ab


_row_keys = jax.jit(jax.vmap(lambda seed, data_: jax.random.fold_in(jax.random.key(seed), data_)))


def score_pairs(backbone: Backbone, pairs: Sequence[Pair], seeds: Sequence[int], *, pad_id: int,
                estimator: str = "mc_elbo", mc_samples: int = 32, pairs_per_call: int = 8,
                batch_size: int = 32, progress: Callable | None = None, mesh=None) -> np.ndarray:
    """LP(answer | prompt) of every pair under every seed: float64 [len(seeds), len(pairs)].

    Rows (seed, pair) are grouped by bucketed (prompt, answer) length and scored `pairs_per_call` at
    a time (the last call of a group is filled with copies, discarded), `batch_size` sequences per
    forward. Deterministic estimators are scored once and repeated for every seed.

    With a `jax.sharding.Mesh` (the backbone loaded onto it, `ports.load_pretrained(mesh=...)`),
    each call holds `pairs_per_call` rows per data shard and its rows are split over the mesh's
    'data' axis (`distributed.answer_log_likelihood`); a row's key depends only on its seed and
    pair id, so the LPs equal the single-device ones.
    """
    likelihood.check_method(estimator, mc_samples, batch_size)
    if not isinstance(pairs_per_call, int) or pairs_per_call < 1:
        raise InputError(f"pairs per call must be a positive integer, got {pairs_per_call!r}")
    if mesh is not None:
        from ports.sharding import data_axis_size
        from timerome_jax import distributed

        pairs_per_call *= data_axis_size(mesh)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InputError("at least one seed is needed")
    out = np.zeros((len(seeds), len(pairs)), np.float64)
    if not pairs:
        return out
    limit = backbone.config.max_seq_len
    for p in pairs:
        if not p.prompt_ids or not p.answer_ids:
            raise InputError(f"{p.id}: the prompt or the answer tokenises to nothing")
        if len(p.prompt_ids) + len(p.answer_ids) > limit:
            raise InputError(f"{p.id}: prompt of {len(p.prompt_ids)} tokens + answer of "
                             f"{len(p.answer_ids)} tokens exceeds the model's maximum length {limit}")
    scored_seeds = seeds if estimator == "mc_elbo" else seeds[:1]
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for j, p in enumerate(pairs):
        groups.setdefault(_bucket(p, limit), []).extend((s, j) for s in range(len(scored_seeds)))
    calls = []
    for shape in sorted(groups):
        rows = groups[shape]
        for start in range(0, len(rows), pairs_per_call):
            chunk = rows[start:start + pairs_per_call]
            calls.append((shape, chunk + [chunk[0]] * (pairs_per_call - len(chunk)), len(chunk)))
    for (pb, ab), chunk, real in (progress(calls) if progress else calls):
        chosen = [pairs[j] for _, j in chunk]
        p_ids, p_mask = tokenization.pad_left([c.prompt_ids for c in chosen], pad_id, pb)
        a_ids, a_mask = tokenization.pad_right([c.answer_ids for c in chosen], pad_id, ab)
        keys = _row_keys(jnp.asarray([scored_seeds[s] for s, _ in chunk], jnp.uint32),
                         jnp.asarray([c.key_data for c in chosen], jnp.uint32))
        if mesh is None:
            values = np.asarray(likelihood.answer_log_likelihood_jit(
                backbone, p_ids, p_mask, a_ids, a_mask, keys, method=estimator,
                mc_samples=mc_samples, batch_size=batch_size), np.float64)
        else:  # the same row keys, split over 'data' after they are drawn
            values = distributed.answer_log_likelihood(
                backbone, p_ids, p_mask, a_ids, a_mask, keys, mesh, method=estimator,
                mc_samples=mc_samples, batch_size=batch_size).astype(np.float64)
        for (s, j), v in zip(chunk[:real], values[:real]):
            out[s, j] = v
    if len(scored_seeds) < len(seeds):
        out[:] = out[:1]
    return out


# ----------------------------------------------------------------------------- generation

@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Greedy low-confidence generation for ROUGE (the embedded models' final-eval schedule)."""

    gen_length: int = 96
    steps: int = 48
    block_length: int = 32
    batch_size: int = 16

    def for_answers(self, longest_answer: int) -> tuple[int, int]:
        """(G, K) for a split whose longest reference answer has `longest_answer` tokens."""
        sampler.check_schedule(self.gen_length, self.steps, self.block_length)
        per_block = self.steps // (self.gen_length // self.block_length)
        blocks = min(self.gen_length // self.block_length,
                     -(-(longest_answer + 1) // self.block_length))
        return blocks * self.block_length, blocks * per_block


def generate_answers(backbone: Backbone, tokenizer, prompts: Sequence[Sequence[int]], *,
                     gen_length: int, steps: int, block_length: int, batch_size: int,
                     pad_id: int) -> list[str]:
    """Greedy generations decoded with `data.decode_answer` (cut at end-of-text, stripped)."""
    limit = backbone.config.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest + gen_length > limit:
        raise InputError(f"a prompt of {longest} tokens + generation length {gen_length} exceeds "
                         f"the model's maximum length {limit}")
    ids = sampler.sample_many(backbone, [list(p) for p in prompts], jax.random.key(0), pad_id=pad_id,
                              batch_size=batch_size, gen_length=gen_length, steps=steps,
                              block_length=block_length, temperature=0.0)
    return [data.decode_answer(tokenizer, row) for row in ids]


# ----------------------------------------------------------------------------- the suite

def _encode_text(tokenizer, text: str) -> tuple[int, ...]:
    """Prompt text -> ids without special tokens (exactly `data.encode_prompt`'s encoding)."""
    return tuple(int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"])


def relearn_prompt(question: str, answer: str) -> str:
    """The in-context relearning prompt: the QA pair once, then the question again."""
    prompt = data.format_prompt(question)
    return RELEARN_TEMPLATE.format(prompt=prompt, answer=answer.strip())


def _split_pairs(tokenizer, split: str, records: list[dict], *, truth_only: bool = False):
    """Pairs of one split and, per record, the pair ids of its roles."""
    pairs: dict[str, Pair] = {}
    roles: list[dict[str, Any]] = []

    def add(index: int, kind: str, prompt_ids, answer_text: str) -> str:
        pid = f"{split}/{index}/{kind}"
        answer_ids = tuple(data.encode_answer(tokenizer, answer_text))
        if not answer_ids:
            raise InputError(f"{split} record {index}: the {kind} text tokenises to nothing")
        pairs[pid] = Pair(pid, tuple(prompt_ids), answer_ids)
        return pid

    for i, rec in enumerate(records):
        where = f"{split} record {i}"
        question = _text(rec, "question", where)
        prompt = tuple(data.encode_prompt(tokenizer, question))
        answer = _text(rec, "answer", where)
        r: dict[str, Any] = {}
        if split == "forget" or split == "retain":
            correct_kind, correct = "paraphrased_answer", _text(rec, "paraphrased_answer", where)
        elif isinstance(rec.get("paraphrased_answer"), str) and rec["paraphrased_answer"].strip():
            correct_kind, correct = "paraphrased_answer", rec["paraphrased_answer"]
        else:
            correct_kind, correct = "answer", answer
        r["true"] = add(i, correct_kind, prompt, correct)
        r["false"] = [add(i, f"perturbed/{k}", prompt, text)
                      for k, text in enumerate(_perturbed(rec, where))]
        if not truth_only:
            r["answer"] = add(i, "answer", prompt, answer)
        if split == "forget" and not truth_only:
            pq = _text(rec, "paraphrased_question", where)
            r["paraphrase"] = add(i, "paraphrased_question", data.encode_prompt(tokenizer, pq), answer)
            r["relearn"] = add(i, "relearn", _encode_text(tokenizer, relearn_prompt(question, answer)),
                               answer)
        roles.append(r)
    return pairs, roles


def _truth_arrays(lp: np.ndarray, column: dict[str, int], lengths: dict[str, int], roles,
                  true_key: str = "true"):
    """(lp_true [S, N], len_true [N], lp_false [S, N, K], len_false [N, K]) with NaN padding."""
    S, N = lp.shape[0], len(roles)
    K = max(len(r["false"]) for r in roles)
    lp_true = np.stack([lp[:, column[r[true_key]]] for r in roles], axis=1)
    len_true = np.asarray([lengths[r[true_key]] for r in roles], np.float64)
    lp_false = np.full((S, N, K), np.nan)
    len_false = np.ones((N, K))
    for n, r in enumerate(roles):
        for k, pid in enumerate(r["false"]):
            lp_false[:, n, k] = lp[:, column[pid]]
            len_false[n, k] = lengths[pid]
    return lp_true, len_true, lp_false, len_false


def _peak_memory() -> dict[str, Any]:
    """Measured peaks: resident set of this process (getrusage) and, where the device reports it,
    the accelerator's peak bytes in use."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    device = jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    peak = None if not stats else stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))
    return {"peak_rss_bytes": int(rss_bytes), "device": f"{device.platform}:{device.device_kind}",
            "device_peak_bytes_in_use": None if peak is None else int(peak)}


def _summary(values: Sequence[float], ci: dict[str, Any]) -> dict[str, Any]:
    mean, low, high = bootstrap_ci(values, confidence=ci["confidence"], n_resamples=ci["n_resamples"],
                                   method=ci["method"], rng_seed=ci["rng_seed"])
    return {"mean": mean, "ci_low": low, "ci_high": high,
            "per_seed": [float(v) for v in values], "n_seeds": len(values)}


def evaluate_suite(backbone: Backbone, tokenizer, suite: Suite | str, *,
                   seeds: Sequence[int] = (0, 1, 2, 3, 4), estimator: str = "mc_elbo",
                   mc_samples: int = 32, reference: Backbone | None = None,
                   reference_tokenizer=None, reference_name: str | None = None,
                   no_reference_reason: str = "no reference (retain twin) model was given",
                   truth_ratio_mean: str = "geometric", num_retain: int = 40,
                   limit: int | None = None, generation: GenerationConfig = GenerationConfig(),
                   pairs_per_call: int = 8, batch_size: int = 32, ci_method: str = "percentile",
                   n_resamples: int = 9999, progress: Callable | None = None,
                   mesh=None) -> dict[str, Any]:
    """Every metric of `METRICS` on one suite, per seed, with bootstrap CIs (see the module doc).

    Args:
      backbone: the evaluated model (an `EditedBackbone` to evaluate with a memory).
      tokenizer: its tokenizer (prompts via `data.encode_prompt`, answers via `data.encode_answer`).
      suite: a `Suite` (explicit records) or a suite name for `load_suite(name, num_retain, limit)`.
      seeds: seed s fixes the MC-ELBO masks; each metric's mean / CI is over these seeds.
      estimator, mc_samples: the LP estimator of `likelihood.answer_log_likelihood`.
      reference: the retain twin for forget quality (None: forget_quality is null, with
        `no_reference_reason`); scored on the same masks. `reference_tokenizer` defaults to
        `tokenizer`.
      truth_ratio_mean: 'geometric' (open-unlearning) or 'arithmetic' over the perturbed answers.
      limit: keep the first `limit` records of every split (also applied to an explicit `Suite`).
      generation: the greedy schedule for ROUGE.
      pairs_per_call, batch_size: pairs per compiled call, sequences per forward.
      ci_method, n_resamples: the bootstrap.
      progress: optional wrapper over the list of scoring calls (e.g. tqdm).
      mesh: a `jax.sharding.Mesh` that `backbone` (and `reference`) are loaded onto: the LP rows
        are split over its 'data' axis, `pairs_per_call` per data shard (`score_pairs`); the
        greedy generation runs on the mesh as one program (replicated rows). None: one device.

    Returns a dict: one entry per metric name ({mean, ci_low, ci_high, per_seed, n_seeds}; a
    metric that cannot be computed has nulls and a `reason`), plus 'config', 'cost' (measured
    wall-clock and peak memory) and 'items' (per QA pair: generation, ROUGE, LP per seed).
    """
    start = time.perf_counter()
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise InputError(f"seeds must be distinct non-negative integers, got {seeds}")
    likelihood.check_method(estimator, mc_samples, batch_size)
    if truth_ratio_mean not in ("geometric", "arithmetic"):
        raise InputError(f"unknown truth-ratio mean {truth_ratio_mean!r}; choose geometric or arithmetic")
    if ci_method not in ("percentile", "BCa"):
        raise InputError(f"unknown bootstrap method {ci_method!r}; choose percentile or BCa")
    sampler.check_schedule(generation.gen_length, generation.steps, generation.block_length)
    sampler.check_mask_token(backbone)
    suite = load_suite(suite, num_retain=num_retain, limit=limit) if isinstance(suite, str) \
        else suite.limited(limit)
    for s in SPLITS:
        if not suite.split(s):
            raise InputError(f"the suite has no {s} records")
    pad_id = tokenization.pad_token_id(tokenizer, backbone)

    # --- pairs and their LP under every seed
    pairs: dict[str, Pair] = {}
    roles: dict[str, list[dict]] = {}
    for s in SPLITS:
        split_pairs, roles[s] = _split_pairs(tokenizer, s, suite.split(s))
        pairs.update(split_pairs)
    pair_list = list(pairs.values())
    column = {p.id: j for j, p in enumerate(pair_list)}
    lengths = {p.id: len(p.answer_ids) for p in pair_list}
    t0 = time.perf_counter()
    lp = score_pairs(backbone, pair_list, seeds, pad_id=pad_id, estimator=estimator,
                     mc_samples=mc_samples, pairs_per_call=pairs_per_call, batch_size=batch_size,
                     progress=progress, mesh=mesh)
    scoring_s = time.perf_counter() - t0

    # --- greedy generations (seed-independent), grouped by generation length
    t0 = time.perf_counter()
    prompts = {s: [data.encode_prompt(tokenizer, r["question"]) for r in suite.split(s)] for s in SPLITS}
    schedule = {s: generation.for_answers(max(len(data.encode_answer(tokenizer, r["answer"]))
                                              for r in suite.split(s))) for s in SPLITS}
    generations: dict[str, list[str]] = {}
    for gk in sorted(set(schedule.values())):
        members = [s for s in SPLITS if schedule[s] == gk]
        texts = generate_answers(backbone, tokenizer, [p for s in members for p in prompts[s]],
                                 gen_length=gk[0], steps=gk[1], block_length=generation.block_length,
                                 batch_size=generation.batch_size, pad_id=pad_id)
        offset = 0
        for s in members:
            generations[s] = texts[offset:offset + len(prompts[s])]
            offset += len(prompts[s])
    rouge = {s: [rouge_l_recall(g, r["answer"]) for g, r in zip(generations[s], suite.split(s))]
             for s in SPLITS}
    generation_s = time.perf_counter() - t0

    # --- reference (retain twin): forget-set truth ratios on the same masks
    t0 = time.perf_counter()
    log_r_reference = None
    if reference is not None:
        ref_tok = tokenizer if reference_tokenizer is None else reference_tokenizer
        ref_pairs, ref_roles = _split_pairs(ref_tok, "forget", suite.forget, truth_only=True)
        ref_list = list(ref_pairs.values())
        ref_lp = score_pairs(reference, ref_list, seeds,
                             pad_id=tokenization.pad_token_id(ref_tok, reference),
                             estimator=estimator, mc_samples=mc_samples,
                             pairs_per_call=pairs_per_call, batch_size=batch_size, progress=progress,
                             mesh=mesh)
        log_r_reference = log_truth_ratio(
            *_truth_arrays(ref_lp, {p.id: j for j, p in enumerate(ref_list)},
                           {p.id: len(p.answer_ids) for p in ref_list}, ref_roles),
            mean=truth_ratio_mean)
    reference_s = time.perf_counter() - t0

    # --- per-seed metrics
    def mean_lp(split: str, role: str) -> np.ndarray:
        return np.mean(np.stack([lp[:, column[r[role]]] for r in roles[split]], axis=1), axis=1)

    per_seed: dict[str, np.ndarray] = {
        "forget_lp": mean_lp("forget", "answer"), "retain_lp": mean_lp("retain", "answer"),
        "real_author_lp": mean_lp("real_authors", "answer"),
        "world_facts_lp": mean_lp("world_facts", "answer"),
        "paraphrase_forget_lp": mean_lp("forget", "paraphrase"),
        "relearn_forget_lp": mean_lp("forget", "relearn"),
    }
    log_r = {s: log_truth_ratio(*_truth_arrays(lp, column, lengths, roles[s]), mean=truth_ratio_mean)
             for s in SPLITS}
    per_seed["truth_ratio_forget"] = np.asarray([truth_ratio_forget_score(np.exp(x)) for x in log_r["forget"]])
    for s in UTILITY_SPLITS:
        per_seed[f"{s}_truth_ratio"] = np.asarray([truth_ratio_utility_score(np.exp(x)) for x in log_r[s]])
    for s in ("forget", "retain"):
        per_seed[f"{s}_probability"] = np.mean(np.exp(normalized_log_probability(
            np.stack([lp[:, column[r["answer"]]] for r in roles[s]], axis=1),
            [lengths[r["answer"]] for r in roles[s]])), axis=1)
    for s in ("real_authors", "world_facts"):
        lp_t, len_t, lp_f, len_f = _truth_arrays(lp, column, lengths, roles[s], true_key="answer")
        per_seed[f"{s}_probability"] = np.mean(probability_with_options(lp_t, len_t, lp_f, len_f), axis=1)
    for s in SPLITS:
        per_seed[f"rouge_{s}"] = np.full(len(seeds), float(np.mean(rouge[s])))
    per_seed["model_utility"] = np.asarray([
        model_utility({c: float(per_seed[c][i]) for c in UTILITY_COMPONENTS}) for i in range(len(seeds))])
    if log_r_reference is not None:
        per_seed["forget_quality"] = np.asarray([
            forget_quality(np.exp(log_r["forget"][i]), np.exp(log_r_reference[i]))
            for i in range(len(seeds))])

    ci = {"method": ci_method, "confidence": 0.95, "n_resamples": n_resamples, "rng_seed": 0}
    result: dict[str, Any] = {}
    for name in METRICS:
        if name in per_seed:
            result[name] = _summary(per_seed[name], ci)
        else:
            result[name] = {"mean": None, "ci_low": None, "ci_high": None, "per_seed": None,
                            "n_seeds": len(seeds), "reason": no_reference_reason}

    # --- per-item records
    items = []
    for s in SPLITS:
        for i, (rec, r) in enumerate(zip(suite.split(s), roles[s])):
            item = {"split": s, "index": i, "question": rec["question"], "answer": rec["answer"],
                    "generation": generations[s][i], "rougeL_recall": rouge[s][i],
                    "answer_tokens": lengths[r["answer"]],
                    "lp_per_seed": lp[:, column[r["answer"]]].tolist(),
                    "truth_ratio_per_seed": np.exp(log_r[s][:, i]).tolist()}
            if s == "forget":
                item["paraphrase_lp_per_seed"] = lp[:, column[r["paraphrase"]]].tolist()
                item["relearn_lp_per_seed"] = lp[:, column[r["relearn"]]].tolist()
                if log_r_reference is not None:
                    item["reference_truth_ratio_per_seed"] = np.exp(log_r_reference[:, i]).tolist()
            items.append(item)

    result["config"] = {
        "suite": suite.name, "splits": {s: {"source": suite.sources.get(s, s), "n": len(suite.split(s))}
                                        for s in SPLITS},
        "seeds": seeds, "estimator": estimator,
        "mc_samples": mc_samples if estimator == "mc_elbo" else None,
        "truth_ratio_mean": truth_ratio_mean, "bootstrap": ci,
        "relearn_prompt": "format_prompt(q) + ' ' + answer + '\\n' + format_prompt(q)",
        "generation": {"greedy": True, "remasking": "low_confidence", "block_length": generation.block_length,
                       "max_gen_length": generation.gen_length, "max_steps": generation.steps,
                       "per_split": {s: {"gen_length": schedule[s][0], "steps": schedule[s][1]}
                                     for s in SPLITS}},
        "reference": reference_name if reference is not None else None,
        "utility_components": list(UTILITY_COMPONENTS),
        "pairs_per_call": pairs_per_call, "batch_size": batch_size,
    }
    result["cost"] = {"wall_clock_s": time.perf_counter() - start, "scoring_s": scoring_s,
                      "generation_s": generation_s, "reference_s": reference_s,
                      "scored_pairs": len(pair_list), "scored_rows": len(pair_list) * (
                          len(seeds) if estimator == "mc_elbo" else 1),
                      "generations": sum(len(suite.split(s)) for s in SPLITS),
                      **_peak_memory()}
    result["items"] = items
    return result


def metric_table(result: dict[str, Any]) -> str:
    """The metrics as an aligned text table (name, mean, 95% CI)."""
    rows = [("metric", "mean", "95% CI")]
    for name in METRICS:
        m = result.get(name)
        if m is None:
            continue
        if m["mean"] is None:
            rows.append((name, "n/a", m.get("reason", "")))
            continue
        ci = "-" if m["ci_low"] is None else f"[{m['ci_low']:.4g}, {m['ci_high']:.4g}]"
        rows.append((name, f"{m['mean']:.4g}", ci))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)


__all__ = [
    "BUCKETS", "METRICS", "SPLITS", "SUITES", "UTILITY_COMPONENTS", "GenerationConfig", "Pair", "Suite",
    "bootstrap_ci", "bucket_length", "evaluate_suite", "forget_quality", "generate_answers",
    "harmonic_mean", "load_suite", "log_truth_ratio", "metric_table", "model_utility",
    "normalized_log_probability", "probability_with_options", "relearn_prompt", "rouge_l_recall",
    "score_pairs", "suite_from_records", "truth_ratio", "truth_ratio_forget_score",
    "truth_ratio_utility_score",
]
