"""Membership inference and extraction metrics for masked diffusion LMs (open-unlearning's names).

Per-token probabilities of an MDLM. An autoregressive model scores token t given the tokens before
it. An MDLM has no such order, so the definitions here take the **one-step** view: every answer
token is masked at once and read from a single forward (`sampler.answer_logits`), the first
step of the sampler's trajectory. For each answer token j this gives log p(y_j | prompt, all
answer masked), the mean μ_j and standard deviation σ_j of log p(v) under the model's own
distribution at j (for Min-K%++), and whether y_j is the argmax.

Scores (higher = more likely a training member), per (prompt, answer) pair:

    loss        mean_j log p(y_j)                                   (LOSS attack: −NLL per token)
    zlib        mean_j log p(y_j) / len(zlib.compress(answer bytes))  (ZLib attack)
    min_k       mean of the max(1, floor(k·|y|)) lowest log p(y_j), k = 0.4   (Min-K %)
    min_k_plus_plus  same on z_j = (log p(y_j) − μ_j) / σ_j         (Min-K %++)

These are open-unlearning's attacks with the sign flipped (theirs are losses, higher = non-member;
ZLib divides the mean token loss by the zlib length, Min-K % keeps floor(k·|y|) tokens, at least
one).

`auc(members, nonmembers)`: the probability that a member outscores a non-member (ties count
half), the ROC AUC of the attack: 1 when the forget answers are much more likely than the holdout
answers (open-unlearning's convention). `privleak(auc, reference_auc)` is open-unlearning's
PrivLeak, which follows MUSE in scoring 1 − AUC: ((1 − auc) − (1 − ref)) / (1 − ref) · 100. It is
0 when the model leaks membership as much as a model never trained on the forget set (the retain
twin), −100 when the attack separates perfectly and the reference is at chance or below.

Memorisation, per pair, from the one-step view with a prefix revealed:

    exact_memorization   share of answer tokens that are the argmax with every answer token masked
    extraction_strength  1 − k*/|y|, k* the shortest revealed answer prefix after which the
                         argmax of every still-masked token is the true token (|y| if none)
"""

from __future__ import annotations

import functools
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ports import Backbone
from timerome_jax import distributed
from timerome_jax.errors import InputError
from timerome_jax.likelihood import Pair
from timerome_jax.sampler import answer_logits
from timerome_jax.tokenization import pad_left, pad_right

Array = jax.Array
ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
MIN_K = 0.4


@functools.partial(jax.jit, static_argnames=("mask_id", "prefixes"))
def _token_statistics(backbone: Backbone, rows, mask_id: int, prefixes: bool = True):
    """Per answer token [B, A]: log p(y_j), μ_j, σ_j, argmax == y_j (all answer masked), and per
    pair the shortest prefix k* after which the argmax of every masked token is right (A more
    forwards; `prefixes=False` skips them and returns 0)."""
    prompt_ids, prompt_mask, answer_ids, answer_mask = rows
    A = answer_ids.shape[1]

    def stats(revealed_A):
        shown = jnp.where(revealed_A[None], answer_ids, mask_id)
        logp = jax.nn.log_softmax(answer_logits(backbone, prompt_ids, prompt_mask, shown, answer_mask), axis=-1)
        return logp

    logp = stats(jnp.zeros(A, bool))                                    # [B, A, V]
    token_lp = jnp.take_along_axis(logp, answer_ids[..., None], -1)[..., 0]
    probs = jnp.exp(logp)
    mean = jnp.sum(probs * logp, -1)
    std = jnp.sqrt(jnp.maximum(jnp.sum(probs * logp ** 2, -1) - mean ** 2, 1e-12))
    correct = jnp.argmax(logp, -1) == answer_ids

    def extracted_after(k):    # every masked token right with the first k answer tokens revealed
        revealed = jnp.arange(A) < k
        right = jnp.argmax(stats(revealed), -1) == answer_ids
        return jnp.all(right | revealed[None] | (answer_mask == 0), axis=-1)    # [B]

    lengths = jnp.sum(answer_mask, -1)
    if not prefixes:
        return token_lp, mean, std, correct, jnp.zeros_like(lengths)
    ok_KB = jax.lax.map(extracted_after, jnp.arange(A))                 # [A, B]
    ok_KB = ok_KB & (jnp.arange(A)[:, None] < lengths[None])
    first = jnp.where(jnp.any(ok_KB, 0), jnp.argmax(ok_KB, 0), lengths)
    return token_lp, mean, std, correct, first


def token_statistics(backbone: Backbone, pairs: Sequence[Pair], *, pad_id: int, pairs_per_call: int = 8,
                     prefixes: bool = True, mesh=None) -> list[dict[str, np.ndarray]]:
    """One dict per pair: `token_lp`, `mean`, `std`, `correct` ([|y|] each) and `prefix` (k*; not
    computed, 0, with `prefixes=False`)."""
    if not pairs:
        return []
    if backbone.mask_token_id is None:
        raise InputError("this backbone has no mask token id: per-token statistics need one")
    P = max(len(p.prompt_ids) for p in pairs)
    A = max(len(p.answer_ids) for p in pairs)
    if P + A > backbone.config.max_seq_len:
        raise InputError(f"the longest prompt ({P}) and answer ({A}) exceed the model's maximum length "
                         f"{backbone.config.max_seq_len}")
    rows = (*pad_left([p.prompt_ids for p in pairs], pad_id, P), *pad_right([p.answer_ids for p in pairs], pad_id, A))
    out = distributed.map_chunks(_token_statistics, tuple(np.asarray(r) for r in rows), chunk_size=pairs_per_call,
                                 before=(backbone,), static={"mask_id": backbone.mask_token_id, "prefixes": prefixes}, mesh=mesh)
    token_lp, mean, std, correct, first = (np.asarray(x) for x in out)
    return [{"token_lp": token_lp[i, :len(p.answer_ids)].astype(np.float64),
             "mean": mean[i, :len(p.answer_ids)].astype(np.float64),
             "std": std[i, :len(p.answer_ids)].astype(np.float64),
             "correct": correct[i, :len(p.answer_ids)], "prefix": int(first[i])} for i, p in enumerate(pairs)]


# --- the attacks and metrics (pure numpy) ------------------------------------------------------------

def lowest_mean(values: np.ndarray, k: float = MIN_K) -> float:
    """Mean of the max(1, floor(k·n)) lowest values (open-unlearning's count)."""
    if not 0 < k <= 1:
        raise InputError(f"k must lie in (0, 1], got {k}")
    values = np.sort(np.asarray(values, np.float64))
    return float(values[:max(1, int(k * len(values)))].mean())


def attack_score(attack: str, stats: dict[str, np.ndarray], answer_text: str, k: float = MIN_K) -> float:
    """The membership score of one pair (higher = more member-like); see the module docstring."""
    lp = stats["token_lp"]
    if attack == "loss":
        return float(lp.mean())
    if attack == "zlib":
        return float(lp.mean() / len(zlib.compress(answer_text.encode("utf-8"))))
    if attack == "min_k":
        return lowest_mean(lp, k)
    if attack == "min_k_plus_plus":
        return lowest_mean((lp - stats["mean"]) / stats["std"], k)
    raise InputError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")


def auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """P(member score > non-member score) + ½ P(equal): the attack's ROC AUC."""
    m, n = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
    if not len(m) or not len(n):
        raise InputError("an AUC needs at least one member and one non-member")
    greater = (m[:, None] > n[None, :]).mean()
    equal = (m[:, None] == n[None, :]).mean()
    return float(greater + 0.5 * equal)


def privleak(model_auc: float, reference_auc: float) -> float:
    """open-unlearning's PrivLeak: ((1 − AUC) − (1 − reference AUC)) / (1 − reference AUC) · 100."""
    if not reference_auc < 1:
        raise InputError(f"privleak needs a reference AUC below 1 (it divides by 1 − AUC), got {reference_auc}")
    return float(((1.0 - model_auc) - (1.0 - reference_auc)) / (1.0 - reference_auc) * 100.0)


PRIVLEAK_ATTACK = "min_k"   # open-unlearning's TOFU and MUSE privleak read the Min-K % AUC


def privleak_or_none(model_auc: float, reference_auc: float) -> float | None:
    """`privleak`, or None where it is undefined (a reference AUC of 1: the retain twin itself
    separates the sets perfectly, so no leak can be measured against it)."""
    return None if reference_auc >= 1 else privleak(model_auc, reference_auc)


def exact_memorization(stats: dict[str, np.ndarray]) -> float:
    return float(np.mean(stats["correct"]))


def extraction_strength(stats: dict[str, np.ndarray]) -> float:
    return float(1.0 - stats["prefix"] / len(stats["token_lp"]))


def membership_report(member_stats, member_texts, nonmember_stats, nonmember_texts, k: float = MIN_K) -> dict:
    """AUC of every attack, members vs non-members, plus the members' mean exact memorisation and
    extraction strength."""
    report = {}
    for attack in ATTACKS:
        members = [attack_score(attack, s, t, k) for s, t in zip(member_stats, member_texts)]
        others = [attack_score(attack, s, t, k) for s, t in zip(nonmember_stats, nonmember_texts)]
        report[f"mia_{attack}_auc"] = auc(members, others)
    report["exact_memorization"] = float(np.mean([exact_memorization(s) for s in member_stats]))
    report["extraction_strength"] = float(np.mean([extraction_strength(s) for s in member_stats]))
    return report


__all__ = ["ATTACKS", "MIN_K", "PRIVLEAK_ATTACK", "attack_score", "auc", "exact_memorization", "extraction_strength",
           "lowest_mean", "membership_report", "privleak", "privleak_or_none", "token_statistics"]
