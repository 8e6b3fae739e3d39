"""Facts: the records a user gives, and the same facts encoded for the tracer and the memory.

Two shapes, one identity:

* `Fact`: one record of a JSONL file, in one of two forms —
  question/answer (TOFU: `{"question": ..., "answer": ...}`; the question is the prompt) or
  prompt/subject/target (ROME, CounterFact: `{"prompt": ..., "subject": ..., "target": ...}`; the
  target is the answer). `answer`/`target` and `subject` are optional (generation needs only a
  prompt; tracing needs a subject and an answer). Other fields are ignored, blank lines skipped.
* `Facts`: a set of facts encoded for one model — per fact its tokens and subject span — with the
  padded arrays every jitted function takes (`FactBatch`, a pytree [F, ...]).

A fact is identified by its content (`Fact.id`, a digest of form, prompt, answer and subject: the
same fact read from two paths is the same fact) and located by `Fact.where` ('file:line', or
'split:line' for packaged data); its row in a `Facts` set is its position (also
`FactBatch.fact_index_F`, which seeds its noise draws).

Text conventions (one place, used by trace, edit, eval and generate):
* question/answer facts: prompt text = `data.format_prompt(question)`, answer = the stripped
  answer — exactly the format the embedded models were trained on;
* prompt/subject/target facts: prompt text as given, answer = " " + target (the target continues
  the sentence, so it starts a new word).

Subjects (`find_subject`): a fact's own `subject` field wins; otherwise, for a question, a TOFU
author's name it contains, else a name span the answer repeats, else the question's longest
multi-word name; a fact with none is refused with an error naming its line. Subject token spans
come from the tokenizer's offset mapping (never from re-tokenising the subject, which BPE merges
make unreliable).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from timerome_jax import data
from timerome_jax.errors import InputError

Array = jax.Array
# how a prompt is laid out: "question" = data.format_prompt (the question/answer records' form),
# "raw" = the text as given (the prompt/subject/target records' form)
TEMPLATES = ("question", "raw")


# --- records --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Fact:
    """One prompt with its optional answer and subject; `kind` is 'question' or 'prompt' (the
    record's form), `where` is 'file:line'."""

    prompt: str
    answer: str | None = None
    subject: str | None = None
    where: str = ""
    kind: str = "prompt"

    @functools.cached_property
    def id(self) -> str:
        """The fact's identity: a digest of its normalised content (form, prompt, answer, subject),
        so the same fact has the same id whatever file or line it comes from."""
        norm = lambda text: None if text is None else " ".join(text.split())  # noqa: E731
        content = json.dumps([self.kind, norm(self.prompt), norm(self.answer), norm(self.subject)])
        return "fact-" + hashlib.sha256(content.encode()).hexdigest()[:12]

    def texts(self, template: str | None = None) -> tuple[str, str | None]:
        """(prompt text, answer text) as the model sees them: `template` "question" (the
        "Question: …\nAnswer:" format) or "raw"; None = the record's form (module docstring)."""
        template = template or ("question" if self.kind == "question" else "raw")
        if template not in TEMPLATES:
            raise InputError(f"unknown prompt template {template!r}; choose {' or '.join(TEMPLATES)}")
        if template == "question":
            return data.format_prompt(self.prompt), None if self.answer is None else self.answer.strip()
        return self.prompt, None if self.answer is None else " " + self.answer.strip()


def _text_field(record: dict, name: str, where: str, required: bool = False) -> str | None:
    if name not in record or record[name] is None:
        if required:
            raise InputError(f"{where}: missing field {name!r}")
        return None
    value = record[name]
    if not isinstance(value, str):
        raise InputError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InputError(f"{where}: field {name!r} is empty")
    return value


def parse_fact(record, where: str) -> Fact:
    """One decoded JSON value -> Fact (question/answer or prompt/subject/target)."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "question" in record and "prompt" in record:
        raise InputError(f"{where}: has both 'question' and 'prompt'; use one")
    if "question" in record:
        return Fact(prompt=_text_field(record, "question", where, required=True),
                    answer=_text_field(record, "answer", where),
                    subject=_text_field(record, "subject", where), where=where, kind="question")
    if "prompt" in record:
        return Fact(prompt=_text_field(record, "prompt", where, required=True),
                    answer=_text_field(record, "target", where),
                    subject=_text_field(record, "subject", where), where=where, kind="prompt")
    raise InputError(f"{where}: needs a 'question' (with 'answer') or a 'prompt' (with 'subject', "
                     f"'target') field; found {', '.join(sorted(record)) or 'no fields'}")


def read_facts(path: str | os.PathLike) -> list[Fact]:
    """Read a JSONL fact file, in file order."""
    path = Path(path)
    if not path.exists() or path.is_dir():   # pipes (`--facts <(...)`) are read like files
        raise InputError(f"fact file {path} does not exist" if not path.exists()
                         else f"fact file {path} is a directory, not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except OSError as e:
        raise InputError(f"cannot read fact file {path}: {e.strerror}") from None
    facts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        facts.append(parse_fact(record, where))
    if not facts:
        raise InputError(f"fact file {path} is empty: expected one JSON object per line")
    return facts


def load_facts(spec: str) -> list[Fact]:
    """A packaged data selection (e.g. "forget01_subjects[:8]"), each fact identified as
    'split:line', or a JSONL file (`read_facts`)."""
    if spec.endswith(".jsonl") or (Path(spec).exists() and not Path(spec).is_dir()):
        return read_facts(spec)
    return [parse_fact(record, f"{name}:{index + 1}") for name, index, record in data.load_selection(spec)]


# --- subjects ---------------------------------------------------------------------------------------

TOFU_BLOCK = 20
_WORD = r"[A-Z][\w'’.\-]*"
_PARTICLE = r"(?:al|el|de|del|della|da|das|dos|du|van|von|der|den|bin|ibn|ben|le|la|y|e)"
_NAME_RUN = re.compile(rf"{_WORD}(?:\s+(?:{_PARTICLE}\s+)*{_WORD})+")


def char_span(prompt: str, subject: str) -> tuple[int, int]:
    """[start, end) of the first occurrence of `subject` in `prompt` (case-insensitive fallback)."""
    if not subject or not subject.strip():
        raise InputError("empty subject")
    start = prompt.find(subject)
    if start < 0:
        start = prompt.lower().find(subject.lower())
    if start < 0:
        raise InputError(f"subject {subject!r} does not occur in its prompt {prompt!r}")
    return start, start + len(subject)


def token_span(offsets: Sequence[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int]:
    """Token indices [first, last+1) of the tokens overlapping [char_start, char_end)."""
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < char_end and b > char_start]
    if not hits:
        raise InputError(f"no token covers characters {char_start}..{char_end} of the prompt")
    return hits[0], hits[-1] + 1


def block_author_name(questions: Sequence[str]) -> str | None:
    """The capitalised multi-word phrase found in the most questions of one author's block."""
    counts: collections.Counter[str] = collections.Counter()
    for q in questions:
        runs = {re.sub(r"['’]s?$", "", m.group(0)) for m in _NAME_RUN.finditer(q)}
        # a run may start with a capitalised question word ("Has Basil Mahfouz"): count its tails too
        candidates = set()
        for run in runs:
            words = run.split()
            candidates.update(" ".join(words[i:]) for i in range(len(words) - 1))
        counts.update(candidates)
    if not counts:
        return None
    best = max(counts.items(), key=lambda kv: (kv[1], len(kv[0])))
    return best[0] if best[1] >= 2 else None


@functools.lru_cache(maxsize=1)
def known_authors() -> tuple[str, ...]:
    """The fictitious authors of TOFU, longest name first: the packaged `full` split lists 20
    questions per author, in order, and each block's most frequent capitalised multi-word phrase is
    its author's name (a fixed list: it never depends on how a user's file is laid out)."""
    questions = [r["question"] for r in data.load_split("full")]
    names = {block_author_name(questions[i:i + TOFU_BLOCK]) for i in range(0, len(questions), TOFU_BLOCK)}
    return tuple(sorted((n for n in names if n), key=lambda n: (-len(n), n)))


# words that open a question or a sentence and are capitalised for that reason only
_OPENERS = frozenset("""What Who Whom Whose Which When Where Why How Is Are Was Were Do Does Did Can Could Has Have
    Had In On At For From To Please Tell Name Describe Give Would Will Should The A An Apart Besides Aside Out Of
    As Apart With Within Among Between Beyond Outside Despite""".split())
_SPAN = re.compile(rf"{_WORD}(?:(?:,\s+|\s+(?:{_PARTICLE}\s+)*){_WORD})*")
_QUOTED = re.compile(r"[\"“]([^\"”]{2,})[\"”]|(?<!\w)['‘]([^'’]{2,}?)['’](?!\w)")


def name_spans(text: str) -> list[str]:
    """Capitalised name spans of `text` ("Basil Mahfouz Al-Kuwaiti", "Kuwait City, Kuwait"), without
    opening question words or a possessive, and quoted titles ('Romeo and Juliet')."""
    out = [(m.group(1) or m.group(2)).strip() for m in _QUOTED.finditer(text)]
    for m in _SPAN.finditer(text):
        words = m.group(0).split()
        while words and words[0].rstrip(",") in _OPENERS:
            words = words[1:]
        span = re.sub(r"['’]s?$", "", " ".join(words)).rstrip(",")
        if span:
            out.append(span)
    return out


def find_subject(fact: Fact) -> str:
    """The fact's subject: its `subject` field; else, for a question, a TOFU author's name it
    contains (`known_authors`), else the longest name span of the question that the answer repeats,
    else the question's longest quoted title or name span of two or more words (e.g. "Karachi,
    Pakistan"). A fact
    with none of these is refused with one error naming its line: never dropped, never guessed
    from the file's layout."""
    if fact.subject is not None:
        return fact.subject
    if fact.kind == "question":
        named = next((n for n in known_authors() if n in fact.prompt), None)
        spans = sorted(name_spans(fact.prompt), key=len, reverse=True)
        shared = next((s for s in spans if fact.answer and s in fact.answer), None)
        quoted = {(m.group(1) or m.group(2)).strip() for m in _QUOTED.finditer(fact.prompt)}
        long_span = next((s for s in spans if s in quoted or len(s.replace(",", " ").split()) >= 2), None)
        subject = named or shared or long_span
        if subject:
            return subject
    raise InputError(f"{fact.where}: cannot tell which words of the prompt name the subject; add a \"subject\" "
                     f"field naming them")


# --- encoded facts ----------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FactBatch:
    """F facts laid out as prompt + answer, right-padded to T tokens (a pytree of arrays).

    input_ids_FT:        prompt tokens followed by the TRUE answer tokens (pad elsewhere).
    attention_mask_FT:   1 on real tokens.
    answer_mask_FT:      True on answer positions (masked at step 0).
    subject_pos_FS:      token positions of the subject span, padded to S with position 0.
    subject_valid_FS:    True where subject_pos_FS is a real subject position.
    fact_index_F:        index of each fact in its set (seeds its noise draws; -1 excludes a row
                         from σ).
    answer_pos_FA:       the answer's token positions, in order, padded to A with its last one.
    answer_valid_FA:     True where answer_pos_FA is a real answer position.
    """

    input_ids_FT: Array
    attention_mask_FT: Array
    answer_mask_FT: Array
    subject_pos_FS: Array
    subject_valid_FS: Array
    fact_index_F: Array
    answer_pos_FA: Array
    answer_valid_FA: Array

    @property
    def num_facts(self) -> int:
        return self.input_ids_FT.shape[0]

    def take(self, rows) -> "FactBatch":
        return jax.tree.map(lambda x: x[rows], self)

    def prompt_lengths(self) -> np.ndarray:
        """Tokens before the answer, per fact [F]."""
        return (np.asarray(self.attention_mask_FT).astype(bool) & ~np.asarray(self.answer_mask_FT)).sum(axis=1)


def fact_batch(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
               subject_spans: Sequence[tuple[int, int]], pad_id: int, fact_index: Sequence[int] | None = None,
               length: int | None = None, subject_length: int | None = None,
               answer_length: int | None = None) -> FactBatch:
    """Token-level facts -> a right-padded FactBatch ([prompt][answer][pad...]).

    subject_spans are [start, end) token indices into each prompt. `length` / `subject_length` /
    `answer_length` pad T / S / A further (e.g. to a shape shared by every chunk, so one
    compilation serves all).
    """
    if not prompts:
        raise InputError("no facts to trace")
    if not len(prompts) == len(answers) == len(subject_spans):
        raise InputError("prompts, answers and subject spans must have the same length")
    for i, (p, a, (s0, s1)) in enumerate(zip(prompts, answers, subject_spans)):
        if not p or not a:
            raise InputError(f"fact {i}: empty prompt or answer")
        if not 0 <= s0 < s1 <= len(p):
            raise InputError(f"fact {i}: subject span [{s0}, {s1}) is not inside its {len(p)}-token prompt")
    T = max(max(len(p) + len(a) for p, a in zip(prompts, answers)), length or 0)
    S = max(max(s1 - s0 for s0, s1 in subject_spans), subject_length or 0)
    A = max(max(len(a) for a in answers), answer_length or 0)
    F = len(prompts)
    answer_pos = np.zeros((F, A), np.int32)
    answer_valid = np.zeros((F, A), bool)
    ids = np.full((F, T), pad_id, np.int32)
    attn = np.zeros((F, T), np.int32)
    ans = np.zeros((F, T), bool)
    pos = np.zeros((F, S), np.int32)
    valid = np.zeros((F, S), bool)
    for i, (p, a, (s0, s1)) in enumerate(zip(prompts, answers, subject_spans)):
        n = len(p) + len(a)
        ids[i, :n] = list(p) + list(a)
        attn[i, :n] = 1
        ans[i, len(p):n] = True
        pos[i, : s1 - s0] = np.arange(s0, s1)
        valid[i, : s1 - s0] = True
        answer_pos[i] = len(p) + np.minimum(np.arange(A), len(a) - 1)
        answer_valid[i, : len(a)] = True
    index = np.arange(F, dtype=np.int32) if fact_index is None else np.asarray(fact_index, np.int32)
    return FactBatch(jnp.asarray(ids), jnp.asarray(attn), jnp.asarray(ans), jnp.asarray(pos),
                     jnp.asarray(valid), jnp.asarray(index), jnp.asarray(answer_pos), jnp.asarray(answer_valid))


@dataclasses.dataclass(frozen=True)
class Facts:
    """Facts encoded for one model: per fact its record, subject, prompt and answer tokens and
    subject token span; `batch` holds them padded ([F, ...], rows in this order)."""

    facts: tuple[Fact, ...]
    subjects: tuple[str, ...]
    prompts: tuple[tuple[int, ...], ...]
    answers: tuple[tuple[int, ...], ...]
    spans: tuple[tuple[int, int], ...]
    pad_id: int

    @functools.cached_property
    def batch(self) -> FactBatch:
        return fact_batch(self.prompts, self.answers, self.spans, self.pad_id)

    @property
    def ids(self) -> tuple[str, ...]:
        """Each fact's content id (`Fact.id`): what a memory records."""
        return tuple(f.id for f in self.facts)

    @property
    def wheres(self) -> tuple[str, ...]:
        """Where each fact was read ('file:line')."""
        return tuple(f.where for f in self.facts)

    @property
    def num_facts(self) -> int:
        return len(self.facts)

    def take(self, index: Sequence[int]) -> "Facts":
        """The facts at these positions (a new set: rows renumbered 0..len-1)."""
        index = list(index)
        if not index:
            raise InputError("no facts selected")
        pick = lambda xs: tuple(xs[i] for i in index)  # noqa: E731
        return Facts(pick(self.facts), pick(self.subjects), pick(self.prompts), pick(self.answers),
                     pick(self.spans), self.pad_id)


def encode(tokenizer, facts: Sequence[Fact], *, max_length: int, pad_id: int) -> Facts:
    """Tokenise facts and locate their subjects (module docstring).

    A fact with an explicit subject that is not in its prompt, or without a subject
    `find_subject` can find, is an error naming its line: a user's fact is never dropped.
    """
    if not facts:
        raise InputError("the fact file holds no facts")
    kept, subjects, prompts, answers, spans = [], [], [], [], []
    for fact in facts:
        if fact.answer is None:
            raise InputError(f"{fact.where}: tracing needs an answer ('answer' or 'target' field)")
        subject = find_subject(fact)
        prompt_text, answer_text = fact.texts()
        try:
            start, end = char_span(prompt_text, subject)
        except InputError:
            if fact.subject is None:
                raise
            raise InputError(f"{fact.where}: subject {fact.subject!r} does not occur in the prompt "
                             f"{fact.prompt!r}") from None
        enc = tokenizer(prompt_text, add_special_tokens=False, return_offsets_mapping=True)
        answer_ids = tuple(int(t) for t in tokenizer(answer_text, add_special_tokens=False)["input_ids"])
        if not answer_ids:
            raise InputError(f"{fact.where}: the answer tokenises to nothing")
        if len(enc["input_ids"]) + len(answer_ids) > max_length:
            raise InputError(f"{fact.where}: prompt + answer are {len(enc['input_ids']) + len(answer_ids)} "
                             f"tokens, more than the model's maximum of {max_length}")
        kept.append(fact)
        subjects.append(subject)
        prompts.append(tuple(int(t) for t in enc["input_ids"]))
        answers.append(answer_ids)
        spans.append(token_span(enc["offset_mapping"], start, end))
    return Facts(tuple(kept), tuple(subjects), tuple(prompts), tuple(answers), tuple(spans), pad_id)


__all__ = ["Fact", "FactBatch", "Facts", "char_span", "encode", "fact_batch", "find_subject", "known_authors",
           "load_facts", "name_spans", "parse_fact", "read_facts", "token_span"]
