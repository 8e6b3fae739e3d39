"""Where the subject is: character spans -> token spans, and TOFU's author names.

Subject token spans come from the tokenizer's offset mapping (never from re-tokenising the
subject on its own, which BPE merges make unreliable): the span is every token whose character
range overlaps the subject's first occurrence in the prompt text.

TOFU questions carry no subject field. TOFU lists 20 QA pairs per fictitious author, in order,
and every split is aligned on those blocks; the subject of a question is its author's full name
when the question contains it. The name of a block is the multi-word capitalised phrase that
occurs in the most questions of the block. Questions that do not contain it (e.g. "Who is the
author born in Astana, Kazakhstan on ...?") get no subject and are counted and skipped by the
tracer, unless the record names a `subject` explicitly (as `forget01_subjects` does).
"""

from __future__ import annotations

import collections
import re
from typing import Sequence

from timerome_jax.errors import InputError

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


def _strip_possessive(name: str) -> str:
    return re.sub(r"['’]s?$", "", name)


def block_author_name(questions: Sequence[str]) -> str | None:
    """The capitalised multi-word phrase found in the most questions of one author's block."""
    counts: collections.Counter[str] = collections.Counter()
    for q in questions:
        runs = {_strip_possessive(m.group(0)) for m in _NAME_RUN.finditer(q)}
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


def tofu_subjects(questions: Sequence[str]) -> list[str | None]:
    """Per question: its author's name if the question contains it, else None."""
    out: list[str | None] = []
    for start in range(0, len(questions), TOFU_BLOCK):
        block = questions[start:start + TOFU_BLOCK]
        name = block_author_name(block)
        out.extend(name if name and name in q else None for q in block)
    return out
