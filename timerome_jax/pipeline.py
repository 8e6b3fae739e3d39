"""From fact records to token-level batches for tracing and editing, and chunked grid runs.

Text conventions (one place, used by trace, edit and eval):
* question/answer facts (TOFU): prompt text = `data.format_prompt(question)`, answer = the
  stripped answer text — exactly the format the embedded model was trained on.
* prompt/subject/target facts (ROME, CounterFact): prompt text as given, answer = " " + target
  (the target continues the sentence, so it starts a new word).

Subjects: a fact's own `subject` field wins; otherwise, for question/answer facts, TOFU's author
name found per 20-question block (`subjects.tofu_subjects`). Facts without a subject in their
prompt are skipped and reported (count and file:line), never traced with a guess.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from ports import Backbone
from timerome_jax import data, subjects, tracing
from timerome_jax.errors import InputError
from timerome_jax.facts import Fact


@dataclasses.dataclass(frozen=True)
class EncodedFact:
    fact: Fact
    prompt_ids: list[int]
    answer_ids: list[int]
    subject: str
    subject_span: tuple[int, int]  # token indices into prompt_ids


def model_texts(fact: Fact) -> tuple[str, str | None]:
    """(prompt text, answer text) as the model sees them (see the module docstring)."""
    if fact.kind == "question":
        return data.format_prompt(fact.prompt), None if fact.answer is None else fact.answer.strip()
    return fact.prompt, None if fact.answer is None else " " + fact.answer.strip()


def resolve_subjects(facts: Sequence[Fact]) -> list[str | None]:
    """Explicit subject fields, else TOFU author names for question/answer facts."""
    questions = [f.prompt for f in facts]
    auto = subjects.tofu_subjects(questions) if any(f.kind == "question" and f.subject is None for f in facts) else []
    out = []
    for i, f in enumerate(facts):
        if f.subject is not None:
            out.append(f.subject)
        elif f.kind == "question":
            out.append(auto[i])
        else:
            out.append(None)
    return out


def encode_for_tracing(tokenizer, facts: Sequence[Fact], max_length: int) -> tuple[list[EncodedFact], list[str]]:
    """Tokenise facts and locate their subjects. Returns (encoded, skipped 'file:line' list).

    A fact with an explicit subject that is not in its prompt is an error (the user said where
    the subject is, and it is not there); a TOFU question that does not name its author is
    skipped and reported.
    """
    if not facts:
        raise InputError("the fact file holds no facts")
    encoded, skipped = [], []
    for fact, subject in zip(facts, resolve_subjects(facts)):
        if fact.answer is None:
            raise InputError(f"{fact.where}: tracing needs an answer ('answer' or 'target' field)")
        if subject is None:
            skipped.append(fact.where)
            continue
        prompt_text, answer_text = model_texts(fact)
        start, end = subjects.char_span(prompt_text, subject) if fact.subject is None else _explicit_span(fact, prompt_text)
        enc = tokenizer(prompt_text, add_special_tokens=False, return_offsets_mapping=True)
        span = subjects.token_span(enc["offset_mapping"], start, end)
        answer_ids = list(tokenizer(answer_text, add_special_tokens=False)["input_ids"])
        if not answer_ids:
            raise InputError(f"{fact.where}: the answer tokenises to nothing")
        if len(enc["input_ids"]) + len(answer_ids) > max_length:
            raise InputError(f"{fact.where}: prompt + answer are {len(enc['input_ids']) + len(answer_ids)} "
                             f"tokens, more than the model's maximum of {max_length}")
        encoded.append(EncodedFact(fact, list(enc["input_ids"]), answer_ids, subject, span))
    if not encoded:
        raise InputError(f"none of the {len(facts)} facts names its subject in its prompt")
    return encoded, skipped


def _explicit_span(fact: Fact, prompt_text: str) -> tuple[int, int]:
    try:
        return subjects.char_span(prompt_text, fact.subject)
    except InputError:
        raise InputError(f"{fact.where}: subject {fact.subject!r} does not occur in the prompt "
                         f"{fact.prompt!r}") from None


def trace_batch(encoded: Sequence[EncodedFact], pad_id: int) -> tracing.TraceBatch:
    return tracing.build_trace_batch([e.prompt_ids for e in encoded], [e.answer_ids for e in encoded],
                                     [e.subject_span for e in encoded], pad_id)


def chunks(batch: tracing.TraceBatch, size: int) -> list[tracing.TraceBatch]:
    """Equal-shape chunks (the last padded with filler rows, fact_index -1): one compilation."""
    F = batch.num_facts
    out = []
    for start in range(0, F, size):
        rows = np.arange(start, start + size)
        filler = rows >= F
        chunk = batch.take(np.where(filler, 0, rows))
        out.append(dataclasses.replace(chunk, fact_index_F=np.where(filler, -1, chunk.fact_index_F)))
    return out


def run_grid(backbone: Backbone, batch: tracing.TraceBatch, key: jax.Array, config: tracing.TraceConfig,
             facts_per_chunk: int = 4, progress: Callable | None = None) -> tuple[tracing.TraceResult, float, float]:
    """The TIE grid over all facts, chunk by chunk. Returns (result [F, ...], sigma, seconds)."""
    start = time.perf_counter()
    sigma = tracing.subject_embedding_std(backbone, batch)
    parts = []
    pieces = chunks(batch, min(facts_per_chunk, batch.num_facts))
    for chunk in (progress(pieces) if progress else pieces):
        result = tracing.tie_grid(backbone, chunk, sigma, key, config)
        parts.append(jax.tree.map(np.asarray, result))
    merged = jax.tree.map(lambda *xs: np.concatenate(xs)[: batch.num_facts], *parts)
    return merged, float(sigma), time.perf_counter() - start
