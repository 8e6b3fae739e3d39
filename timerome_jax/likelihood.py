"""Log-likelihood of an answer given a prompt under a masked diffusion LM: three estimators.

"Log-probability" here is a sum over the answer tokens, in nats, per QA pair (DESIGN.md §1).

Layout: `[prompt_ids_BP (left-padded) | answer_ids_BA (right-padded)]`; the masks are 1 on real
tokens and padding enters through the attention mask only, so a pair's value does not depend on the
batch it is scored in.

Methods (`answer_log_likelihood(..., method=...)`):
  * 'mc_elbo' (LLaDA's estimator): J Monte-Carlo copies per pair (DESIGN.md's M); copy i masks m_i
    of the l answer tokens, chosen uniformly; the m_i are stratified: m_i = floor((i + u) l / J) + 1 with one
    u ~ U[0, 1) per pair, so every m in {1..l} is equally likely and the copies cover {1..l} evenly;
    estimate = mean_i (l / m_i) sum_{masked j} log p(y_j | x, y with the chosen tokens masked).
    The masks depend only on the key and on l (not on the model, the prompt or the padding), so two
    models scored with the same key see the same masks (paired comparisons).
  * 'one_step': mask all of y and sum log p(y_j) from one forward (cheap, biased).
  * 'chain': reveal y one token at a time; at each step the still-masked position whose top proposal
    is most confident (the sampler's confidence: probability of the model's own top proposal, mask
    token excluded; ties to the earlier position) is revealed with its true token and its
    log p(y_j) added. l forwards; the exact log-probability of y along that order.

Forwards are batched with `jax.lax.map(..., batch_size=batch_size)`: `batch_size` sequences per
forward (J copies x B pairs for 'mc_elbo', B rows for the others).

As in `timerome_jax.sampler`, `answer_log_likelihood` is pure and traceable (call it inside your
own jit, interceptors included); `answer_log_likelihood_jit` is the validated host entry point.

Scoring many (prompt, answer) pairs (`score_pairs`): a `Pair` has an id (e.g. "forget/3/answer")
that fixes its MC-ELBO keys — pair j under seed s uses `fold_in(key(s), crc32(id))` — so a pair's
masks depend neither on the batch it is scored in nor on the model (edited, unedited and reference
models are scored on the same masks: paired comparisons). Pairs are sorted by (prompt, answer)
length, padded to bucket lengths from `BUCKETS` (ratio <= 1.5 between neighbours) and scored
`pairs_per_call` rows at a time (rows of all seeds share calls), so there is one compilation per
bucket pair; on a mesh the rows of a call are split over its 'data' axis.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ports import Backbone
from timerome_jax import distributed
from timerome_jax.errors import InputError
from timerome_jax.tokenization import pad_left, pad_right
from timerome_jax.sampler import (answer_logits, check_mask_token, check_nonempty_rows,
                                  check_sequence_length, reject_tracers, row_keys, top_proposal)

Array = jax.Array

METHODS = ("mc_elbo", "one_step", "chain")


def check_method(method: str, mc_samples: int, batch_size: int) -> None:
    if method not in METHODS:
        raise InputError(f"unknown log-likelihood method {method!r}; choose one of {', '.join(METHODS)}")
    for name, value in (("mc_samples", mc_samples), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")


def answer_token_log_probs(backbone: Backbone, prompt_ids_BP: Array, prompt_mask_BP: Array,
                           input_answer_BA: Array, answer_mask_BA: Array,
                           targets_BA: Array) -> Array:
    """log p(targets_j | prompt, input_answer) at every answer position j: float32 [B, A]."""
    logits = answer_logits(backbone, prompt_ids_BP, prompt_mask_BP, input_answer_BA, answer_mask_BA)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_probs, targets_BA[..., None].astype(jnp.int32), axis=-1)[..., 0]


# The MC-ELBO scores are drawn in chunks of this many answer positions, chunk c from
# fold_in(key, c): the draw for a position never depends on the answer's padded length A.
ELBO_DRAW_CHUNK = 128


def elbo_masks(keys_B: Array, answer_mask_BA: Array, mc_samples: int) -> tuple[Array, Array]:
    """The MC-ELBO masks: (masked [B, J, A] bool, mask counts m [B, J] int32).

    Row b uses only `keys_B[b]` and its answer length l_b: the stratified counts m_i (see the module
    docstring) and, per copy, the m_i answer positions with the smallest uniform scores. The scores
    of positions [128 c, 128 (c + 1)) and, for c = 0, the offset u come from one draw of shape
    [J + 1, 128] keyed by `fold_in(key, c)`, so a real position's score depends neither on the model
    nor on how much right padding follows it.
    """
    J = mc_samples
    A = answer_mask_BA.shape[1]
    chunks = -(-A // ELBO_DRAW_CHUNK)
    real = answer_mask_BA.astype(bool)
    lengths = jnp.sum(real, axis=-1)

    def one_row(key, length, real_A):
        draws = jax.vmap(lambda c: jax.random.uniform(jax.random.fold_in(key, c),
                                                         (J + 1, ELBO_DRAW_CHUNK)))(
            jnp.arange(chunks))
        offset = draws[0, 0, 0]
        counts = jnp.floor((jnp.arange(J) + offset) * length / J).astype(jnp.int32) + 1
        counts = jnp.clip(counts, 1, jnp.maximum(length, 1))
        scores_JA = jnp.moveaxis(draws[:, 1:], 0, 1).reshape(J, chunks * ELBO_DRAW_CHUNK)[:, :A]
        scores_JA = jnp.where(real_A[None, :], scores_JA, jnp.inf)
        rank = jnp.argsort(jnp.argsort(scores_JA, axis=-1, stable=True), axis=-1)
        return (rank < counts[:, None]) & real_A[None, :], counts

    return jax.vmap(one_row)(keys_B, lengths, real)


def _map_rows(fn, items, batch_size: int):
    n = jax.tree.leaves(items)[0].shape[0]
    return jax.lax.map(fn, items, batch_size=min(batch_size, n))


def mc_elbo_terms(backbone: Backbone, prompt_ids_BP: Array, prompt_mask_BP: Array,
                  answer_ids_BA: Array, answer_mask_BA: Array, key: Array, *, mc_samples: int = 128,
                  batch_size: int = 32) -> Array:
    """The J per-copy terms (l / m_i) sum_{masked j} log p(y_j | ...): float32 [B, J].

    Their mean over J is the 'mc_elbo' estimate, their spread its Monte-Carlo error.
    """
    mask_id = check_mask_token(backbone)
    B, P = prompt_ids_BP.shape
    A = answer_ids_BA.shape[1]
    J = mc_samples
    masked_BJA, counts_BJ = elbo_masks(row_keys(key, B), answer_mask_BA, J)
    lengths = jnp.sum(answer_mask_BA.astype(bool), axis=-1)
    weights_BJ = lengths[:, None].astype(jnp.float32) / counts_BJ.astype(jnp.float32)

    def copies(x):
        return jnp.broadcast_to(x[:, None], (B, J) + x.shape[1:]).reshape((B * J,) + x.shape[1:])

    items = (copies(prompt_ids_BP), copies(prompt_mask_BP), copies(answer_ids_BA),
             copies(answer_mask_BA), masked_BJA.reshape(B * J, A), weights_BJ.reshape(B * J))

    def one(item):
        p_ids, p_mask, a_ids, a_mask, masked, weight = item
        noisy = jnp.where(masked, mask_id, a_ids)
        log_p = answer_token_log_probs(backbone, p_ids[None], p_mask[None], noisy[None],
                                       a_mask[None], a_ids[None])[0]
        return weight * jnp.sum(jnp.where(masked, log_p, 0.0))

    return _map_rows(one, items, batch_size).reshape(B, J)


def one_step_log_likelihood(backbone: Backbone, prompt_ids_BP: Array, prompt_mask_BP: Array,
                            answer_ids_BA: Array, answer_mask_BA: Array, *,
                            batch_size: int = 32) -> Array:
    """sum_j log p(y_j | x, all of y masked): float32 [B]."""
    mask_id = check_mask_token(backbone)

    def one(item):
        p_ids, p_mask, a_ids, a_mask = item
        real = a_mask.astype(bool)
        noisy = jnp.where(real, mask_id, a_ids)
        log_p = answer_token_log_probs(backbone, p_ids[None], p_mask[None], noisy[None],
                                       a_mask[None], a_ids[None])[0]
        return jnp.sum(jnp.where(real, log_p, 0.0))

    return _map_rows(one, (prompt_ids_BP, prompt_mask_BP, answer_ids_BA, answer_mask_BA), batch_size)


def chain_log_likelihood(backbone: Backbone, prompt_ids_BP: Array, prompt_mask_BP: Array,
                         answer_ids_BA: Array, answer_mask_BA: Array, *,
                         batch_size: int = 32) -> Array:
    """Reveal y in the model's confidence order, summing log p(y_j) of each revealed token: [B].

    A = answer_ids_BA.shape[1] forwards per row (rows shorter than A idle after l steps).
    """
    mask_id = check_mask_token(backbone)
    A = answer_ids_BA.shape[1]

    def one(item):
        p_ids, p_mask, a_ids, a_mask = item
        real = a_mask.astype(bool)

        def body(carry, _):
            masked, total = carry
            ids = jnp.where(masked, mask_id, a_ids)
            logits = answer_logits(backbone, p_ids[None], p_mask[None], ids[None], a_mask[None])
            _, confidence = top_proposal(logits, mask_id)
            candidates = masked & real
            j = jnp.argmax(jnp.where(candidates, confidence[0], -jnp.inf))
            log_p = jax.nn.log_softmax(logits[0, j])[a_ids[j]]
            any_left = jnp.any(candidates)
            total = total + jnp.where(any_left, log_p, 0.0)
            masked = masked.at[j].set(masked[j] & ~any_left)
            return (masked, total), None

        (_, total), _ = jax.lax.scan(body, (real, jnp.zeros((), jnp.float32)), None, length=A)
        return total

    return _map_rows(one, (prompt_ids_BP, prompt_mask_BP, answer_ids_BA, answer_mask_BA), batch_size)


def answer_log_likelihood(backbone: Backbone, prompt_ids_BP: Array, prompt_mask_BP: Array,
                          answer_ids_BA: Array, answer_mask_BA: Array, key: Array | None = None, *,
                          method: str = "mc_elbo", mc_samples: int = 128,
                          batch_size: int = 32) -> Array:
    """log p(answer | prompt) in nats, summed over answer tokens: float32 [B] (pure; jit it).

    Args:
      prompt_ids_BP, prompt_mask_BP: left-padded prompts, 1 on real tokens.
      answer_ids_BA, answer_mask_BA: right-padded answers, 1 on real tokens.
      key: one PRNG key or B keys (see `sampler.row_keys`); needed by 'mc_elbo' only.
      method: 'mc_elbo' | 'one_step' | 'chain' (static).
      mc_samples: J, copies per pair for 'mc_elbo' (static).
      batch_size: sequences per forward (static).
    """
    check_method(method, mc_samples, batch_size)
    check_sequence_length(backbone, prompt_ids_BP.shape[1], answer_ids_BA.shape[1])
    args = (backbone, prompt_ids_BP, prompt_mask_BP, answer_ids_BA, answer_mask_BA)
    if method == "mc_elbo":
        if key is None:
            raise InputError("method 'mc_elbo' needs a PRNG key")
        return jnp.mean(mc_elbo_terms(*args, key, mc_samples=mc_samples, batch_size=batch_size),
                        axis=-1)
    if method == "one_step":
        return one_step_log_likelihood(*args, batch_size=batch_size)
    return chain_log_likelihood(*args, batch_size=batch_size)


_compiled = jax.jit(answer_log_likelihood, static_argnames=("method", "mc_samples", "batch_size"))


def answer_log_likelihood_jit(backbone: Backbone, prompt_ids_BP, prompt_mask_BP, answer_ids_BA,
                              answer_mask_BA, key=None, *, method: str = "mc_elbo",
                              mc_samples: int = 128, batch_size: int = 32) -> Array:
    """`answer_log_likelihood`, compiled once per shape and static arguments, with host checks
    (non-empty prompts and answers, matching shapes)."""
    reject_tracers("answer_log_likelihood_jit", prompt_ids_BP, prompt_mask_BP, answer_ids_BA,
                   answer_mask_BA, key)
    check_method(method, mc_samples, batch_size)
    arrays = [np.asarray(a) for a in (prompt_ids_BP, prompt_mask_BP, answer_ids_BA, answer_mask_BA)]
    if any(a.ndim != 2 for a in arrays) or arrays[0].shape != arrays[1].shape or \
            arrays[2].shape != arrays[3].shape or arrays[0].shape[0] != arrays[2].shape[0]:
        raise InputError("prompt ids/mask [B, P] and answer ids/mask [B, A] must be 2-D with "
                         f"matching shapes, got {[a.shape for a in arrays]}")
    check_sequence_length(backbone, arrays[0].shape[1], arrays[2].shape[1])
    check_nonempty_rows(arrays[1], "the prompt")
    check_nonempty_rows(arrays[3], "the answer")
    if method == "mc_elbo" and key is None:
        raise InputError("method 'mc_elbo' needs a PRNG key")
    ids = [jnp.asarray(a, jnp.int32) for a in arrays]
    return _compiled(backbone, *ids, key, method=method, mc_samples=mc_samples,
                     batch_size=batch_size)


# --- scoring pairs ----------------------------------------------------------------------------------

# Padded lengths (prompt and answer separately); neighbours differ by a factor <= 1.5.
BUCKETS = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072,
           4096, 6144, 8192)


@dataclasses.dataclass(frozen=True)
class Pair:
    """One (prompt, answer) pair to score; `id` (e.g. "split/index/kind") also fixes its MC keys."""

    id: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]

    @property
    def key_data(self) -> int:
        return zlib.crc32(self.id.encode()) & 0x7FFFFFFF


def qa_pairs(tokenizer, facts, tag: str) -> list[Pair]:
    """(prompt, answer) token pairs of facts in the model's text format (`Fact.texts`); ids
    `tag/i` fix the MC keys."""
    out = []
    for i, fact in enumerate(facts):
        prompt, answer = fact.texts()
        if answer is None:
            raise InputError(f"{fact.where}: scoring needs an answer")
        out.append(Pair(f"{tag}/{i}", tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
                        tuple(tokenizer(answer, add_special_tokens=False)["input_ids"])))
    return out


def bucket_length(n: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket >= n (n itself beyond the last bucket)."""
    return next((b for b in buckets if b >= n), n)


def _bucket(pair: Pair, max_len: int) -> tuple[int, int]:
    P, A = len(pair.prompt_ids), len(pair.answer_ids)
    pb, ab = bucket_length(P), bucket_length(A)
    if pb + ab > max_len:
        ab = max(A, max_len - pb)
        pb = max(P, max_len - ab)
    return pb, ab


_pair_keys = jax.jit(jax.vmap(lambda seed, data_: jax.random.fold_in(jax.random.key(seed), data_)))


@functools.partial(jax.jit, static_argnames=("method", "mc_samples", "batch_size"))
def _score_rows(backbone: Backbone, rows, *, method: str, mc_samples: int, batch_size: int):
    prompt_ids, prompt_mask, answer_ids, answer_mask, key_data = rows
    keys = jax.random.wrap_key_data(key_data)
    return answer_log_likelihood(backbone, prompt_ids, prompt_mask, answer_ids, answer_mask, keys, method=method,
                                 mc_samples=mc_samples, batch_size=batch_size)


def score_pairs(backbone: Backbone, pairs: Sequence[Pair], seeds: Sequence[int], *, pad_id: int,
                estimator: str = "mc_elbo", mc_samples: int = 32, pairs_per_call: int = 8,
                batch_size: int = 32, progress: Callable | None = None, mesh=None) -> np.ndarray:
    """LP(answer | prompt) of every pair under every seed: float64 [len(seeds), len(pairs)].

    Rows (seed, pair) are grouped by bucketed (prompt, answer) length and scored `pairs_per_call`
    at a time (per data shard on a `mesh`; the last call of a group is filled with copies,
    discarded), `batch_size` sequences per forward. Deterministic estimators are scored once and
    repeated for every seed. A row's key depends only on its seed and pair id (module docstring).
    """
    check_method(estimator, mc_samples, batch_size)
    if not isinstance(pairs_per_call, int) or pairs_per_call < 1:
        raise InputError(f"pairs per call must be a positive integer, got {pairs_per_call!r}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InputError("at least one seed is needed")
    out = np.zeros((len(seeds), len(pairs)), np.float64)
    if not pairs:
        return out
    limit = backbone.config.max_seq_len
    for p in pairs:
        if not p.prompt_ids or not p.answer_ids:
            raise InputError(f"{p.id}: the prompt or the answer tokenises to nothing")
        if len(p.prompt_ids) + len(p.answer_ids) > limit:
            raise InputError(f"{p.id}: prompt of {len(p.prompt_ids)} tokens + answer of "
                             f"{len(p.answer_ids)} tokens exceeds the model's maximum length {limit}")
    scored_seeds = seeds if estimator == "mc_elbo" else seeds[:1]
    per_call = pairs_per_call * (1 if mesh is None else distributed.data_axis_size(mesh))
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for j, p in enumerate(pairs):
        groups.setdefault(_bucket(p, limit), []).extend((s, j) for s in range(len(scored_seeds)))
    calls = []
    for shape in sorted(groups):
        rows = groups[shape]
        for start in range(0, len(rows), per_call):
            chunk = rows[start:start + per_call]
            calls.append((shape, chunk + [chunk[0]] * (per_call - len(chunk)), len(chunk)))
    static = dict(method=estimator, mc_samples=mc_samples, batch_size=batch_size)
    for (pb, ab), chunk, real in (progress(calls) if progress else calls):
        chosen = [pairs[j] for _, j in chunk]
        keys = _pair_keys(jnp.asarray([scored_seeds[s] for s, _ in chunk], jnp.uint32),
                          jnp.asarray([c.key_data for c in chosen], jnp.uint32))
        rows = (*pad_left([c.prompt_ids for c in chosen], pad_id, pb), *pad_right([c.answer_ids for c in chosen], pad_id, ab),
                np.asarray(jax.random.key_data(keys)))
        values = distributed.map_chunks(_score_rows, rows, chunk_size=pairs_per_call, before=(backbone,),
                                        static=static, mesh=mesh)
        for (s, j), v in zip(chunk[:real], np.asarray(values, np.float64)[:real]):
            out[s, j] = v
    if len(scored_seeds) < len(seeds):
        out[:] = out[:1]
    return out


__all__ = [
    "BUCKETS", "METHODS", "Pair", "answer_log_likelihood", "answer_log_likelihood_jit", "answer_token_log_probs",
    "bucket_length", "chain_log_likelihood", "elbo_masks", "mc_elbo_terms", "one_step_log_likelihood", "qa_pairs",
    "score_pairs",
]
