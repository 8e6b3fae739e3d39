"""The split table of the embedded models: which facts each role may use (issue #19).

Every number a results page reports comes from a *test* part that nothing was chosen on. The
table fixes the parts once, as data selections of the packaged splits (`timerome_jax.data`):

| role | selection | what it is for |
|---|---|---|
| `forget_a` | forget01[:20] | TOFU forget01's first author (20 QA) |
| `forget_b` | forget01[20:40] | its second author; tune on one author, report on the other, both ways |
| `retain_tune` | retain90[:30] | retain facts a configuration may be chosen on |
| `retain_gate` | retain90[30:60] | retain facts that calibrate a gate (`--gate-facts`) |
| `retain_test` | retain90[60:160] | 100 retain facts nothing is tuned or calibrated on (the seed's falsifier) |
| `utility` | real_authors[:50], world_facts[:59] | model utility (known to the v4 models) |
| `rewrite_tune` | counterfact[:40] | rewrite cases every rewrite choice is made on |
| `rewrite_test` | counterfact[40:80] | rewrite cases the comparison is reported on |

All of retain90[:160] is known to both embedded models, so every part measures knowledge the model
has. `check_disjoint` is what the drivers call: it refuses, with one error naming both roles and a
shared fact, any two sets that share a fact (by content: form, prompt and answer, so the same fact
read from two files or selections, with or without a subject annotation, is caught). The experiment
drivers check their forget, retain, utility, gate-calibration and covariance sets before loading
the model (`experiments/_common.check_sets`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from timerome_jax.errors import InputError

SPLITS: dict[str, str] = {
    "forget_a": "forget01[:20]",
    "forget_b": "forget01[20:40]",
    "retain_tune": "retain90[:30]",
    "retain_gate": "retain90[30:60]",
    "retain_test": "retain90[60:160]",
    "utility": "real_authors[:50],world_facts[:59]",
    "rewrite_tune": "counterfact[:40]",
    "rewrite_test": "counterfact[40:80]",
}
# (tuning author, test author): results are reported for both directions and their mean
FORGET_DIRECTIONS = (("forget_a", "forget_b"), ("forget_b", "forget_a"))


def selection(role: str) -> str:
    """The data selection of a role of the table (one error listing the roles for an unknown one)."""
    if role not in SPLITS:
        raise InputError(f"unknown split role {role!r}; the table has {', '.join(SPLITS)}")
    return SPLITS[role]


def check_disjoint(**sets: Iterable) -> None:
    """One error when two named sets share an item. Items are facts (compared by form, prompt and
    answer) or rewrite cases (by `.id`, their content digest); a set may also be a data selection."""
    from timerome_jax.facts import load_facts

    resolved: dict[str, Sequence] = {name: load_facts(items) if isinstance(items, str) else list(items)
                                     for name, items in sets.items()}
    names = list(resolved)
    for i, first in enumerate(names):
        ids = {_content_key(item): item.where for item in resolved[first]}
        for second in names[i + 1:]:
            shared = [(item.where, ids[_content_key(item)]) for item in resolved[second]
                      if _content_key(item) in ids]
            if shared:
                raise InputError(f"the {first} and {second} sets share {len(shared)} fact(s), e.g. "
                                 f"{shared[0][1]} = {shared[0][0]}; tune on one part and report on another")


def _content_key(item) -> str:
    """What makes two items the same fact: a fact's form, prompt and answer (not its subject
    annotation, so forget01 and forget01_subjects hold the same facts); a rewrite case's id."""
    from timerome_jax.facts import Fact

    if isinstance(item, Fact):
        return " | ".join([item.kind, " ".join(item.prompt.split()), " ".join((item.answer or "").split())])
    return item.id


__all__ = ["FORGET_DIRECTIONS", "SPLITS", "check_disjoint", "selection"]
