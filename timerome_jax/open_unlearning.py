"""`timerome eval --format open-unlearning`: TOFU_EVAL.json and TOFU_SUMMARY.json in open-unlearning's layout.

open-unlearning (locuslab/open-unlearning) writes, per evaluation, `TOFU_EVAL.json` — one entry
per metric, `{"agg_value": number, "value_by_index": {"0": {...}, "1": {...}}}` (the per-item part
where the metric has items) — and `TOFU_SUMMARY.json` — `{metric: agg_value}` for the headline
metrics. `documents(result, items)` turns the result of `evaluate.evaluate_suite` (metrics.json and
items.jsonl) into both, under their metric names (`NAMES`; the table in docs/evaluation.md lists
the same pairs, checked by the tests). A metric of ours with no open-unlearning counterpart keeps
its own name in TOFU_EVAL.json. `agg_value` is our mean over seeds; a metric that could not be
computed has `agg_value` null and our `reason`.

Per-item values (`value_by_index`, item index as a string key), each averaged over seeds:
probabilities `{"prob", "avg_loss"}` (P_norm = exp(−avg_loss)), ROUGE `{"rougeL_recall"}`, truth
ratios `{"score": R}` (perturbed over correct), memorisation `{"score"}`, our LPs `{"score"}`. The
MIA entries carry `auc` and, per set (`forget`, `holdout`), `value_by_index` of `{"score"}` in
open-unlearning's sign (a loss: higher = less member-like), i.e. minus `privacy.attack_score`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from timerome_jax.errors import InputError
from timerome_jax.metrics import METRICS

FORMATS = ("timerome", "open-unlearning")
EVAL_FILE, SUMMARY_FILE = "TOFU_EVAL.json", "TOFU_SUMMARY.json"

# our metric name -> open-unlearning's
NAMES = {
    "forget_quality": "forget_quality",
    "model_utility": "model_utility",
    "truth_ratio_forget": "forget_truth_ratio",
    "forget_probability": "forget_Q_A_Prob",
    "rouge_forget": "forget_Q_A_ROUGE",
    "retain_probability": "retain_Q_A_Prob",
    "rouge_retain": "retain_Q_A_ROUGE",
    "retain_truth_ratio": "retain_Truth_Ratio",
    "real_authors_probability": "ra_Q_A_Prob_normalised",
    "rouge_real_authors": "ra_Q_A_ROUGE",
    "real_authors_truth_ratio": "ra_Truth_Ratio",
    "world_facts_probability": "wf_Q_A_Prob_normalised",
    "rouge_world_facts": "wf_Q_A_ROUGE",
    "world_facts_truth_ratio": "wf_Truth_Ratio",
    "mia_loss": "mia_loss",
    "mia_zlib": "mia_zlib",
    "mia_min_k": "mia_min_k",
    "mia_min_k_plus_plus": "mia_min_k_plus_plus",
    "privleak": "privleak",
    "exact_memorization": "exact_memorization",
    "extraction_strength": "extraction_strength",
}
# TOFU_SUMMARY.json: open-unlearning's headline TOFU metrics
SUMMARY = ("forget_quality", "model_utility", "forget_truth_ratio", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "privleak",
           "extraction_strength", "exact_memorization", "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus")

def check_format(name: str) -> str:
    if name not in FORMATS:
        raise InputError(f"unknown --format {name!r}; choose {' or '.join(FORMATS)}")
    return name


def output_name(ours: str) -> str:
    """The name a metric of ours has in TOFU_EVAL.json."""
    return NAMES.get(ours, ours)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def _by_index(items: list[dict], split: str, value) -> dict[str, dict]:
    rows = [i for i in items if i["split"] == split]
    return {str(i["index"]): value(i) for i in rows}


def _prob(item: dict) -> dict:
    lp = np.asarray(item["lp_per_seed"], np.float64) / item["answer_tokens"]
    return {"prob": float(np.mean(np.exp(lp))), "avg_loss": float(-np.mean(lp))}


def _per_item(ours: str, items: list[dict]) -> dict[str, dict] | None:
    """value_by_index of one metric (None: an aggregate-only metric)."""
    for split in ("forget", "retain"):
        if ours == f"{split}_probability":
            return _by_index(items, split, _prob)
    for split in ("forget", "retain", "real_authors", "world_facts"):
        if ours == f"rouge_{split}":
            return _by_index(items, split, lambda i: {"rougeL_recall": i["rougeL_recall"]})
        if ours in (f"{split}_truth_ratio", "truth_ratio_forget" if split == "forget" else None):
            return _by_index(items, split, lambda i: {"score": _mean(i["truth_ratio_per_seed"] or [])})
    lp_fields = {"forget_lp": ("forget", "lp_per_seed"), "retain_lp": ("retain", "lp_per_seed"),
                 "real_author_lp": ("real_authors", "lp_per_seed"), "world_facts_lp": ("world_facts", "lp_per_seed"),
                 "paraphrase_forget_lp": ("forget", "paraphrase_lp_per_seed"),
                 "relearn_forget_lp": ("forget", "relearn_lp_per_seed")}
    if ours in lp_fields:
        split, field = lp_fields[ours]
        return _by_index(items, split, lambda i: {"score": _mean(i.get(field) or [])})
    if ours in ("exact_memorization", "extraction_strength"):
        return _by_index(items, "forget", lambda i: {"score": i.get(ours)})
    return None


def _entry(ours: str, metric: dict, items: list[dict]) -> dict[str, Any]:
    entry: dict[str, Any] = {"agg_value": metric["mean"]}
    if metric["mean"] is None:
        entry["reason"] = metric.get("reason", "")
        return entry
    if ours.startswith("mia_"):
        attack = ours[len("mia_"):]
        entry["auc"] = metric["mean"]
        for split in ("forget", "holdout"):
            entry[split] = {"value_by_index": _by_index(items, split, lambda i: {"score": -i["mia_scores"][attack]})}
        return entry
    per_item = _per_item(ours, items)
    if per_item is not None:
        entry["value_by_index"] = per_item
    return entry


def documents(result: dict, items: list[dict]) -> tuple[dict, dict]:
    """(TOFU_EVAL.json, TOFU_SUMMARY.json) of one `evaluate_suite` result and its items."""
    evaluation = {output_name(name): _entry(name, result[name], items) for name in METRICS if name in result}
    summary = {name: evaluation[name]["agg_value"] for name in SUMMARY if name in evaluation}
    return evaluation, summary


__all__ = ["EVAL_FILE", "FORMATS", "NAMES", "SUMMARY", "SUMMARY_FILE", "check_format", "documents", "output_name"]
