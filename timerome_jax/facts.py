"""Fact files: JSONL, one JSON object per line, in one of two shapes.

  * question/answer (TOFU): `{"question": ..., "answer": ...}`; the question is the prompt;
  * prompt/subject/target (ROME-style): `{"prompt": ..., "subject": ..., "target": ...}`; the target
    is the answer.

`answer`/`target` and `subject` are optional (generation needs only a prompt; tracing needs a
subject and an answer, and checks that itself). Other fields are ignored. Blank lines are skipped.
Every problem is an `InputError` naming the file and, where there is one, the line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from timerome_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Fact:
    """One prompt with its optional answer and subject.

    `kind` is the record's shape: 'question' (question/answer) or 'prompt' (prompt/subject/target);
    `where` is 'file:line' for messages.
    """

    prompt: str
    answer: str | None = None
    subject: str | None = None
    where: str = ""
    kind: str = "prompt"


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
    if not path.is_file():
        raise InputError(f"fact file {path} does not exist" if not path.exists()
                         else f"fact file {path} is not a file")
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


__all__ = ["Fact", "parse_fact", "read_facts"]
