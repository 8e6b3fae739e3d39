"""Suites: which QA pairs are forgotten, retained and used for utility — for evaluation and training.

One `Suite` holds the records of the four splits of an evaluation (open-unlearning's TOFU layout):
forget (with paraphrased_question, paraphrased_answer and perturbed_answer), retain
(paraphrased_answer, perturbed_answer), real_authors and world_facts (perturbed_answer). The
shipped suites are `tofu-forget01/05/10` (`load_suite`); a JSON file with the four splits is a
custom suite (`suite_from_records`). The training-time baselines read the same suite's records as
training rows (`encode_rows`; the row layout, answer window and scored tokens are explained in
docs/baselines.md, "Data"); the inference-time baselines trace its forget facts (`forget_facts`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from timerome_jax import data
from timerome_jax.errors import InputError
from timerome_jax.facts import Fact, load_facts
from timerome_jax.tokenization import pad_left, pad_right

SUITES = {"tofu-forget01": "forget01_perturbed", "tofu-forget05": "forget05_perturbed",
          "tofu-forget10": "forget10_perturbed"}
# forget facts with an explicit subject per question (the same subjects whatever `facts.find_subject` becomes)
SUBJECTS = {"tofu-forget01": "forget01_subjects", "tofu-forget05": "forget05_subjects",
            "tofu-forget10": "forget10_subjects"}
# TOFU's holdout split of each forget size (QA pairs no shipped model saw): the non-members of the
# membership-inference attacks
HOLDOUTS = {"tofu-forget01": "holdout01", "tofu-forget05": "holdout05", "tofu-forget10": "holdout10"}
SPLITS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
DEFAULT_NUM_RETAIN = 40
DEFAULT_ANSWER_WINDOW = 96
LENGTH_MULTIPLE = 16


def check_suite(name: str) -> str:
    """The forget split of a shipped suite, or InputError naming the known suites."""
    if name not in SUITES:
        raise InputError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)} (or a JSON suite file)")
    return SUITES[name]


@dataclasses.dataclass(frozen=True)
class Suite:
    """The QA records of one evaluation: forget (with paraphrased_question, paraphrased_answer and
    perturbed_answer), retain (paraphrased_answer, perturbed_answer), real_authors and world_facts
    (perturbed_answer; paraphrased_answer optional). `sources` names where each split came from.
    `holdout` (question, answer; optional): QA pairs the model never saw, the non-members of the
    membership-inference attacks against the forget set."""

    name: str
    forget: list[dict]
    retain: list[dict]
    real_authors: list[dict]
    world_facts: list[dict]
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    holdout: list[dict] = dataclasses.field(default_factory=list)

    def split(self, name: str) -> list[dict]:
        return getattr(self, name)

    def limited(self, limit: int | None) -> "Suite":
        if limit is None:
            return self
        if limit < 1:
            raise InputError(f"the per-split limit must be >= 1, got {limit}")
        return dataclasses.replace(self, **{s: self.split(s)[:limit] for s in SPLITS + ("holdout",)})


def load_suite(name: str, *, num_retain: int = DEFAULT_NUM_RETAIN, limit: int | None = None) -> Suite:
    """A shipped TOFU suite ('tofu-forget01' | 'tofu-forget05' | 'tofu-forget10').

    forget = forgetXX_perturbed (forgetXX with paraphrases and perturbations); retain = the first
    `num_retain` QA pairs of retain90 (the embedded models were trained on the first 160), from
    retain_perturbed (= retain90[:400] with paraphrases and perturbations) up to 400;
    real_authors_perturbed; world_facts_perturbed; holdout = TOFU's holdoutXX. `limit` keeps the first `limit` records of
    every split (--quick).
    """
    check_suite(name)
    if num_retain < 1:
        raise InputError(f"--num-retain must be >= 1, got {num_retain}")
    perturbed = data.load_split("retain_perturbed")
    retain, source = (perturbed, "retain_perturbed") if num_retain <= len(perturbed) else \
        (data.load_split("retain90"), "retain90")
    if num_retain > len(retain):
        raise InputError(f"--num-retain {num_retain} exceeds the {len(retain)} retain QA pairs")
    suite = Suite(name=name, forget=data.load_split(SUITES[name]), retain=retain[:num_retain],
                  real_authors=data.load_split("real_authors_perturbed"),
                  world_facts=data.load_split("world_facts_perturbed"), holdout=data.load_split(HOLDOUTS[name]),
                  sources={"forget": SUITES[name], "retain": f"{source}[:{num_retain}]",
                           "real_authors": "real_authors_perturbed",
                           "world_facts": "world_facts_perturbed", "holdout": HOLDOUTS[name]})
    return suite.limited(limit)


def suite_from_records(records: dict[str, list[dict]], name: str = "custom") -> Suite:
    """A suite from explicit records {"forget": [...], "retain": [...], "real_authors": [...],
    "world_facts": [...], "holdout": [...]} (e.g. read from a JSON suite file); forget and retain
    must be non-empty, the others may be missing."""
    if not isinstance(records, dict):
        raise InputError("a suite is a JSON object with forget, retain, real_authors, world_facts")
    missing = [s for s in ("forget", "retain") if not records.get(s)]
    if missing:
        raise InputError(f"the suite has no records for {', '.join(missing)}")
    unknown = sorted(set(records) - set(SPLITS) - {"holdout"})
    if unknown:
        raise InputError(f"unknown suite split(s) {', '.join(unknown)}; a suite has {', '.join(SPLITS)} and "
                         "optionally holdout")
    return Suite(name=name, **{s: list(records.get(s) or []) for s in SPLITS + ("holdout",)},
                 sources={s: f"{name}:{s}" for s in SPLITS + ("holdout",) if records.get(s)})


def forget_facts(name: str, num_forget: int | None = None) -> list[Fact]:
    """The forget QA pairs of a shipped suite as facts, each with its packaged subject."""
    check_suite(name)
    facts = load_facts(SUBJECTS[name])
    return facts[:num_forget] if num_forget else facts


# --- training rows ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rows:
    """One set of QA pairs as arrays (numpy; N rows).

    input_ids [N, T] int32, attention_mask [N, T] int32, noise_mask [N, T] bool (answer window),
    score_mask [N, T] bool; prompt_ids [N, P] / prompt_mask (left-padded) and answer_ids [N, A] /
    answer_mask (right-padded, no end-of-text) for the likelihood estimators; ids 'split:line'.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    noise_mask: np.ndarray
    score_mask: np.ndarray
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    answer_ids: np.ndarray
    answer_mask: np.ndarray
    ids: tuple[str, ...]

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def training_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.input_ids, self.attention_mask, self.noise_mask, self.score_mask


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def encode_rows(records: Sequence[dict], tokenizer, eos_id: int, max_len: int, *, score: str, where: str,
                answer_window: int = DEFAULT_ANSWER_WINDOW) -> Rows:
    """QA records -> Rows (ids `where:line`); `score` is 'answer' (answer + first end-of-text) or
    'window' (the whole answer window)."""
    if score not in ("answer", "window"):
        raise ValueError(f"score must be 'answer' or 'window', got {score!r}")
    if answer_window < 2:
        raise InputError(f"the answer window must be >= 2 tokens, got {answer_window}")
    if not records:
        raise InputError("no QA pairs selected")
    prompts, answers, ids_ = [], [], []
    for index, record in enumerate(records):
        p, a = data.encode_prompt(tokenizer, record["question"]), data.encode_answer(tokenizer, record["answer"])
        if not p or not a:
            raise InputError(f"{where}:{index + 1}: the question or the answer tokenises to nothing")
        if len(p) + len(a) + 1 > max_len:
            raise InputError(f"{where}:{index + 1}: prompt + answer + end-of-text are {len(p) + len(a) + 1} "
                             f"tokens, more than the model's maximum of {max_len}")
        prompts.append(p); answers.append(a); ids_.append(f"{where}:{index + 1}")
    T = min(round_up(max(len(p) + len(a) + 1 for p, a in zip(prompts, answers)), LENGTH_MULTIPLE), max_len)
    N = len(prompts)
    ids = np.full((N, T), eos_id, np.int32)
    attention = np.zeros((N, T), np.int32)
    noise = np.zeros((N, T), bool)
    scored = np.zeros((N, T), bool)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        window = min(T - len(p), max(answer_window, len(a) + 1))
        ids[i, :len(p) + len(a)] = p + a
        attention[i, :len(p) + window] = 1
        noise[i, len(p):len(p) + window] = True
        end = len(p) + len(a) + 1 if score == "answer" else len(p) + window
        scored[i, len(p):end] = True
    p_ids, p_mask = pad_left(prompts, eos_id)
    a_ids, a_mask = pad_right(answers, eos_id)
    return Rows(ids, attention, noise, scored, p_ids, p_mask, a_ids, a_mask, tuple(ids_))


__all__ = ["DEFAULT_ANSWER_WINDOW", "DEFAULT_NUM_RETAIN", "HOLDOUTS", "Rows", "SPLITS", "SUITES", "Suite", "UTILITY_SPLITS",
           "check_suite", "encode_rows", "forget_facts", "load_suite", "suite_from_records"]
