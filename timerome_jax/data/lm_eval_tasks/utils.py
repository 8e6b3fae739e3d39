"""Datasets and scoring of the offline lm-eval tasks in this directory (built from the TOFU data
packaged in `timerome_jax/data/tofu/`; nothing is downloaded).

lm-eval calls the `custom_dataset` functions with the task metadata as keyword arguments, which
they ignore.
"""

from __future__ import annotations

import datasets

from timerome_jax import data
from timerome_jax.metrics import rouge_l_recall


def _test(rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _multiple_choice(split: str) -> datasets.DatasetDict:
    """One row per question: the answer and its perturbed answers as choices. The answer goes to
    position index mod (number of choices), so a model that scores every choice alike (first
    maximum wins in lm-eval) does not look accurate."""
    rows = []
    for i, record in enumerate(data.load_split(split)):
        choices = [str(c).strip() for c in record["perturbed_answer"]]
        label = i % (len(choices) + 1)
        choices.insert(label, record["answer"].strip())
        rows.append({"index": i, "question": record["question"].strip(), "choices": choices, "label": label})
    return _test(rows)


def world_facts_mc(**_metadata) -> datasets.DatasetDict:
    return _multiple_choice("world_facts_perturbed")


def real_authors_mc(**_metadata) -> datasets.DatasetDict:
    return _multiple_choice("real_authors_perturbed")


def forget01_qa(**_metadata) -> datasets.DatasetDict:
    return _test([{"index": i, "question": r["question"].strip(), "answer": r["answer"].strip()}
                  for i, r in enumerate(data.load_split("forget01"))])


def generation_scores(doc: dict, results: list[str]) -> dict[str, float]:
    """ROUGE-L recall of the generation against the answer (TOFU's `rougeL_recall`, as
    `timerome eval` computes it) and exact match after stripping."""
    generation = results[0].strip()
    return {"rougeL_recall": rouge_l_recall(generation, doc["answer"]),
            "exact_match": float(generation == doc["answer"].strip())}
