"""Data shipped with the package (TOFU, a CounterFact subset), and the one prompt format every model here is trained with.

Splits (`timerome_jax/data/tofu/<name>.jsonl`, one JSON object per line; provenance and checksums in
`timerome_jax/data/tofu/PROVENANCE.md` and `SHA256SUMS`): `full`, `retain90/95/99`,
`forget01/05/10` (+ `_perturbed`), `holdout01/05/10`, `retain_perturbed`, `real_authors`,
`world_facts` (+ `_perturbed`), and `forget01_subjects` (forget01 with a `subject` per question).
Every record has `question` and `answer`; the `_perturbed` splits add `paraphrased_question`,
`paraphrased_answer` and/or `perturbed_answer`.

`counterfact` (`timerome_jax/data/counterfact/counterfact.jsonl`, provenance and licence in its
PROVENANCE.md): the first 400 records of CounterFact's MEND/EasyEdit "edit" file, verbatim.

Views (`VIEWS`): splits derived from a shipped file by choosing its fields, so each fact has one
source. `forget01/05/10_paraphrased` and `retain_paraphrased` ask the `_perturbed` records'
`paraphrased_question` with the original answer (row n of a view is row n of its source: the
paraphrase of `retain90[n]` is `retain_paraphrased[n]` for n < 400); `counterfact_prompt`,
`counterfact_rephrase`, `counterfact_locality` and `counterfact_rewrite` are prompt/subject/target
facts (completion style: `facts.Fact` with kind "prompt").

Prompt format (training, generation and evaluation must agree, so they all call these functions):

    prompt text  = format_prompt(question) = "Question: {question}\\nAnswer:"
    prompt ids   = encode_prompt(tokenizer, question)
    answer ids   = encode_answer(tokenizer, answer)   # the answer alone, no special tokens

The model input is `prompt ids + answer ids + end-of-text padding`. The embedded tokenizers
(`experiments/build_tokenizer.py`) are byte-level BPE with `add_prefix_space=True`, so the answer,
encoded on its own, starts with a space-prefixed token exactly as if it followed "Answer:" in one
string, and `tokenizer.decode(answer_ids).strip()` gives the answer back.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any, Sequence

from timerome_jax.errors import InputError

_DATASETS = ("tofu", "counterfact")   # package data folders; each <name>.jsonl in them is a split
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"

_PARAPHRASED = {"question": "paraphrased_question", "answer": "answer"}
# view name -> (source split, {field of the view: field of the source record})
VIEWS: dict[str, tuple[str, dict[str, str]]] = {
    **{f"forget{n}_paraphrased": (f"forget{n}_perturbed", _PARAPHRASED) for n in ("01", "05", "10")},
    "retain_paraphrased": ("retain_perturbed", _PARAPHRASED),
    "counterfact_prompt": ("counterfact", {"prompt": "prompt", "subject": "subject", "target": "ground_truth"}),
    "counterfact_rephrase": ("counterfact", {"prompt": "rephrase_prompt", "subject": "subject",
                                             "target": "ground_truth"}),
    "counterfact_locality": ("counterfact", {"prompt": "locality_prompt", "target": "locality_ground_truth"}),
    "counterfact_rewrite": ("counterfact", {"prompt": "prompt", "subject": "subject", "target": "target_new"}),
}


def _files() -> dict[str, Any]:
    """{split name: its shipped file}."""
    out = {}
    for folder in _DATASETS:
        for p in resources.files(__name__).joinpath(folder).iterdir():
            if p.name.endswith(".jsonl"):
                out[p.name[: -len(".jsonl")]] = p
    return out


def split_names() -> list[str]:
    """Names `load_split` accepts (shipped files and views), sorted."""
    return sorted([*_files(), *VIEWS])


def load_split(name: str) -> list[dict[str, Any]]:
    """The records of one shipped split or view, in file order (a fresh list of fresh dicts)."""
    if name in VIEWS:
        source, fields = VIEWS[name]
        return [{mine: record[theirs] for mine, theirs in fields.items()} for record in load_split(source)]
    files = _files()
    if name not in files:
        raise InputError(f"unknown data split {name!r}; known splits: {', '.join(split_names())}")
    text = files[name].read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


_SELECTION = re.compile(r"^\s*([A-Za-z0-9_]+)\s*(?:\[\s*(-?\d*)\s*:\s*(-?\d*)\s*(?::\s*(-?\d*)\s*)?\])?\s*$")


def parse_selection(spec: str) -> list[tuple[str, slice]]:
    """`"forget01,retain90[:160]"` -> [("forget01", slice(None)), ("retain90", slice(None, 160))].

    Items are comma-separated split names, each optionally followed by a Python slice `[a:b]` or
    `[a:b:step]` (file order; e.g. `forget01_paraphrased[::2]`, the even rows). Unknown split
    names, a zero step and malformed items raise `InputError`.
    """
    items = [s for s in spec.split(",") if s.strip()]
    if not items:
        raise InputError(f"empty data selection {spec!r}; e.g. 'forget01,retain90[:160]'")
    names = split_names()
    out = []
    for item in items:
        m = _SELECTION.match(item)
        if not m:
            raise InputError(f"cannot parse data selection item {item.strip()!r}: expected NAME, "
                             "NAME[start:stop] or NAME[start:stop:step], e.g. retain90[:160]")
        name, start, stop, step = m.groups()
        if name not in names:
            raise InputError(f"unknown data split {name!r}; known splits: {', '.join(names)}")
        if step and int(step) == 0:
            raise InputError(f"data selection item {item.strip()!r}: the slice step must not be zero")
        out.append((name, slice(*(int(v) if v else None for v in (start, stop, step)))))
    return out


def load_selection(spec: str) -> list[tuple[str, int, dict[str, Any]]]:
    """The records a selection names, as (split, index in the split, record), in spec order."""
    rows = []
    for name, sl in parse_selection(spec):
        records = load_split(name)
        for index in range(len(records))[sl]:
            rows.append((name, index, records[index]))
    return rows


def format_prompt(question: str) -> str:
    """The prompt text for a question: `"Question: {question}\\nAnswer:"` (question stripped)."""
    return PROMPT_TEMPLATE.format(question=question.strip())


def encode_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of `format_prompt(question)`, without special tokens."""
    return list(tokenizer(format_prompt(question), add_special_tokens=False)["input_ids"])


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Token ids of the answer alone (stripped), without special tokens or end-of-text."""
    return list(tokenizer(answer.strip(), add_special_tokens=False)["input_ids"])


def decode_answer(tokenizer, answer_ids: Sequence[int], eos_token_id: int | None = None) -> str:
    """Generated answer ids -> text: cut at the first end-of-text (default: the tokenizer's eos),
    drop special tokens, strip."""
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    ids = [int(i) for i in answer_ids]
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


__all__ = ["PROMPT_TEMPLATE", "VIEWS", "decode_answer", "encode_answer", "encode_prompt", "format_prompt",
           "load_selection", "load_split", "parse_selection", "split_names"]
