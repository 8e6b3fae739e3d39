"""The method's steps as functions over a backbone: encode facts, trace them, capture keys and
deltas, build an edit memory (plain ridge or covariance-regularised), score answers.

The CLI (`timerome demo`, `edit`, `unlearn`) and the experiment scripts share these, so a number
in an experiment is computed by the same code as the command a user runs. Each function is a thin
driver over the jitted pure functions of `tracing`, `memory`, `likelihood` and `metrics`: it
chunks facts into equal shapes (one compilation per shape) and moves results to numpy.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ports import Backbone
from timerome_jax import memory as mem
from timerome_jax import metrics, pipeline, sampler, tracing
from timerome_jax.errors import InputError
from timerome_jax.facts import Fact
from timerome_jax.tokenization import pad_left, pad_token_id


@dataclasses.dataclass(frozen=True)
class EncodedFacts:
    """Facts ready for the tracer and the memory: the padded batch [F, ...], the encoded facts,
    their ids (`file:line`), the facts skipped for want of a subject, and the pad id."""

    batch: tracing.TraceBatch
    encoded: tuple[pipeline.EncodedFact, ...]
    fact_ids: tuple[str, ...]
    skipped: tuple[str, ...]
    pad_id: int

    @property
    def num_facts(self) -> int:
        return len(self.encoded)

    def take(self, index: Sequence[int]) -> "EncodedFacts":
        """The facts at these positions (a new batch, renumbered 0..len-1)."""
        chosen = [self.encoded[i] for i in index]
        if not chosen:
            raise InputError("no facts selected")
        return dataclasses.replace(self, batch=pipeline.trace_batch(chosen, self.pad_id), encoded=tuple(chosen),
                                   fact_ids=tuple(e.fact.where for e in chosen))


def encode(backbone: Backbone, tokenizer, facts: Sequence[Fact]) -> EncodedFacts:
    """Tokenise facts, locate subjects, pad into one batch (`pipeline.encode_for_tracing`)."""
    encoded, skipped = pipeline.encode_for_tracing(tokenizer, facts, backbone.config.max_seq_len)
    pad = pad_token_id(tokenizer, backbone)
    return EncodedFacts(pipeline.trace_batch(encoded, pad), tuple(encoded), tuple(e.fact.where for e in encoded),
                        tuple(skipped), pad)


@dataclasses.dataclass(frozen=True)
class Traced:
    """A TIE grid over facts and the coordinate it selects."""

    result: tracing.TraceResult   # numpy arrays, [F, K, L, M] for tie
    coordinate: tracing.Coordinate
    config: tracing.TraceConfig
    sigma: float
    seconds: float

    def best_cell_tie(self) -> float:
        c = self.coordinate
        return float(self.result.tie[:, c.step, c.layer, self.config.modules.index(c.module)].mean())

    def total_effect(self) -> float:
        """Mean clean − corrupted answer log-probability at the coordinate's step (nats)."""
        return float((self.result.clean_lp - self.result.corrupted_lp)[:, self.coordinate.step].mean())


def trace(backbone: Backbone, facts: EncodedFacts, config: tracing.TraceConfig, *, seed: int = 0,
          facts_per_chunk: int = 4, k_min: int = 0, progress: Callable | None = None) -> Traced:
    """Run the TIE grid (noise keys from `jax.random.key(seed)`) and select (ℓ*, m*, k* ≥ k_min)."""
    result, sigma, seconds = pipeline.run_grid(backbone, facts.batch, jax.random.key(seed), config,
                                               facts_per_chunk=facts_per_chunk, progress=progress)
    coordinate = tracing.select_coordinate(result.tie, config.modules, k_min=k_min)
    return Traced(result, coordinate, config, sigma, seconds)


def capture(backbone: Backbone, batch: tracing.TraceBatch, coordinate: tracing.Coordinate, key: jax.Array, *,
            noise_samples: int = 10, noise_scale: float = 3.0, facts_per_chunk: int = 4,
            positions: str = "last", mesh=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Memory entries of the facts of `batch` at the coordinate, chunk by chunk (one compilation):
    keys [E, d_k], deltas [E, d] and the fact (row of `batch`) of each entry [E], fact-major.
    positions "last": one entry per fact (the paper's); "subject": one per subject token
    (`memory.capture_keys_and_deltas`). The noise follows the tracer's for the same key. With a
    `mesh`, the facts are split over its 'data' axis, `facts_per_chunk` per shard
    (`distributed.capture_keys_and_deltas`)."""
    sigma = tracing.subject_embedding_std(backbone, batch)
    options = dict(module=coordinate.module, step=coordinate.step, trace_steps=coordinate.steps,
                   noise_samples=noise_samples, noise_scale=noise_scale, positions=positions)
    if mesh is not None:
        from timerome_jax import distributed

        k, d = distributed.capture_keys_and_deltas(backbone, batch, sigma, key, mesh, layer=coordinate.layer,
                                                   facts_per_device=facts_per_chunk, **options)
        return entries_of(batch, np.asarray(k), np.asarray(d), positions)
    size = min(facts_per_chunk, batch.num_facts)
    parts = []
    for c, chunk in enumerate(pipeline.chunks(batch, size)):
        k, d = mem.capture_keys_and_deltas(backbone, chunk, sigma, key, layer=jnp.int32(coordinate.layer), **options)
        keys, deltas, rows = entries_of(chunk, np.asarray(k), np.asarray(d), positions)
        parts.append((keys, deltas, rows + c * size))
    return tuple(np.concatenate(x) for x in zip(*parts))


def _prompt_lengths(batch: tracing.TraceBatch) -> np.ndarray:
    """Tokens before the answer of each fact of `batch` [F]."""
    return (np.asarray(batch.attention_mask_FT).astype(bool) & ~np.asarray(batch.answer_mask_FT)).sum(axis=1)


def sampler_states(backbone: Backbone, batch: tracing.TraceBatch, capture: mem.SamplerCapture, *,
                   prompt_length: int | None = None,
                   mentions: bool = False) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """The unedited greedy sampler's states of the facts of `batch` before each of `capture.capture_steps`:
    {step: (ids [F, P + G], attention [F, P + G], subject positions [F, S'], valid [F, S'])}.

    Each fact's prompt (its tokens before the answer) is left-padded to P = `prompt_length` (default
    the batch's longest prompt) as `sampler.sample_many` lays out a batch, followed by the answer
    region with the tokens revealed before that step and masks elsewhere; the subject positions
    move with the padding. With `mentions`, S' = 3 S: after the prompt's subject positions come
    the positions of the subject's copies in the sampler's answer (TOFU answers restate their
    subject: 38 of forget01's 40 do), valid from the step they are revealed on (at most 2 S)."""
    ids_FT = np.asarray(batch.input_ids_FT)
    pos_FS, valid_FS = np.asarray(batch.subject_pos_FS), np.asarray(batch.subject_valid_FS)
    prompt_len_F = _prompt_lengths(batch)
    P = int(prompt_len_F.max()) if prompt_length is None else prompt_length
    if P < prompt_len_F.max():
        raise InputError(f"prompt length {P} is shorter than the longest prompt ({prompt_len_F.max()} tokens)")
    prompts = [list(ids_FT[f, :n]) for f, n in enumerate(prompt_len_F)]
    prompt_ids, prompt_mask = pad_left(prompts, pad_id=0)   # pad ids are masked out; any id will do
    prompt_ids, prompt_mask = (np.pad(x, ((0, 0), (P - x.shape[1], 0))) for x in (prompt_ids, prompt_mask))
    answer, order = sampler.sample_jit(backbone, prompt_ids, prompt_mask, jax.random.key(0),
                                       gen_length=capture.gen_length, steps=capture.steps,
                                       block_length=capture.block_length, temperature=0.0, return_order=True)
    answer, order = np.asarray(answer), np.asarray(order)
    attn = np.concatenate([prompt_mask, np.ones_like(answer)], axis=1)
    pos = pos_FS + (P - prompt_len_F)[:, None]
    F, S = pos_FS.shape
    copy_pos = np.zeros((F, 2 * S if mentions else 0), np.int64)
    copy_step = np.full(copy_pos.shape, np.iinfo(np.int32).max)      # never valid
    for f in range(F if mentions else 0):
        subject = ids_FT[f, pos_FS[f][valid_FS[f]]]
        L, found = len(subject), []
        for i in range(capture.gen_length - L + 1):
            if (not found or i > found[-1]) and np.array_equal(answer[f, i:i + L], subject):   # no overlaps
                found.extend(range(i, i + L))
        found = found[: 2 * S]
        copy_pos[f, :len(found)] = P + np.asarray(found, np.int64)
        copy_step[f, :len(found)] = order[f, found]
    pos = np.concatenate([pos, copy_pos], axis=1).astype(np.int32)
    return {k: (np.concatenate([prompt_ids, np.where(order < k, answer, backbone.mask_token_id)], axis=1).astype(np.int32),
                attn, pos, np.concatenate([valid_FS, copy_step < k], axis=1)) for k in capture.capture_steps}


def capture_along_sampler(backbone: Backbone, batch: tracing.TraceBatch, coordinate: tracing.Coordinate,
                          capture: mem.SamplerCapture, key: jax.Array, *, noise_samples: int = 10,
                          noise_scale: float = 3.0, facts_per_chunk: int = 4,
                          positions: str = "last") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Memory entries of the facts of `batch` in the greedy sampler's states (`sampler_states`) at
    the coordinate's layer and module, one set per step of `capture`, merged fact-major like
    `capture_at_steps`' (keys [E, d_k], deltas [E, d], row of `batch` of each entry [E]).

    With positions "subject" and `capture.mentions`, the subject's revealed copies in the answer
    are subject tokens too: corrupted with the prompt's (noise drawn for all 3 S positions, so the
    prompt's draws differ from the tracer's) and each stored as an entry; with "last", only the
    prompt's last subject token. σ is the tracer's."""
    sigma = tracing.subject_embedding_std(backbone, batch)
    longest_prompt = int(_prompt_lengths(batch).max())
    mentions = capture.mentions and positions == "subject"
    size = min(facts_per_chunk, batch.num_facts)
    parts = {k: [] for k in capture.capture_steps}
    for c, chunk in enumerate(pipeline.chunks(batch, size)):
        states = sampler_states(backbone, chunk, capture, prompt_length=longest_prompt, mentions=mentions)
        for k, (ids, attn, pos, valid) in states.items():
            keys, deltas = mem.capture_at_states(
                backbone, jnp.asarray(ids), jnp.asarray(attn), jnp.asarray(pos), jnp.asarray(valid),
                chunk.fact_index_F, sigma, key, layer=jnp.int32(coordinate.layer), module=coordinate.module,
                noise_samples=noise_samples, noise_scale=noise_scale, positions=positions)
            at = dataclasses.replace(chunk, subject_valid_FS=valid)
            k_, d_, rows = entries_of(at, np.asarray(keys), np.asarray(deltas), positions)
            parts[k].append((k_, d_, rows + c * size))
    return merge_steps([tuple(np.concatenate(x) for x in zip(*parts[k])) for k in capture.capture_steps])


def entries_of(batch: tracing.TraceBatch, keys: np.ndarray, deltas: np.ndarray,
               positions: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A capture's output for `batch` ([F, ...] for "last", [F, S, ...] for "subject") as memory
    entries: (keys [E, d_k], deltas [E, d], row of `batch` of each entry [E]); filler rows and
    padded subject positions dropped, fact-major."""
    real = np.asarray(batch.fact_index_F) >= 0
    row_F = np.arange(real.shape[0])
    if positions == "last":
        return keys[real], deltas[real], row_F[real]
    take_FS = np.asarray(batch.subject_valid_FS) & real[:, None]
    return keys[take_FS], deltas[take_FS], np.broadcast_to(row_F[:, None], take_FS.shape)[take_FS]


def merge_steps(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries captured at several steps (one (keys, deltas, fact) triple per step, each fact-major)
    -> one fact-major list: a fact's entries adjacent, by step, then by position."""
    keys, deltas, facts = (np.concatenate(x) for x in zip(*parts))
    order = np.argsort(facts, kind="stable")
    return keys[order], deltas[order], facts[order]


# Fractions of the answer visible in the retain rows: from the first denoising step (all masked)
# to the last (all visible), as the sampler and the MC-ELBO's random masks see them.
RETAIN_REVEAL_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _retain_chunks(backbone: Backbone, tokenizer, retain: Sequence[Fact], rows_per_chunk: int, *, seed: int = 0):
    """Rows over retain text, in chunks (ids [B, T], attention [B, T], take [B, T] bool).

    Each fact gives one row per level of `RETAIN_REVEAL_LEVELS`: prompt + answer with that fraction
    of the answer tokens visible (which ones: a permutation drawn from numpy's generator seeded by
    (seed, fact index)) and the rest masked; every real token is taken. Why every token at every
    level: with bidirectional attention a prompt token's key depends on how much of the answer is
    visible, and the memory acts on every token of every denoising step. Prompt tokens of masked or
    partly revealed rows have the keys closest to the stored ones (which are captured with the
    answer masked); a gate calibrated on fully masked answer positions and fully visible rows alone
    let 12-19 % of those tokens through where it was meant to pass 1 % (docs/memory.md)."""
    if not retain:
        raise InputError("the retain statistics need retain facts (none given)")
    pad = pad_token_id(tokenizer, backbone)
    rows = []
    for i, fact in enumerate(retain):
        prompt_text, answer_text = pipeline.model_texts(fact)
        if answer_text is None:
            raise InputError(f"{fact.where}: a retain fact needs an answer")
        p = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        a = list(tokenizer(answer_text, add_special_tokens=False)["input_ids"])
        if len(p) + len(a) > backbone.config.max_seq_len:
            raise InputError(f"{fact.where}: prompt + answer exceed the model's maximum length")
        order = np.random.default_rng([seed, i]).permutation(len(a))
        for level in RETAIN_REVEAL_LEVELS:
            visible = np.zeros(len(a), bool)
            visible[order[:round(level * len(a))]] = True
            rows.append(p + [tok if v else backbone.mask_token_id for tok, v in zip(a, visible)])
    T = metrics.bucket_length(max(len(r) for r in rows))
    B = rows_per_chunk
    n_chunks = -(-len(rows) // B)
    ids = np.full((n_chunks * B, T), pad, np.int32)
    attn = np.zeros((n_chunks * B, T), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        attn[i, :len(r)] = 1
    take = attn.astype(bool)
    for c in range(n_chunks):
        s = slice(c * B, (c + 1) * B)
        yield jnp.asarray(ids[s]), jnp.asarray(attn[s]), take[s]


def retain_whitening(backbone: Backbone, tokenizer, retain: Sequence[Fact], coordinate: tracing.Coordinate, *,
                     shrinkage: float = 1e-2, rows_per_chunk: int = 8) -> tuple[np.ndarray, dict]:
    """Whitening M of the covariance-regularised memory (`memory.whitening_from_moment`) from
    the key second moment C at (ℓ*, m*) over the tokens of `_retain_chunks`. Returns (M, info)."""
    total, count = None, 0
    for ids, attn, take in _retain_chunks(backbone, tokenizer, retain, rows_per_chunk):
        m, n = mem.key_second_moment(backbone, ids, attn, jnp.asarray(take), layer=jnp.int32(coordinate.layer),
                                     module=coordinate.module)
        m = np.asarray(m, np.float64)
        total, count = (m if total is None else total + m), count + int(n)
    moment = total / count
    return mem.whitening_from_moment(moment, shrinkage=shrinkage), {
        "retain_facts": len(retain), "tokens": count, "shrinkage": shrinkage,
        "mean_key_norm_sq": float(np.trace(moment))}


def retain_gate(backbone: Backbone, tokenizer, retain: Sequence[Fact], memory: mem.EditMemory, *,
                rate: float = 0.001, rows_per_chunk: int = 8) -> tuple[float, dict]:
    """Gate τ of a gated memory: the (1 − rate) quantile of `memory.match` over the retain tokens
    of `_retain_chunks`, so that about `rate` of them are still edited. Returns (τ, info)."""
    scores = []
    for ids, attn, take in _retain_chunks(backbone, tokenizer, retain, rows_per_chunk):
        scores.append(np.asarray(mem.match_scores(backbone, memory, ids, attn))[take])
    scores = np.concatenate(scores)
    gate = mem.gate_for_rate(scores, rate)
    return gate, {"retain_facts": len(retain), "tokens": int(scores.size), "rate": rate, "gate": gate,
                  "median_match": float(np.median(scores))}


def build_memory(backbone: Backbone, facts: EncodedFacts, coordinate: tracing.Coordinate, *, alpha: float = 1.0,
                 lam: float = 0.1, q: int | None = None, seed: int = 0, noise_samples: int = 10,
                 noise_scale: float = 3.0, facts_per_chunk: int = 4, whitening: np.ndarray | None = None,
                 capture_steps: Sequence[int] | None = None, key_positions: str = "last",
                 sampler_capture: mem.SamplerCapture | None = None) -> mem.MemoryRecord:
    """Capture the facts at the coordinate and build one memory over all of them (noise keys from
    `jax.random.key(seed)`; see `memory_from_batch`)."""
    return memory_from_batch(backbone, facts.batch, facts.fact_ids, coordinate, jax.random.key(seed), alpha=alpha,
                             lam=lam, q=q, noise_samples=noise_samples, noise_scale=noise_scale,
                             facts_per_chunk=facts_per_chunk, whitening=whitening, capture_steps=capture_steps,
                             key_positions=key_positions, sampler_capture=sampler_capture)


def memory_from_batch(backbone: Backbone, batch: tracing.TraceBatch, fact_ids: Sequence[str],
                      coordinate: tracing.Coordinate, key: jax.Array, *, alpha: float = 1.0, lam: float = 0.1,
                      q: int | None = None, noise_samples: int = 10, noise_scale: float = 3.0,
                      facts_per_chunk: int = 4, whitening: np.ndarray | None = None,
                      capture_steps: Sequence[int] | None = None, key_positions: str = "last",
                      sampler_capture: mem.SamplerCapture | None = None) -> mem.MemoryRecord:
    """The memory of the facts of `batch` (ids `fact_ids`, one per row) at the coordinate.

    `capture_steps` (steps of the coordinate's K-step trajectory, default (k*,)): one key and
    delta per fact and step, so the memory also matches the fact's keys later in denoising, when
    part of the answer is visible. `key_positions` "subject" stores one entry per subject token
    instead of the last one only. `sampler_capture` adds each fact's entries in the greedy
    sampler's states (`capture_along_sampler`), so the memory also matches the fact's keys in a
    generation. Entries are fact-major and `fact_ids` of the record repeat per entry; `q` counts
    entries."""
    capture_steps = check_capture_steps(coordinate, capture_steps)
    mem.check_key_positions(key_positions)
    mem.check_hyperparameters(alpha, lam, None, 1)
    keys, deltas, rows = capture_at_steps(backbone, batch, coordinate, capture_steps, key,
                                          sampler_capture=sampler_capture, noise_samples=noise_samples,
                                          noise_scale=noise_scale, facts_per_chunk=facts_per_chunk,
                                          positions=key_positions)
    mem.check_hyperparameters(alpha, lam, q, len(keys))
    memory, key_scale = mem.build(keys, deltas, layer=coordinate.layer, module=coordinate.module, alpha=alpha,
                                  lam=lam, q=q, whitening=whitening)
    ids = tuple(fact_ids[r] for r in rows)
    return mem.MemoryRecord(memory, coordinate, lam, key_scale, ids, backbone.fingerprint(), capture_steps,
                            key_positions, sampler_capture)


def check_capture_steps(coordinate: tracing.Coordinate, capture_steps: Sequence[int] | None) -> tuple[int, ...]:
    steps = (coordinate.step,) if capture_steps is None else capture_steps
    return mem.check_steps(steps, coordinate.steps, "capture steps")


def capture_at_steps(backbone: Backbone, batch: tracing.TraceBatch, coordinate: tracing.Coordinate,
                     capture_steps: Sequence[int], key: jax.Array, *,
                     sampler_capture: mem.SamplerCapture | None = None, mesh=None,
                     **kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`capture` at each step (on `mesh` when given), and `capture_along_sampler` with a
    `sampler_capture`, merged fact-major (`merge_steps`): keys [E, d_k], deltas [E, d], fact (row
    of `batch`) of each entry [E]. `kwargs`: the capture options (noise, chunk size, positions)."""
    parts = [capture(backbone, batch, dataclasses.replace(coordinate, step=k), key, mesh=mesh, **kwargs)
             for k in capture_steps]
    if sampler_capture is not None:
        parts.append(capture_along_sampler(backbone, batch, coordinate, sampler_capture, key, **kwargs))
    return merge_steps(parts)


def qa_pairs(tokenizer, facts: Sequence[Fact], tag: str) -> list[metrics.Pair]:
    """(prompt, answer) token pairs in the model's text format; ids `tag/i` fix the MC keys."""
    out = []
    for i, f in enumerate(facts):
        prompt, answer = pipeline.model_texts(f)
        if answer is None:
            raise InputError(f"{f.where}: scoring needs an answer")
        out.append(metrics.Pair(f"{tag}/{i}", tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
                                tuple(tokenizer(answer, add_special_tokens=False)["input_ids"])))
    return out


def answer_lp(backbone: Backbone, pairs: Sequence[metrics.Pair], *, seeds: Sequence[int], pad_id: int,
              estimator: str = "mc_elbo", mc_samples: int = 16) -> np.ndarray:
    """Answer log-probability (nats per answer) [len(seeds), len(pairs)]. The MC masks depend on
    (seed, pair id) only, so two models scored on the same pairs see the same masks (paired)."""
    return metrics.score_pairs(backbone, pairs, list(seeds), pad_id=pad_id, estimator=estimator,
                               mc_samples=mc_samples)


def timed(fn: Callable, *args, **kwargs):
    """(fn(*args, **kwargs) with every array result ready, seconds)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


__all__ = ["EncodedFacts", "Traced", "answer_lp", "build_memory", "capture", "capture_along_sampler", "encode", "entries_of",
           "merge_steps", "qa_pairs", "sampler_states",
           "retain_whitening", "timed", "trace"]
