"""`evaluate_suite`: every metric of `metrics.METRICS` for one model on one suite, in named stages.

1. score: every (prompt, answer) pair the metrics need, under every seed (`likelihood.score_pairs`);
2. generate: greedy answers for ROUGE, once (seed-independent);
3. reference: the retain twin's forget-set truth ratios on the same masks (forget quality);
4. privacy: membership inference of the forget set against the holdout set and memorisation of the
   forget answers, for the model and the reference (`privacy_stage`; one-step, seed-independent);
5. per seed: each metric from the scores of one seed (`metrics`);
6. summarise: mean and bootstrap CI over seeds, per-item records, config and measured cost.

An edited model is evaluated by passing an edited backbone (`backbone.with_edits(memory)`).

* Seeds: seed s fixes the MC-ELBO masks; pair j's key is `fold_in(key(s), crc32(pair id))` where the
  pair id is "split/index/kind", so a pair's masks depend neither on the batch it is scored in nor
  on the model (edited / unedited / reference models are scored on the same masks). Greedy
  generation is seed-independent and runs once; the 'one_step' and 'chain' estimators are
  deterministic and are scored once and shared by all seeds.
Cost: pairs are sorted by (prompt, answer) length, padded to bucket lengths from `BUCKETS` (ratio
<= 1.5 between neighbours) and scored `pairs_per_call` rows at a time (rows of all seeds share
batches), so there is one compilation per bucket pair. Generation pads each group of splits that
share a generation length to its longest prompt (one compilation per group); the generation length
of a split is the smallest multiple of the block length that holds its longest reference answer
plus one end-of-text token, capped at `gen_length` (steps per block unchanged).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

import ports
from ports import Backbone
from ports.backbone import EMBEDDED_DIR
from timerome_jax import data, likelihood, privacy, resources, sampler, tokenization
from timerome_jax.errors import InputError
from timerome_jax.likelihood import Pair
from timerome_jax.metrics import (METRICS, PRIVACY_METRICS, UTILITY_COMPONENTS, bootstrap_ci, forget_quality, log_truth_ratio,
                                  model_utility, normalized_log_probability, probability_with_options,
                                  rouge_l_recall, truth_ratio_forget_score, truth_ratio_utility_score)
from timerome_jax.suites import SPLITS, UTILITY_SPLITS, Suite, load_suite

RELEARN_TEMPLATE = '{prompt} {answer}\n{prompt}'  # prompt = data.format_prompt(question)
# The retain twin of each embedded model that has one: forget quality's default reference.
RETAIN_TWINS = {"tofu-tiny": "tofu-tiny-retain"}


def retain_twin(model: str) -> str | None:
    """The retain twin of `model` (an embedded model's name or its directory), else None."""
    for name, twin in RETAIN_TWINS.items():
        try:
            if model == name or ports.resolve_model_path(model).resolve() == (EMBEDDED_DIR / name).resolve():
                return twin
        except ports.CheckpointError:
            pass
    return None


def load_reference(reference: str | None, model: str, tokenizer, load: Callable | None = None):
    """(backbone, tokenizer, name, reason) of the forget-quality reference: `reference` ('none'
    skips it) or the retain twin of `model`; backbone None with the reason when there is none.
    `load(name)` loads a model (default `ports.load_pretrained`; a command passes its mesh loader)."""
    name = reference if reference is not None else retain_twin(model)
    if name is not None and name.lower() == "none":
        return None, None, None, "--reference none"
    if name is None:
        return None, None, None, "no --reference given (the retain twin of this model is unknown)"
    backbone = (load or ports.load_pretrained)(name)
    ref_tokenizer = tokenization.backbone_tokenizer(backbone) if backbone.tokenizer_dir is not None else tokenizer
    return backbone, ref_tokenizer, name, ""


# --- generation ---------------------------------------------------------------------------------------

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



# --- the pairs of a suite -----------------------------------------------------------------------------

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


def _encode_text(tokenizer, text: str) -> tuple[int, ...]:
    """Prompt text -> ids without special tokens (exactly `data.encode_prompt`'s encoding)."""
    return tuple(int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"])


def relearn_prompt(question: str, answer: str) -> str:
    """The in-context relearning prompt: the QA pair once, then the question again."""
    prompt = data.format_prompt(question)
    return RELEARN_TEMPLATE.format(prompt=prompt, answer=answer.strip())


def _filled(record: dict, field: str) -> bool:
    value = record.get(field)
    return bool(value.strip()) if isinstance(value, str) else isinstance(value, list) and bool(value)


def truth_fields(split: str) -> tuple[str, ...]:
    """The fields a split's truth ratio needs (perturbed answers; forget and retain also compare
    against the paraphrased answer, the other splits against the answer itself)."""
    return ("paraphrased_answer", "perturbed_answer") if split in ("forget", "retain") else ("perturbed_answer",)


def _split_pairs(tokenizer, split: str, records: list[dict], *, truth_only: bool = False):
    """Pairs of one split and, per record, the pair ids of its roles. The truth-ratio roles (true,
    false) exist when every record has `truth_fields(split)`; the paraphrase role when every
    forget record has a paraphrased question: a plain question/answer suite is scored too."""
    pairs: dict[str, Pair] = {}
    roles: list[dict[str, Any]] = []
    truth = bool(records) and all(_filled(r, f) for r in records for f in truth_fields(split))
    paraphrase = split == "forget" and bool(records) and all(_filled(r, "paraphrased_question") for r in records)

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
        if truth:
            correct_kind = "paraphrased_answer" if _filled(rec, "paraphrased_answer") else "answer"
            r["true"] = add(i, correct_kind, prompt, rec[correct_kind])
            r["false"] = [add(i, f"perturbed/{k}", prompt, text) for k, text in enumerate(_perturbed(rec, where))]
        if not truth_only:
            r["answer"] = add(i, "answer", prompt, answer)
        if paraphrase and not truth_only:
            pq = _text(rec, "paraphrased_question", where)
            r["paraphrase"] = add(i, "paraphrased_question", data.encode_prompt(tokenizer, pq), answer)
        if split == "forget" and not truth_only:
            r["relearn"] = add(i, "relearn", _encode_text(tokenizer, relearn_prompt(question, answer)), answer)
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


# --- the stages ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Scores:
    """LP of every pair under every seed [S, pairs], with each pair's column and answer length and,
    per split and record, the pair ids of its roles (answer, true, false, paraphrase, relearn)."""

    lp: np.ndarray
    column: dict[str, int]
    lengths: dict[str, int]
    roles: dict[str, list[dict]]

    def role_lp(self, split: str, role: str) -> np.ndarray:
        """[S, N] LP of one role of every record of a split."""
        return np.stack([self.lp[:, self.column[r[role]]] for r in self.roles[split]], axis=1)

    def has(self, split: str, role: str) -> bool:
        """Whether every record of a non-empty split has this role."""
        return bool(self.roles.get(split)) and all(role in r for r in self.roles[split])

    def log_truth_ratios(self, split: str, mean: str, true_key: str = "true") -> np.ndarray:
        return log_truth_ratio(*_truth_arrays(self.lp, self.column, self.lengths, self.roles[split], true_key),
                               mean=mean)


def score_stage(backbone: Backbone, tokenizer, suite: Suite, seeds: Sequence[int], *, splits=SPLITS,
                truth_only: bool = False, **scoring) -> Scores:
    """Stage 1 (and 3, with the reference model and `truth_only`): the LPs of the suite's pairs."""
    pairs: dict[str, Pair] = {}
    roles: dict[str, list[dict]] = {}
    for s in splits:
        split_pairs, roles[s] = _split_pairs(tokenizer, s, suite.split(s), truth_only=truth_only)
        pairs.update(split_pairs)
    pair_list = list(pairs.values())
    lp = likelihood.score_pairs(backbone, pair_list, list(seeds), pad_id=tokenization.pad_token_id(tokenizer, backbone),
                                **scoring)
    return Scores(lp, {p.id: j for j, p in enumerate(pair_list)}, {p.id: len(p.answer_ids) for p in pair_list}, roles)


def generate_stage(backbone: Backbone, tokenizer, suite: Suite, generation: GenerationConfig
                   ) -> tuple[dict[str, list[str]], dict[str, tuple[int, int]]]:
    """Stage 2: greedy generations per split, and each split's (G, K) schedule."""
    pad_id = tokenization.pad_token_id(tokenizer, backbone)
    splits = [s for s in SPLITS if suite.split(s)]
    prompts = {s: [data.encode_prompt(tokenizer, r["question"]) for r in suite.split(s)] for s in splits}
    schedule = {s: generation.for_answers(max(len(data.encode_answer(tokenizer, r["answer"]))
                                              for r in suite.split(s))) for s in splits}
    generations: dict[str, list[str]] = {s: [] for s in SPLITS}
    for gk in sorted(set(schedule.values())):
        members = [s for s in splits if schedule[s] == gk]
        texts = generate_answers(backbone, tokenizer, [p for s in members for p in prompts[s]],
                                 gen_length=gk[0], steps=gk[1], block_length=generation.block_length,
                                 batch_size=generation.batch_size, pad_id=pad_id)
        offset = 0
        for s in members:
            generations[s] = texts[offset:offset + len(prompts[s])]
            offset += len(prompts[s])
    return generations, schedule


# what each metric needs from the suite: the split whose records it reads, and whether those
# records must carry the truth-ratio fields ("truth") or paraphrased questions ("paraphrase")
NEEDS = {"forget_lp": ("forget", None), "retain_lp": ("retain", None), "real_author_lp": ("real_authors", None),
         "world_facts_lp": ("world_facts", None), "paraphrase_forget_lp": ("forget", "paraphrase"),
         "relearn_forget_lp": ("forget", None), "truth_ratio_forget": ("forget", "truth"),
         "forget_quality": ("forget", "truth"), "forget_probability": ("forget", None),
         "retain_probability": ("retain", None),
         **{f"rouge_{s}": (s, None) for s in ("forget", "retain", "real_authors", "world_facts")},
         **{f"{s}_truth_ratio": (s, "truth") for s in UTILITY_SPLITS},
         **{f"{s}_probability": (s, "truth") for s in ("real_authors", "world_facts")}}


def unavailable(scores: Scores, name: str) -> str | None:
    """Why the suite's records do not allow metric `name` (None: they do; the privacy metrics say
    why themselves, `privacy_stage`)."""
    if name in PRIVACY_METRICS:
        return None
    if name == "model_utility":
        why = [c for c in UTILITY_COMPONENTS if unavailable(scores, c)]
        return f"not available: it needs {', '.join(why)}" if why else None
    split, need = NEEDS[name]
    if not scores.roles.get(split):
        return f"the suite has no {split} records"
    if need == "truth" and not scores.has(split, "true"):
        return f"not available: the suite's {split} records do not all have {' and '.join(truth_fields(split))}"
    if need == "paraphrase" and not scores.has(split, "paraphrase"):
        return "not available: the suite's forget records do not all have a paraphrased_question"
    return None


def per_seed_stage(scores: Scores, rouge: dict[str, list[float]], log_r_reference: np.ndarray | None,
                   truth_ratio_mean: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Stage 4: every metric the suite's records allow (`unavailable`), per seed [S], and the
    per-question log truth ratios per split."""
    S = scores.lp.shape[0]
    ok = {name for name in METRICS if not unavailable(scores, name)}
    per_seed: dict[str, np.ndarray] = {}
    for name, role in (("forget_lp", "answer"), ("retain_lp", "answer"), ("real_author_lp", "answer"),
                       ("world_facts_lp", "answer"), ("paraphrase_forget_lp", "paraphrase"),
                       ("relearn_forget_lp", "relearn")):
        if name in ok:
            per_seed[name] = scores.role_lp(NEEDS[name][0], role).mean(axis=1)
    log_r = {s: scores.log_truth_ratios(s, truth_ratio_mean) for s in SPLITS if scores.has(s, "true")}
    if "truth_ratio_forget" in ok:
        per_seed["truth_ratio_forget"] = np.asarray([truth_ratio_forget_score(np.exp(x)) for x in log_r["forget"]])
    for s in UTILITY_SPLITS:
        if f"{s}_truth_ratio" in ok:
            per_seed[f"{s}_truth_ratio"] = np.asarray([truth_ratio_utility_score(np.exp(x)) for x in log_r[s]])
    for s in ("forget", "retain"):
        if f"{s}_probability" in ok:
            lengths = [scores.lengths[r["answer"]] for r in scores.roles[s]]
            per_seed[f"{s}_probability"] = np.mean(np.exp(normalized_log_probability(
                scores.role_lp(s, "answer"), lengths)), axis=1)
    for s in ("real_authors", "world_facts"):
        if f"{s}_probability" in ok:
            arrays = _truth_arrays(scores.lp, scores.column, scores.lengths, scores.roles[s], true_key="answer")
            per_seed[f"{s}_probability"] = np.mean(probability_with_options(*arrays), axis=1)
    for s in SPLITS:
        if f"rouge_{s}" in ok:
            per_seed[f"rouge_{s}"] = np.full(S, float(np.mean(rouge[s])))
    if "model_utility" in ok:
        per_seed["model_utility"] = np.asarray([
            model_utility({c: float(per_seed[c][i]) for c in UTILITY_COMPONENTS}) for i in range(S)])
    if log_r_reference is not None and "forget_quality" in ok:
        per_seed["forget_quality"] = np.asarray([
            forget_quality(np.exp(log_r["forget"][i]), np.exp(log_r_reference[i])) for i in range(S)])
    return per_seed, log_r


def _qa_pairs(tokenizer, split: str, records: list[dict]) -> list[Pair]:
    return [Pair(f"{split}/{i}/answer", tuple(data.encode_prompt(tokenizer, _text(r, "question", f"{split} record {i}"))),
                 tuple(data.encode_answer(tokenizer, _text(r, "answer", f"{split} record {i}"))))
            for i, r in enumerate(records)]


@dataclasses.dataclass(frozen=True)
class Privacy:
    """The privacy stage: metric values, why the others are missing, and per item (forget and
    holdout) the attack scores and memorisation."""

    values: dict[str, float]
    missing: dict[str, str]
    items: dict[str, list[dict]]


def privacy_stage(backbone: Backbone, tokenizer, suite: Suite, *, reference: Backbone | None = None,
                  reference_tokenizer=None, no_reference_reason: str = "no reference model",
                  pairs_per_call: int = 8, mesh=None) -> Privacy:
    """Membership inference (forget = members, holdout = non-members) and memorisation of the
    forget answers from the one-step per-token statistics (`timerome_jax.privacy`); privleak
    against the reference's Min-K % AUC on the same sets."""
    def statistics(model, tok, split, prefixes):
        pairs = _qa_pairs(tok, split, suite.split(split))
        return privacy.token_statistics(model, pairs, pad_id=tokenization.pad_token_id(tok, model),
                                        pairs_per_call=pairs_per_call, prefixes=prefixes, mesh=mesh)

    texts = {s: [r["answer"].strip() for r in suite.split(s)] for s in ("forget", "holdout")}
    forget = statistics(backbone, tokenizer, "forget", True)
    items = {"forget": [{"exact_memorization": privacy.exact_memorization(st),
                         "extraction_strength": privacy.extraction_strength(st)} for st in forget], "holdout": []}
    values = {"exact_memorization": float(np.mean([i["exact_memorization"] for i in items["forget"]])),
              "extraction_strength": float(np.mean([i["extraction_strength"] for i in items["forget"]]))}
    attacks = [f"mia_{a}" for a in privacy.ATTACKS]
    if not suite.holdout:
        why = "the suite has no holdout records (the non-members of the attacks)"
        return Privacy(values, {name: why for name in attacks + ["privleak"]}, items)

    def aucs(model, tok, member_stats):
        holdout = statistics(model, tok, "holdout", False)
        scores = {s: {a: [privacy.attack_score(a, st, t) for st, t in zip(stats, texts[s])] for a in privacy.ATTACKS}
                  for s, stats in (("forget", member_stats), ("holdout", holdout))}
        return {f"mia_{a}": privacy.auc(scores["forget"][a], scores["holdout"][a]) for a in privacy.ATTACKS}, scores

    model_aucs, scores = aucs(backbone, tokenizer, forget)
    values.update(model_aucs)
    for s in ("forget", "holdout"):
        for i in range(len(suite.split(s))):
            if s == "holdout":
                items[s].append({})
            items[s][i]["mia_scores"] = {a: scores[s][a][i] for a in privacy.ATTACKS}
    missing = {}
    if reference is None:
        missing["privleak"] = no_reference_reason
    else:
        ref_tok = tokenizer if reference_tokenizer is None else reference_tokenizer
        reference_aucs, _ = aucs(reference, ref_tok, statistics(reference, ref_tok, "forget", False))
        key = f"mia_{privacy.PRIVLEAK_ATTACK}"
        value = privacy.privleak_or_none(values[key], reference_aucs[key])
        if value is None:
            missing["privleak"] = f"the reference's {key} AUC is 1: privleak is undefined"
        else:
            values["privleak"] = value
            values["reference_mia_min_k"] = reference_aucs[key]
    return Privacy(values, missing, items)


def summarise_stage(per_seed: dict[str, np.ndarray], ci: dict[str, Any], n_seeds: int,
                    missing: dict[str, str]) -> dict[str, Any]:
    """Stage 5: {metric: {mean, ci_low, ci_high, per_seed, n_seeds}} (nulls and a reason where a
    metric cannot be computed)."""
    result: dict[str, Any] = {}
    for name in METRICS:
        if name in per_seed:
            values = per_seed[name]
            mean, low, high = bootstrap_ci(values, confidence=ci["confidence"], n_resamples=ci["n_resamples"],
                                           method=ci["method"], rng_seed=ci["rng_seed"])
            result[name] = {"mean": mean, "ci_low": low, "ci_high": high,
                            "per_seed": [float(v) for v in values], "n_seeds": len(values)}
        else:
            result[name] = {"mean": None, "ci_low": None, "ci_high": None, "per_seed": None,
                            "n_seeds": n_seeds, "reason": missing[name]}
    return result


def degenerate_warnings(result: dict, scores: Scores, generations: dict[str, list[str]], vocab_size: int) -> list[str]:
    """What makes these numbers no finding: non-finite metrics, predictions as flat as a uniform
    distribution over the vocabulary, empty generations."""
    warnings = [f"{name} is not finite ({result[name]['mean']})" for name in METRICS
                if result[name]["mean"] is not None and not np.isfinite(result[name]["mean"])]
    lengths = np.asarray([scores.lengths[p] for p in scores.column], np.float64)
    per_token = scores.lp[:, list(scores.column.values())] / lengths
    if np.isfinite(per_token).all() and abs(per_token.mean() + np.log(vocab_size)) < 0.01 * np.log(vocab_size):
        warnings.append(f"the answers' log-probability is {per_token.mean():.3f} nats per token, that of a uniform "
                        f"distribution over the {vocab_size} tokens: the model is degenerate")
    empty = sum(not g.strip() for texts in generations.values() for g in texts)
    if empty:
        warnings.append(f"{empty} of {sum(map(len, generations.values()))} greedy generations are empty")
    return warnings


def _items(suite: Suite, scores: Scores, generations, rouge, log_r, log_r_reference, private: Privacy) -> list[dict]:
    items = []
    for s in SPLITS:
        for i, (rec, r) in enumerate(zip(suite.split(s), scores.roles[s])):
            item = {"split": s, "index": i, "question": rec["question"], "answer": rec["answer"],
                    "generation": generations[s][i], "rougeL_recall": rouge[s][i],
                    "answer_tokens": scores.lengths[r["answer"]],
                    "lp_per_seed": scores.lp[:, scores.column[r["answer"]]].tolist(),
                    "truth_ratio_per_seed": np.exp(log_r[s][:, i]).tolist() if s in log_r else None}
            if s == "forget":
                if "paraphrase" in r:
                    item["paraphrase_lp_per_seed"] = scores.lp[:, scores.column[r["paraphrase"]]].tolist()
                item["relearn_lp_per_seed"] = scores.lp[:, scores.column[r["relearn"]]].tolist()
                if log_r_reference is not None:
                    item["reference_truth_ratio_per_seed"] = np.exp(log_r_reference[:, i]).tolist()
                item.update(private.items["forget"][i])
            items.append(item)
    for i, (rec, extra) in enumerate(zip(suite.holdout, private.items["holdout"])):
        items.append({"split": "holdout", "index": i, "question": rec["question"], "answer": rec["answer"], **extra})
    return items


def evaluate_suite(backbone: Backbone, tokenizer, suite: Suite | str, *,
                   seeds: Sequence[int] = (0, 1, 2, 3, 4), estimator: str = "mc_elbo",
                   mc_samples: int = 32, reference: Backbone | None = None,
                   reference_tokenizer=None, reference_name: str | None = None,
                   no_reference_reason: str = "no reference (retain twin) model was given",
                   truth_ratio_mean: str = "geometric", num_retain: int = 40,
                   limit: int | None = None, generation: GenerationConfig = GenerationConfig(),
                   pairs_per_call: int = 8, batch_size: int = 32, ci_method: str = "percentile",
                   n_resamples: int = 9999, progress: Callable | None = None,
                   stage: Callable[[str], None] | None = None, mesh=None) -> dict[str, Any]:
    """Every metric of `METRICS` on one suite, per seed, with bootstrap CIs (module docstring).

    Args:
      backbone: the evaluated model (edited: `backbone.with_edits(memory)`).
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
      stage: optional callback, called with a line naming each stage as it starts (progress of a
        long evaluation).
      mesh: a `jax.sharding.Mesh` that `backbone` (and `reference`) are loaded onto: the LP rows
        are split over its 'data' axis, `pairs_per_call` per data shard; the greedy generation
        runs on the mesh as one program (replicated rows). None: one device.

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
    suite = load_suite(suite, num_retain=num_retain, limit=limit) if isinstance(suite, str) else suite.limited(limit)
    for s in ("forget", "retain"):
        if not suite.split(s):
            raise InputError(f"the suite has no {s} records")
    scoring = dict(estimator=estimator, mc_samples=mc_samples, pairs_per_call=pairs_per_call, batch_size=batch_size,
                   progress=progress, mesh=mesh)

    stage = stage or (lambda line: None)
    t0 = time.perf_counter()
    stage(f"scoring {suite.name} under {len(seeds)} seed(s)")
    scores = score_stage(backbone, tokenizer, suite, seeds, **scoring)
    scoring_s, t0 = time.perf_counter() - t0, time.perf_counter()
    stage(f"greedy generation of {sum(len(suite.split(s)) for s in SPLITS)} answers")
    generations, schedule = generate_stage(backbone, tokenizer, suite, generation)
    rouge = {s: [rouge_l_recall(g, r["answer"]) for g, r in zip(generations[s], suite.split(s))] for s in SPLITS}
    generation_s, t0 = time.perf_counter() - t0, time.perf_counter()
    log_r_reference = None
    if reference is not None and scores.has("forget", "true"):
        stage(f"reference {reference_name or ''}: forget-set truth ratios")
        reference_scores = score_stage(reference, tokenizer if reference_tokenizer is None else reference_tokenizer,
                                       suite, seeds, splits=("forget",), truth_only=True, **scoring)
        log_r_reference = reference_scores.log_truth_ratios("forget", truth_ratio_mean)
    reference_s, t0 = time.perf_counter() - t0, time.perf_counter()
    stage(f"membership inference ({len(suite.forget)} forget vs {len(suite.holdout)} holdout) and memorisation")
    private = privacy_stage(backbone, tokenizer, suite, reference=reference, reference_tokenizer=reference_tokenizer,
                            no_reference_reason=no_reference_reason, pairs_per_call=pairs_per_call, mesh=mesh)
    privacy_s = time.perf_counter() - t0
    per_seed, log_r = per_seed_stage(scores, rouge, log_r_reference, truth_ratio_mean)
    per_seed.update({name: np.full(len(seeds), private.values[name]) for name in PRIVACY_METRICS
                     if name in private.values})
    missing = {name: private.missing.get(name) or unavailable(scores, name) or no_reference_reason
               for name in METRICS if name not in per_seed}
    ci = {"method": ci_method, "confidence": 0.95, "n_resamples": n_resamples, "rng_seed": 0}
    result = summarise_stage(per_seed, ci, len(seeds), missing)

    result["warnings"] = degenerate_warnings(result, scores, generations, backbone.config.vocab_size)
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
                                     for s in schedule}},
        "reference": reference_name if reference is not None else None,
        "privacy": {"per_token": "one_step (every answer token masked, one forward)", "min_k": privacy.MIN_K,
                    "privleak_attack": f"mia_{privacy.PRIVLEAK_ATTACK}", "members": "forget",
                    "nonmembers": suite.sources.get("holdout", "holdout") if suite.holdout else None,
                    "n_nonmembers": len(suite.holdout),
                    "reference_mia_min_k": private.values.get("reference_mia_min_k")},
        "utility_components": list(UTILITY_COMPONENTS),
        "pairs_per_call": pairs_per_call, "batch_size": batch_size,
    }
    device = jax.devices()[0]
    result["cost"] = {"wall_clock_s": time.perf_counter() - start, "scoring_s": scoring_s,
                      "generation_s": generation_s, "reference_s": reference_s, "privacy_s": privacy_s,
                      "scored_pairs": len(scores.column), "scored_rows": len(scores.column) * (
                          len(seeds) if estimator == "mc_elbo" else 1),
                      "generations": sum(len(suite.split(s)) for s in SPLITS),
                      "peak_rss_bytes": resources.host_peak_rss_bytes(),
                      "device": f"{device.platform}:{device.device_kind}",
                      "device_peak_bytes_in_use": resources.device_peak_bytes()}
    result["items"] = _items(suite, scores, generations, rouge, log_r, log_r_reference, private)
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


__all__ = ["GenerationConfig", "RELEARN_TEMPLATE", "RETAIN_TWINS", "Scores", "evaluate_suite", "generate_answers",
           "load_reference", "metric_table", "relearn_prompt", "retain_twin"]
