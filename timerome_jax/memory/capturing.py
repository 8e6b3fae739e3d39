"""Capture of memory entries (keys and deltas) over denoising states, and key statistics of retain text.

`capture` is the one function that captures keys and deltas (DESIGN.md §3). For each fact and
each chosen denoising state it reads, at the coordinate's site (layer ℓ*, module m*):

* the key k: the site's key (`ports.sites`) at the last subject token ("last", the paper's) or at
  every subject token ("subject": one entry each) in the clean forward of that state;
* the delta δ: mean over R noise draws of (value_corrupted − value_clean) at the same places,
  where the corrupted forward adds the tracer's noise ν σ to the subject's input embeddings.

The states are the tracer's (its teacher-forced clean trajectory with the coordinate's K steps, at
`steps`; the state at step k has about k/K of the answer revealed) and, with a `SamplerCapture`,
the unedited greedy sampler's (prompt + G masks, its own proposals revealed block by block, before
each of the capture's sampler steps). A fact's noise draws are the tracer's for its row
(`tracing.noise_draws`), whatever the state, so a trace and a memory built with the same key see
the same noise. Entries come back fact-major: a fact's tracer steps in order, then its sampler
steps, each by subject position.

Why every subject token can matter: the last subject token alone carries only part of what the
corruption removes; the earlier subject tokens stay clean and later layers read the name from
them. Why sampler states: with bidirectional attention a subject's keys depend on what the answer
region holds, and the sampler's answer region differs from the tracer's (docs/memory.md).

Retain statistics (`retain_whitening`, `retain_gate`) read the site's keys at every token of retain
facts at five reveal levels of their answers, the states a memory meets while the model denoises.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ports import Backbone, Site
from timerome_jax import distributed, sampler
from timerome_jax.errors import InputError
from timerome_jax.facts import Fact, FactBatch
from timerome_jax.likelihood import bucket_length
from timerome_jax.memory import ridge
from timerome_jax.memory.spec import KEY_POSITIONS, SamplerCapture
from timerome_jax.tokenization import pad_left
from timerome_jax.tracing import Coordinate, clean_run, noise_draws, noise_edit, subject_embedding_std

Array = jax.Array


class Entries(NamedTuple):
    """Memory entries, fact-major: keys [E, I], deltas [E, D], and the row (fact) of each [E]."""

    keys: np.ndarray
    deltas: np.ndarray
    rows: np.ndarray


def _keys_and_deltas(backbone: Backbone, states_FT, attention_FT, pos_FS, valid_FS, fact_index_F, sigma, key,
                     layer, *, module: str, noise_samples: int, noise_scale: float, positions: str):
    """Keys [F, (S,) I] and deltas [F, (S,) D] of each fact in one denoising state (module doc)."""
    S = pos_FS.shape[1]
    noise = noise_draws(key, fact_index_F, noise_samples, (S, backbone.config.d_model)) * (noise_scale * sigma)
    site = Site(layer, module)

    def one_fact(state_T, am_T, pos_S, valid_S, noise_RSD):
        _, (clean,) = backbone.apply(state_T[None], am_T[None], capture=(site,))

        def corrupted(noise_SD):
            _, (run,) = backbone.apply(state_T[None], am_T[None], capture=(site,),
                                       edits=(noise_edit(pos_S, valid_S, noise_SD),))
            return run.value[0][pos_S]

        delta_SD = jnp.mean(jax.vmap(corrupted)(noise_RSD), axis=0) - clean.value[0][pos_S]
        key_SI = clean.key[0][pos_S]
        if positions == "subject":
            return key_SI, delta_SD
        last = jnp.sum(valid_S) - 1
        return key_SI[last], delta_SD[last]

    return jax.vmap(one_fact)(states_FT, attention_FT, pos_FS, valid_FS, noise)


_STATIC = ("module", "noise_samples", "noise_scale", "positions")


@functools.partial(jax.jit, static_argnames=_STATIC + ("trace_steps", "steps"))
def _at_tracer_states(backbone: Backbone, batch: FactBatch, sigma, key, layer, *, trace_steps: int,
                      steps: tuple[int, ...], **static):
    """Keys and deltas at `steps` of the teacher-forced trajectory: [F, len(steps), (S,) ·]."""
    states = jax.vmap(lambda ids, am, ans, pos: clean_run(backbone, ids, am, ans, pos, trace_steps,
                                                          upto=max(steps) + 1)[0])(
        batch.input_ids_FT, batch.attention_mask_FT, batch.answer_mask_FT, batch.subject_pos_FS)
    out = [_keys_and_deltas(backbone, states[:, k], batch.attention_mask_FT, batch.subject_pos_FS,
                            batch.subject_valid_FS, batch.fact_index_F, sigma, key, layer, **static) for k in steps]
    return tuple(jnp.stack(x, axis=1) for x in zip(*out))


@functools.partial(jax.jit, static_argnames=_STATIC)
def _at_states(backbone: Backbone, rows, sigma, key, layer, **static):
    """Keys and deltas in given states: rows = (states [F, T], attention, positions, valid, fact index)."""
    return _keys_and_deltas(backbone, *rows, sigma, key, layer, **static)


def _sampler_chunk(backbone: Backbone, batch: FactBatch, *, capture: SamplerCapture, prompt_length: int,
                   mentions: bool):
    return sampler_states(backbone, batch, capture, prompt_length=prompt_length, mentions=mentions)


def sampler_states(backbone: Backbone, batch: FactBatch, capture: SamplerCapture, *, prompt_length: int | None = None,
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
    prompt_len_F = batch.prompt_lengths()
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


def capture(backbone: Backbone, batch: FactBatch, coordinate: Coordinate, key: Array, *,
            steps: Sequence[int] | None = None, positions: str = "last", sampler_capture: SamplerCapture | None = None,
            noise_samples: int = 10, noise_scale: float = 3.0, facts_per_chunk: int = 4,
            mesh=None) -> Entries:
    """The memory entries of every fact of `batch` at the coordinate (module docstring).

    steps: steps of the coordinate's K-step trajectory (default (k*,)); positions: "last" or
    "subject"; sampler_capture: also the greedy sampler's states (its schedule and steps);
    noise_samples, noise_scale: R and ν of the deltas. `facts_per_chunk` facts per call (per data
    shard on a `mesh`). σ is the subject-embedding std of the whole batch.
    """
    if positions not in KEY_POSITIONS:
        raise InputError(f"key positions must be one of {', '.join(KEY_POSITIONS)}, got {positions!r}")
    steps = (coordinate.step,) if steps is None else tuple(int(k) for k in steps)
    if not steps or not all(0 <= k < coordinate.steps for k in steps):
        raise InputError(f"capture steps must lie in 0..{coordinate.steps - 1}, got {list(steps)}")
    sigma = subject_embedding_std(backbone, batch)
    layer = jnp.int32(coordinate.layer)
    static = dict(module=coordinate.module, noise_samples=noise_samples, noise_scale=noise_scale, positions=positions)
    run = functools.partial(distributed.map_chunks, chunk_size=facts_per_chunk, before=(backbone,),
                            after=(sigma, key, layer), mesh=mesh)
    keys, deltas = run(_at_tracer_states, batch, static={**static, "trace_steps": coordinate.steps, "steps": steps})
    F, subject = batch.num_facts, positions == "subject"
    if subject:   # [F, steps, S, ·] -> [F, steps·S, ·]
        valid = np.broadcast_to(np.asarray(batch.subject_valid_FS)[:, None], keys.shape[:3]).reshape(F, -1)
        parts = [(keys.reshape(F, -1, keys.shape[-1]), deltas.reshape(F, -1, deltas.shape[-1]), valid)]
    else:
        parts = [(keys, deltas, np.ones(keys.shape[:2], bool))]
    if sampler_capture is not None:
        states = distributed.map_chunks(_sampler_chunk, batch, chunk_size=facts_per_chunk, before=(backbone,),
                                        static=dict(capture=sampler_capture, prompt_length=int(batch.prompt_lengths().max()),
                                                    mentions=sampler_capture.mentions and subject))
        for ids, attn, pos, valid in (states[k] for k in sampler_capture.capture_steps):
            k_, d_ = run(_at_states, (ids, attn, pos, valid, np.asarray(batch.fact_index_F)), static=static)
            parts.append((k_, d_, valid) if subject else (k_[:, None], d_[:, None], np.ones((F, 1), bool)))
    keys, deltas, take = (np.concatenate([p[i] for p in parts], axis=1) for i in range(3))
    rows = np.broadcast_to(np.arange(F)[:, None], take.shape)
    return Entries(keys[take], deltas[take], rows[take])


# --- key statistics of retain text -------------------------------------------------------------------

# Fractions of the answer visible in the retain rows: from the first denoising step (all masked)
# to the last (all visible), as the sampler and the MC-ELBO's random masks see them.
RETAIN_REVEAL_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def retain_rows(backbone: Backbone, tokenizer, retain: Sequence[Fact], *, pad_id: int,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows over retain text: (ids [N, T], attention [N, T]), every real token taken.

    Each fact gives one row per level of `RETAIN_REVEAL_LEVELS`: prompt + answer with that fraction
    of the answer tokens visible (which ones: a permutation drawn from numpy's generator seeded by
    (seed, fact index)) and the rest masked. Why every token at every level: with bidirectional
    attention a prompt token's key depends on how much of the answer is visible, and the memory
    acts on every token of every denoising step. Prompt tokens of masked or partly revealed rows
    have the keys closest to the stored ones (which are captured with the answer masked); a gate
    calibrated on fully masked answer positions and fully visible rows alone let 12-19 % of those
    tokens through where it was meant to pass 1 % (docs/memory.md)."""
    if not retain:
        raise InputError("the retain statistics need retain facts (none given)")
    rows = []
    for i, fact in enumerate(retain):
        prompt_text, answer_text = fact.texts()
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
    T = bucket_length(max(len(r) for r in rows))
    ids = np.full((len(rows), T), pad_id, np.int32)
    attn = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        attn[i, :len(r)] = 1
    return ids, attn


@functools.partial(jax.jit, static_argnames=("module",))
def _token_keys(backbone: Backbone, ids_BT, attention_BT, layer, *, module: str):
    """The site's key at every token of every row [B, T, I] (float32)."""
    def one(ids_T, mask_T):
        return backbone.apply(ids_T[None], mask_T[None], capture=(Site(layer, module),))[1][0].key[0]

    return jax.vmap(one)(ids_BT, attention_BT).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("module",))
def _second_moment(backbone: Backbone, ids_BT, attention_BT, take_BT, layer, *, module: str):
    keys_BTI = jnp.where(take_BT[..., None], _token_keys(backbone, ids_BT, attention_BT, layer, module=module), 0.0)
    return jnp.einsum("bti,btj->ij", keys_BTI, keys_BTI)


@jax.jit
def _match_scores(backbone: Backbone, memory: ridge.EditMemory, ids_BT, attention_BT):
    return memory.match(_token_keys(backbone, ids_BT, attention_BT, memory.layer, module=memory.module))


def _retain_chunks(backbone, tokenizer, retain, rows_per_chunk: int, pad_id: int):
    """(ids, attention, take) chunks of `retain_rows`; filler rows are not taken."""
    ids, attn = retain_rows(backbone, tokenizer, retain, pad_id=pad_id)
    for (chunk_ids, chunk_attn), real in distributed.chunks((ids, attn), rows_per_chunk):
        take = chunk_attn.astype(bool) & (np.arange(rows_per_chunk) < real)[:, None]
        yield jnp.asarray(chunk_ids), jnp.asarray(chunk_attn), take


def retain_whitening(backbone: Backbone, tokenizer, retain: Sequence[Fact], coordinate: Coordinate, *, pad_id: int,
                     shrinkage: float = 1e-2, rows_per_chunk: int = 8) -> tuple[np.ndarray, dict]:
    """Whitening M of the covariance-regularised memory (`ridge.whitening_from_moment`) from the
    key second moment C at the coordinate's site over the tokens of `retain_rows`. (M, info)."""
    total, count = 0.0, 0
    for ids, attn, take in _retain_chunks(backbone, tokenizer, retain, rows_per_chunk, pad_id):
        moment = _second_moment(backbone, ids, attn, jnp.asarray(take), jnp.int32(coordinate.layer),
                                module=coordinate.module)
        total, count = total + np.asarray(moment, np.float64), count + int(take.sum())
    moment = total / count
    return ridge.whitening_from_moment(moment, shrinkage=shrinkage), {
        "retain_facts": len(retain), "tokens": count, "shrinkage": shrinkage,
        "mean_key_norm_sq": float(np.trace(moment))}


def retain_gate(backbone: Backbone, tokenizer, retain: Sequence[Fact], memory: ridge.EditMemory, *, pad_id: int,
                rate: float = 0.001, rows_per_chunk: int = 8) -> tuple[float, dict]:
    """Gate τ of a gated memory: the (1 − rate) quantile of `memory.match` over the retain tokens
    of `retain_rows`, so that about `rate` of them are still edited. Returns (τ, info)."""
    scores = np.concatenate([np.asarray(_match_scores(backbone, memory, ids, attn))[take]
                             for ids, attn, take in _retain_chunks(backbone, tokenizer, retain, rows_per_chunk, pad_id)])
    gate = ridge.gate_for_rate(scores, rate)
    return gate, {"retain_facts": len(retain), "tokens": int(scores.size), "rate": rate, "gate": gate,
                  "median_match": float(np.median(scores))}


__all__ = ["Entries", "RETAIN_REVEAL_LEVELS", "capture", "retain_gate", "retain_rows", "retain_whitening",
           "sampler_states"]
