"""Unlearning suites: which QA pairs are forgotten and retained, laid out as training rows.

Suites (`--suite`): `tofu-forget01`, `tofu-forget05`, `tofu-forget10`. Forget set = the whole TOFU
`forgetXX` split (or its first `num_forget` pairs); retain set = the first `num_retain` pairs of
`retain90` in file order (the embedded `tofu-tiny` models were trained on the first 160 of them,
so a retain set of up to 160 holds facts the model knows). `forget01` has a subject per question
(`forget01_subjects`), used by the inference-time baselines; for `forget05/10` subjects are found
the way the tracer finds them (`pipeline.resolve_subjects`).

Row layout (one QA pair per row, all rows of a set share one length T; prompt text and ids from
`data.format_prompt` / `data.encode_prompt` / `data.encode_answer`, as in training):

    [ prompt ids | answer ids | <|endoftext|> ... ]  attention 1   ...  [pad]  attention 0
                 |<-------- answer window -------->|

* T = the longest prompt + answer + 1 end-of-text of the set, rounded up to a multiple of 16
  (`experiments/train_tiny.py` rounds row lengths the same way).
* Answer window = answer + end-of-text up to T, at most `answer_window` tokens (default 96, the
  largest window the embedded models were trained with; never fewer than answer + 1). Tokens past
  the window are padding with attention 0 (LLaDA's key-padding convention). With the embedded
  tokenizer, 36 of the 40 forget01 windows and all retain90[:40] windows reach T (measured), so
  rows look like training rows.
* `noise_mask`: the answer window. The forward process masks these tokens (LLaDA's SFT, where the
  end-of-text run belongs to the answer span, exactly as `train_tiny.py` trains).
* `score_mask`: what a loss is computed on. For the forget set: the answer tokens and the first
  end-of-text (the fact and its end; ascending on the whole end-of-text run would spend the
  unlearning objective on padding and teach the model never to stop). For the retain set: the
  whole window (the retain terms are then exactly the SFT loss the model was trained with).

For the convergence estimate (answer log-likelihood, DESIGN §1) the same pairs are also kept as
left-padded prompts and right-padded answers without end-of-text (`timerome_jax.likelihood`'s
layout, the one evaluation scores).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from timerome_jax import data
from timerome_jax.errors import InputError
from timerome_jax.facts import Fact
from timerome_jax.tokenization import pad_left, pad_right

SUITES = {"tofu-forget01": "forget01", "tofu-forget05": "forget05", "tofu-forget10": "forget10"}
SUBJECT_SPLITS = {"forget01": "forget01_subjects"}
RETAIN_SPLIT = "retain90"
DEFAULT_NUM_RETAIN = 40
DEFAULT_ANSWER_WINDOW = 96
LENGTH_MULTIPLE = 16


def check_suite(suite: str) -> str:
    """The forget split of a suite name, or InputError naming the known suites."""
    if suite not in SUITES:
        raise InputError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    return SUITES[suite]


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


def encode_rows(records: Sequence[tuple[str, int, dict]], tokenizer, eos_id: int, max_len: int, *,
                score: str, answer_window: int = DEFAULT_ANSWER_WINDOW) -> Rows:
    """QA records (split, index, record) -> Rows; `score` is 'answer' (answer + first end-of-text)
    or 'window' (the whole answer window)."""
    if score not in ("answer", "window"):
        raise ValueError(f"score must be 'answer' or 'window', got {score!r}")
    if not records:
        raise InputError("no QA pairs selected")
    prompts, answers, where = [], [], []
    for split, index, record in records:
        p, a = data.encode_prompt(tokenizer, record["question"]), data.encode_answer(tokenizer, record["answer"])
        if not p or not a:
            raise InputError(f"{split}:{index + 1}: the question or the answer tokenises to nothing")
        if len(p) + len(a) + 1 > max_len:
            raise InputError(f"{split}:{index + 1}: prompt + answer + end-of-text are {len(p) + len(a) + 1} "
                             f"tokens, more than the model's maximum of {max_len}")
        prompts.append(p); answers.append(a); where.append(f"{split}:{index + 1}")
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
    return Rows(ids, attention, noise, scored, p_ids, p_mask, a_ids, a_mask, tuple(where))


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    forget_split: str
    forget: Rows
    retain: Rows | None
    forget_facts: tuple[Fact, ...]  # for the inference-time baselines (subjects where known)


def forget_records(suite: str, num_forget: int | None = None) -> list[tuple[str, int, dict]]:
    split = check_suite(suite)
    if num_forget is not None and num_forget < 1:
        raise InputError(f"--num-forget must be >= 1, got {num_forget}")
    records = data.load_selection(split)
    return records[:num_forget] if num_forget else records


def forget_facts(suite: str, num_forget: int | None = None) -> list[Fact]:
    """The forget QA pairs as facts, with explicit subjects where the suite ships them."""
    split = check_suite(suite)
    facts = data.load_facts(SUBJECT_SPLITS.get(split, split))
    return facts[:num_forget] if num_forget else facts


def load_suite(suite: str, tokenizer, eos_id: int, max_len: int, *, num_retain: int = DEFAULT_NUM_RETAIN,
               num_forget: int | None = None, answer_window: int = DEFAULT_ANSWER_WINDOW) -> Suite:
    split = check_suite(suite)
    if num_retain < 0:
        raise InputError(f"--num-retain must be >= 0, got {num_retain}")
    if answer_window < 2:
        raise InputError(f"the answer window must be >= 2 tokens, got {answer_window}")
    forget = encode_rows(forget_records(suite, num_forget), tokenizer, eos_id, max_len, score="answer",
                         answer_window=answer_window)
    retain = None
    if num_retain:
        records = data.load_selection(f"{RETAIN_SPLIT}[:{num_retain}]")
        retain = encode_rows(records, tokenizer, eos_id, max_len, score="window", answer_window=answer_window)
    return Suite(suite, split, forget, retain, tuple(forget_facts(suite, num_forget)))


__all__ = ["DEFAULT_ANSWER_WINDOW", "DEFAULT_NUM_RETAIN", "Rows", "SUITES", "Suite", "check_suite",
           "encode_rows", "forget_facts", "forget_records", "load_suite"]
