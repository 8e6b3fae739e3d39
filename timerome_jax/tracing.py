"""Temporal Indirect Effect (TIE): diffusion-time causal tracing as one vmapped, jitted function.

Definitions (DESIGN.md §2). For a fact (prompt with subject span S, answer y), K denoising steps
start from y fully masked:

* clean run: reveal y's positions in the clean model's confidence order (softmax probability of
  its own top proposal; ties to the earlier position; linear schedule n_k = ℓ // K, remainder to
  the first steps) but write the TRUE tokens. This fixes the states x_0..x_{K-1}. Activations of
  every (layer, module) at the subject positions are recorded at every step.
* corrupted run: same states; Gaussian noise N(0, (ν σ)^2) added to the input embeddings at S,
  one draw per run reused at every step, R draws.
* patched run (ℓ, k, m): the corrupted run, except that at step k the output of module m in the
  layers window(ℓ) is restored to its clean value at S.
* read-out: y_k(run) = Σ over answer positions still masked in x_k of log p(y_j | x_k).
  TIE(ℓ, k, m) = mean over draws of y_k(patched) − y_k(corrupted).

Propagated mode: after the patch at step k the corrupted run continues freely (each later step
reveals the model's own argmax proposals in low-confidence order) and the read-out is taken at
every k' >= k; `tie` is then the mean over k' >= k (the full [K, K'] table is returned too).

Every grid cell is one forward of a pure function; cells (fact, step, draw, layer, module) are
flattened, `jax.vmap`-ed and chunked with `jax.lax.map(batch_size=...)`. The noise and the patch
are edits (`timerome_jax.edits.RowEdit`) handed to `Backbone.apply(edits=...)`, which enters the
interception inside the traced function; the backbone has no tracing code. `trace` runs the grid
over any number of facts, chunk by chunk, on one device or a mesh (`distributed.map_chunks`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ports import MODULES, Backbone, Site
from timerome_jax import distributed
from timerome_jax.edits import RowEdit
from timerome_jax.errors import InputError
from timerome_jax.facts import FactBatch
from timerome_jax.masking import align_logits
from timerome_jax.sampler import linear_counts, select_reveals

Array = jax.Array
CLEAN_SITES = tuple(Site(None, m) for m in MODULES)   # every layer's value of every traced module


@dataclasses.dataclass(frozen=True)
class TraceConfig:
    """Static settings of a trace (hashable: one compilation per config and batch shape).

    steps: K denoising steps. noise_samples: R draws. noise_scale: ν (noise std = ν σ).
    modules: which of 'resid', 'attn', 'mlp' to patch. window: number of consecutive layers
    restored, centred on the target layer (ROME: 10 for attn/mlp, 1 for resid).
    mode: 'teacher' (read-out at the patched step) or 'propagated'.
    cells_per_batch: cells evaluated together by the vmap inside `lax.map` (bounds memory).
    share_prefix: teacher mode only — start each patched cell from the corrupted run's cached
    residual stream at its window's first layer instead of recomputing the layers below
    (same result, about half the layer work; costs a [F·K·R, L, T, D] cache per chunk).
    method: 'exact' (every cell patched), 'atp' (attribution patching: every cell estimated
    from one corrupted forward and one backward per (fact, step, draw)) or 'hybrid' (atp, then
    each fact's `confirm_top` (layer, module) columns of highest estimated step-mean TIE patched
    exactly at every step: confirm_top·K cells per fact). Teacher mode only.
    """

    steps: int = 8
    noise_samples: int = 10
    noise_scale: float = 3.0
    modules: tuple[str, ...] = MODULES
    window: int = 1
    mode: Literal["teacher", "propagated"] = "teacher"
    cells_per_batch: int = 64
    share_prefix: bool = True
    method: Literal["exact", "atp", "hybrid"] = "exact"
    confirm_top: int = 3

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.noise_samples, int) or self.noise_samples < 1:
            raise InputError(f"noise samples must be an integer >= 1, got {self.noise_samples!r}")
        if self.noise_scale < 0:
            raise InputError(f"noise scale must be >= 0, got {self.noise_scale}")
        if not self.modules or len(set(self.modules)) != len(self.modules):
            raise InputError(f"modules must be a non-empty list without repeats, got {self.modules}")
        unknown = [m for m in self.modules if m not in MODULES]
        if unknown:
            raise InputError(f"unknown module name(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
        if not isinstance(self.window, int) or self.window < 1:
            raise InputError(f"window must be an integer >= 1, got {self.window!r}")
        if self.mode not in ("teacher", "propagated"):
            raise InputError(f"unknown trace mode {self.mode!r}; choose 'teacher' or 'propagated'")
        if self.cells_per_batch < 1:
            raise InputError("cells_per_batch must be >= 1")
        if self.method not in ("exact", "atp", "hybrid"):
            raise InputError(f"unknown trace method {self.method!r}; choose 'exact', 'atp' or 'hybrid'")
        if self.method != "exact" and self.mode != "teacher":
            raise InputError(f"trace method {self.method!r} needs the teacher-forced mode (the estimate "
                             "differentiates one read-out; the propagated mode's reveals are discrete)")
        if not isinstance(self.confirm_top, int) or self.confirm_top < 1:
            raise InputError(f"confirm-top must be an integer >= 1, got {self.confirm_top!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TraceResult:
    """tie [F, K, L, M]; clean_lp [F, K]; corrupted_lp [F, K] (mean over draws);
    patched_lp [F, K, L, M] (mean over draws; corrupted_lp + tie); in propagated mode also
    tie_by_readout [F, K, K', L, M] (zero where k' < k). Methods 'atp' and 'hybrid' also give
    estimated_tie [F, K, L, M] (the attribution estimate; `tie` for 'atp'), and 'hybrid'
    confirmed [F, K, L, M] (True where `tie` is the exact value, else it is the estimate)."""

    tie: Array
    clean_lp: Array
    corrupted_lp: Array
    patched_lp: Array
    tie_by_readout: Array | None = None
    estimated_tie: Array | None = None
    confirmed: Array | None = None


# --- read-out and the teacher-forced schedule ----------------------------------------------------

def answer_readout(logits_XV: Array, true_ids_X: Array, still_masked_X: Array) -> Array:
    """Σ over rows still masked of log p(true token) — nats, float32 scalar. Rows X are
    positions (all T, or the answer's A) with their aligned logits (row i predicts token i)."""
    logp = jax.nn.log_softmax(logits_XV, axis=-1)
    token_lp = jnp.take_along_axis(logp, true_ids_X[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(still_masked_X, token_lp, 0.0))


def logit_rows(batch: FactBatch, f, logit_shift: int) -> Array:
    """The raw logit rows [A] that predict fact f's answer tokens (row p − shift predicts p; row
    0 predicts itself, as `align_logits` does)."""
    return jnp.maximum(batch.answer_pos_FA[f] - logit_shift, 0)


def readout_at_answer(logits_AV: Array, batch: FactBatch, f, still_masked_T: Array) -> Array:
    """`answer_readout` from logits at fact f's `logit_rows` only ([A, V])."""
    pos = batch.answer_pos_FA[f]
    return answer_readout(logits_AV, batch.input_ids_FT[f][pos], still_masked_T[pos] & batch.answer_valid_FA[f])


def _reveal(confidence_T: Array, still_masked_T: Array, count: Array) -> Array:
    """The `count` most confident still-masked positions (ties: the earlier position)."""
    return select_reveals(confidence_T[None], still_masked_T[None], count)[0]


def _proposals(logits_TV: Array, logit_shift: int) -> tuple[Array, Array]:
    """(argmax token, its softmax probability) per position, with the backbone's shift applied."""
    probs = jax.nn.softmax(align_logits(logits_TV[None], logit_shift)[0], axis=-1)
    return jnp.argmax(probs, axis=-1), jnp.max(probs, axis=-1)


# --- the edits of one run ----------------------------------------------------------------------------

def noise_edit(pos_S: Array, valid_S: Array, noise_SD: Array) -> RowEdit:
    """The corruption: Gaussian noise added to the input embeddings at the subject positions."""
    return RowEdit(Site(None, "embed"), pos_S, valid_S, noise_SD, add=True)


def patch_edits(clean_LMSD: Array, pos_S: Array, valid_S: Array, centre: Array, module_index: Array,
                window: int) -> tuple[RowEdit, ...]:
    """The patch: module `MODULES[module_index]` of the `window` layers centred on `centre`
    restored to its clean value at the subject positions (centre -1: no patch). One edit per
    (module, layer of the window) whose site is inactive (layer -1) unless it is the patched
    module, so the module index is data and cells over modules vmap together."""
    L = clean_LMSD.shape[0]
    out = []
    for mi, module in enumerate(MODULES):
        for w in range(window):
            layer = centre - window // 2 + w
            active = (centre >= 0) & (module_index == mi)
            rows = clean_LMSD[jnp.clip(layer, 0, L - 1), mi]
            out.append(RowEdit(Site(jnp.where(active, layer, -1).astype(jnp.int32), module), pos_S, valid_S, rows))
    return tuple(out)


# --- the three runs -------------------------------------------------------------------------------

def clean_run(backbone: Backbone, ids_T: Array, mask_T: Array, answer_T: Array, pos_S: Array,
              steps: int, upto: int | None = None):
    """Teacher-forced clean trajectory of one fact.

    Returns states_KT (ids fed at each step), masked_KT (answer positions still masked at each
    step), clean_KLMSD (activations of MODULES at the subject positions), clean_lp_K. With
    `upto`, only the first `upto` steps of the `steps`-step trajectory run (K = upto above).
    """
    mask_id = backbone.mask_token_id
    answer = answer_T.astype(bool)
    counts = linear_counts(jnp.sum(answer), steps)[:upto]
    shift = backbone.config.logit_shift

    def step(carry, count):
        cur_ids, masked = carry
        logits, captured = backbone.apply(cur_ids[None], mask_T[None], capture=CLEAN_SITES)
        lp = answer_readout(align_logits(logits, shift)[0], ids_T, masked)
        _, confidence = _proposals(logits[0], shift)
        reveal = _reveal(confidence, masked, count)
        stacked = jnp.stack([c.value[:, 0] for c in captured], axis=1)  # [L, M, T, D]
        record = (cur_ids, masked, stacked[:, :, pos_S].astype(jnp.float32), lp)
        return (jnp.where(reveal, ids_T, cur_ids), masked & ~reveal), record

    start = (jnp.where(answer, mask_id, ids_T), answer)
    _, (states, masked, clean, lp) = jax.lax.scan(step, start, counts)
    return states, masked, clean, lp


def _propagate(backbone: Backbone, true_ids_T, mask_T, state_ids_T, masked_T, counts_K, start_step,
               noise: RowEdit, patch: Callable[[Array], tuple], steps: int) -> Array:
    """From state x_k, run steps k..K-1: the patch acts at step k only, noise at every step;
    each step reveals the model's own proposals. Returns read-outs [K'] (0 for k' < k)."""
    shift = backbone.config.logit_shift

    def step(carry, k_prime):
        cur, masked = carry
        active = k_prime >= start_step
        logits = backbone.apply(cur[None], mask_T[None], edits=(noise, *patch(k_prime == start_step)))[0]
        lp = answer_readout(align_logits(logits[None], shift)[0], true_ids_T, masked)
        proposal, confidence = _proposals(logits, shift)
        reveal = _reveal(confidence, masked, counts_K[k_prime]) & active
        return (jnp.where(reveal, proposal, cur), masked & ~reveal), jnp.where(active, lp, 0.0)

    _, lps = jax.lax.scan(step, (state_ids_T, masked_T), jnp.arange(steps))
    return lps


def subject_embedding_std(backbone: Backbone, batch: FactBatch) -> Array:
    """σ: std of the embedding coordinates of every subject token of the fact set (ROME's s)."""
    ids = jnp.take_along_axis(batch.input_ids_FT, batch.subject_pos_FS, axis=1)
    vectors = backbone.embedding_table()[ids].astype(jnp.float32)  # [F, S, D]
    valid = (batch.subject_valid_FS & (batch.fact_index_F[:, None] >= 0))[..., None]
    n = jnp.maximum(jnp.sum(valid) * vectors.shape[-1], 1)
    mean = jnp.sum(jnp.where(valid, vectors, 0.0)) / n
    return jnp.sqrt(jnp.sum(jnp.where(valid, (vectors - mean) ** 2, 0.0)) / n)


def noise_draws(key: Array, fact_index_F: Array, draws: int, shape_SD: tuple[int, int]) -> Array:
    """Standard-normal draws [F, R, S, D]; fact f, draw r uses fold_in(fold_in(key, f), r), so a
    fact's noise does not depend on how facts are chunked."""
    def one(f, r):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, f), r), shape_SD)
    return jax.vmap(lambda f: jax.vmap(lambda r: one(f, r))(jnp.arange(draws)))(fact_index_F)


@functools.partial(jax.jit, static_argnames=("config",))
def tie_grid(backbone: Backbone, batch: FactBatch, sigma: Array, key: Array,
             config: TraceConfig = TraceConfig()) -> TraceResult:
    """The whole TIE grid for a batch of facts: [F, K, L, M] plus clean/corrupted read-outs.

    Pure and jitted once per (batch shape, config). `sigma` is the subject-embedding std of the
    fact set (`subject_embedding_std`), passed in so that chunks of one set share it. Cells are
    vmapped in chunks of `config.cells_per_batch` with `jax.lax.map`. `config.method` chooses
    the exact grid, its attribution-patching estimate, or both (docs/tracing.md).
    """
    K, R, W = config.steps, config.noise_samples, config.window
    L, D = backbone.config.n_layers, backbone.config.d_model
    module_index = jnp.asarray([MODULES.index(m) for m in config.modules], jnp.int32)
    M = len(config.modules)
    F, S = batch.subject_pos_FS.shape

    states, masked, clean, clean_lp = jax.vmap(
        lambda ids, am, ans, pos: clean_run(backbone, ids, am, ans, pos, K)
    )(batch.input_ids_FT, batch.attention_mask_FT, batch.answer_mask_FT, batch.subject_pos_FS)
    # states/masked [F, K, T]; clean [F, K, L, 3, S, D]; clean_lp [F, K]
    noise = noise_draws(key, batch.fact_index_F, R, (S, D)) * (config.noise_scale * sigma)

    def edits(f, k, r, layer, module, patched=True):
        pos, valid = batch.subject_pos_FS[f], batch.subject_valid_FS[f]
        centre = jnp.where(patched, layer, -1)
        return noise_edit(pos, valid, noise[f, r]), patch_edits(clean[f, k], pos, valid, centre, module, W)

    runs = _Runs(states, masked, clean, clean_lp, edits, module_index)
    if config.mode == "teacher" and (config.share_prefix or config.method != "exact"):
        return _teacher_grid(backbone, batch, config, runs)

    counts = jax.vmap(lambda a: linear_counts(jnp.sum(a), K))(batch.answer_mask_FT.astype(jnp.int32))
    shift = backbone.config.logit_shift

    def run_cell(f, k, r, layer, module):
        ids, am = states[f, k], batch.attention_mask_FT[f]
        if config.mode == "teacher":
            noised, patch = edits(f, k, r, layer, module)
            logits = backbone.apply(ids[None], am[None], edits=(noised, *patch),
                                    logit_rows_BA=logit_rows(batch, f, shift)[None])[0]
            return readout_at_answer(logits, batch, f, masked[f, k])
        noised, _ = edits(f, k, r, layer, module)
        return _propagate(backbone, batch.input_ids_FT[f], am, ids, masked[f, k], counts[f], k, noised,
                          lambda now: edits(f, k, r, layer, module, now)[1], K)

    def grid_over(cells):  # cells: tuple of int32 [N] index arrays
        return jax.lax.map(lambda c: run_cell(*c), cells, batch_size=config.cells_per_batch)

    # corrupted run: every (f, k, r) with no patch (layer -1)
    f_i, k_i, r_i = (a.reshape(-1) for a in jnp.meshgrid(jnp.arange(F), jnp.arange(K), jnp.arange(R), indexing="ij"))
    minus_one = jnp.full_like(f_i, -1)
    corrupted = grid_over((f_i, k_i, r_i, minus_one, jnp.zeros_like(f_i)))
    corrupted = corrupted.reshape((F, K, R) + corrupted.shape[1:])

    grid_idx = jnp.meshgrid(jnp.arange(F), jnp.arange(K), jnp.arange(R), jnp.arange(L), jnp.arange(M), indexing="ij")
    f_i, k_i, r_i, l_i, m_i = (a.reshape(-1) for a in grid_idx)
    patched = grid_over((f_i, k_i, r_i, l_i, module_index[m_i]))
    patched = patched.reshape((F, K, R, L, M) + patched.shape[1:])

    if config.mode == "teacher":
        effect = patched - corrupted[:, :, :, None, None]
        return TraceResult(tie=effect.mean(axis=2), clean_lp=clean_lp, corrupted_lp=corrupted.mean(axis=2),
                           patched_lp=patched.mean(axis=2))
    # propagated: trailing axis K' of read-outs; summarise by the mean over k' >= k
    effect = (patched - corrupted[:, :, :, None, None]).mean(axis=2)  # [F, K, L, M, K']
    later = (jnp.arange(K)[None, :] >= jnp.arange(K)[:, None]).astype(jnp.float32)  # [K, K']
    tie = jnp.sum(effect * later[None, :, None, None, :], axis=-1) / later.sum(-1)[None, :, None, None]
    corrupted_at_k = jnp.take_along_axis(corrupted.mean(axis=2), jnp.arange(K)[None, :, None], axis=-1)[..., 0]
    patched_at_k = jnp.take_along_axis(patched.mean(axis=2), jnp.arange(K)[None, :, None, None, None], axis=-1)[..., 0]
    return TraceResult(tie=tie, clean_lp=clean_lp, corrupted_lp=corrupted_at_k, patched_lp=patched_at_k,
                       tie_by_readout=jnp.moveaxis(effect, -1, 2))


class _Runs(NamedTuple):
    """What every teacher-forced cell shares: the clean trajectory (states_FKT, masked_FKT,
    clean_FKLMSD over all MODULES, clean_lp_FK), `edits(f, k, r, layer, module)` -> (noise,
    patch), and the traced modules' indices into MODULES."""

    states: Array
    masked: Array
    clean: Array
    clean_lp: Array
    edits: Callable
    module_index: Array


def _teacher_grid(backbone: Backbone, batch: FactBatch, config: TraceConfig, runs: _Runs) -> TraceResult:
    """The teacher-forced grid by `config.method`.

    One corrupted forward per (fact, step, draw) keeps the residual stream entering every layer;
    with 'atp'/'hybrid' it is also differentiated (one backward) for the attribution estimate of
    every cell. 'exact' then runs every patched cell from that cache (`_patched_readouts`);
    'hybrid' runs only the cells of each fact's `confirm_top` best-estimated columns.
    """
    K, R = config.steps, config.noise_samples
    L, M, F = backbone.config.n_layers, len(config.modules), batch.num_facts
    f_i, k_i, r_i = (a.reshape(-1) for a in jnp.meshgrid(jnp.arange(F), jnp.arange(K), jnp.arange(R), indexing="ij"))
    gradient = config.method != "exact"
    corrupted, entering, estimate = jax.lax.map(
        lambda c: _corrupted_cell(backbone, batch, config, runs, *c, gradient=gradient), (f_i, k_i, r_i),
        batch_size=config.cells_per_batch)
    corrupted = corrupted.reshape(F, K, R)
    corrupted_lp = corrupted.mean(axis=2)
    if config.method == "atp":
        tie = estimate.reshape(F, K, R, L, M).mean(axis=2)
        return TraceResult(tie=tie, clean_lp=runs.clean_lp, corrupted_lp=corrupted_lp,
                           patched_lp=corrupted_lp[..., None, None] + tie, estimated_tie=tie)
    if config.method == "exact":   # every cell, layer-major so that a batch of cells shares its layers
        l_i, frk_i, m_i = (a.reshape(-1) for a in jnp.meshgrid(jnp.arange(L), jnp.arange(F * K * R), jnp.arange(M),
                                                               indexing="ij"))
        patched = _patched_readouts(backbone, batch, config, runs, entering, (f_i, k_i, r_i), frk_i, l_i, m_i)
        patched = patched.reshape(L, F, K, R, M).transpose(1, 2, 3, 0, 4)  # [F, K, R, L, M]
        effect = patched - corrupted[:, :, :, None, None]
        return TraceResult(tie=effect.mean(axis=2), clean_lp=runs.clean_lp, corrupted_lp=corrupted_lp,
                           patched_lp=patched.mean(axis=2))
    # hybrid: each fact's `confirm_top` best-estimated (layer, module) columns, patched exactly at
    # every step and draw (the coordinate rule picks a column by its step-mean, then a step)
    estimated = estimate.reshape(F, K, R, L, M).mean(axis=2)
    N = min(config.confirm_top, L * M)
    _, top_FN = jax.lax.top_k(estimated.mean(axis=1).reshape(F, L * M), N)
    l_FN, m_FN = jnp.unravel_index(top_FN, (L, M))
    f_c, n_c, k_c, r_c = (a.reshape(-1) for a in jnp.meshgrid(jnp.arange(F), jnp.arange(N), jnp.arange(K),
                                                               jnp.arange(R), indexing="ij"))
    l_c, m_c = l_FN[f_c, n_c], m_FN[f_c, n_c]
    order = jnp.argsort(l_c, stable=True)           # group cells by layer (see _patched_readouts)
    frk_c = (f_c * K + k_c) * R + r_c
    patched = _patched_readouts(backbone, batch, config, runs, entering, (f_i, k_i, r_i),
                                frk_c[order], l_c[order], m_c[order])
    patched = jnp.zeros_like(patched).at[order].set(patched).reshape(F, N, K, R).mean(axis=3)   # [F, N, K]
    fact, step = jnp.arange(F)[:, None, None], jnp.arange(K)[None, None, :]
    layer, module = l_FN[:, :, None], m_FN[:, :, None]
    confirmed = jnp.zeros((F, K, L, M), bool).at[fact, step, layer, module].set(True)
    exact = jnp.zeros((F, K, L, M)).at[fact, step, layer, module].set(patched - corrupted_lp[:, None, :])
    tie = jnp.where(confirmed, exact, estimated)
    return TraceResult(tie=tie, clean_lp=runs.clean_lp, corrupted_lp=corrupted_lp,
                       patched_lp=corrupted_lp[..., None, None] + tie, estimated_tie=estimated, confirmed=confirmed)


def _corrupted_cell(backbone: Backbone, batch: FactBatch, config: TraceConfig, runs: _Runs, f, k, r, *,
                    gradient: bool):
    """The corrupted forward of (fact f, step k, draw r): (read-out, residual stream entering
    every layer [L, T, D], attribution estimate [L, M] of every cell (zeros without `gradient`)).

    Attribution patching: every traced site (layer l, module m) gets a zero perturbation δ added
    at the subject positions; the estimate of patching it is Σ_{s,d} (clean − corrupted)·∂y/∂δ at
    δ = 0, the first-order Taylor term of the patched read-out. A window of W layers sums its
    layers' terms (the first-order term of restoring them together)."""
    L, W = backbone.config.n_layers, config.window
    M = len(config.modules)
    pos, valid = batch.subject_pos_FS[f], batch.subject_valid_FS[f]
    noised, _ = runs.edits(f, k, r, jnp.int32(-1), jnp.int32(0), patched=False)
    sites = (Site(None, "embed"), Site(None, "resid")) + tuple(Site(None, m) for m in config.modules if m != "resid")
    rows = logit_rows(batch, f, backbone.config.logit_shift)

    def forward(delta_LMSD):
        perturb = tuple(RowEdit(Site(jnp.int32(layer), m), pos, valid, delta_LMSD[layer, j], add=True)
                        for layer in range(L) for j, m in enumerate(config.modules)) if gradient else ()
        logits, captured = backbone.apply(runs.states[f, k][None], batch.attention_mask_FT[f][None], capture=sites,
                                          edits=(noised, *perturb), logit_rows_BA=rows[None])
        values = {site.module: c.value for site, c in zip(sites, captured)}
        entering = jnp.concatenate([values["embed"], values["resid"][:-1, 0]], axis=0)  # [L, T, D]
        corrupted_LMSD = jnp.stack([values[m][:, 0][:, pos] for m in config.modules], axis=1).astype(jnp.float32)
        return readout_at_answer(logits[0], batch, f, runs.masked[f, k]), (corrupted_LMSD, entering)

    if not gradient:
        lp, (_, entering) = forward(None)      # no perturbations: nothing to differentiate
        return lp, entering, jnp.zeros((L, M), jnp.float32)
    lp, entering, single_LM = attribution_patching(forward, runs.clean[f, k][:, runs.module_index], valid)
    window = jnp.arange(L)[:, None] - W // 2 + jnp.arange(W)[None, :]       # [L, W] layers restored
    inside = (window >= 0) & (window < L)
    estimate = jnp.sum(jnp.where(inside[..., None], single_LM[jnp.clip(window, 0, L - 1)], 0.0), axis=1)
    return lp, entering, estimate


def attribution_patching(forward: Callable, clean_XSD: Array, valid_S: Array):
    """Attribution patching (Nanda 2023; Kramár et al. 2024) of sites X at once.

    `forward(delta_XSD)` runs the corrupted model with `delta_XSD[x]` added to site x's value at
    S positions and returns (read-out y, (corrupted values [X, S, D] it saw, aux)). The estimate
    of restoring site x to `clean_XSD[x]` is Σ_{s valid, d} (clean − corrupted)·∂y/∂δ at δ = 0:
    exact for a read-out linear in the site, its first-order Taylor term otherwise. One forward
    and one backward give every site's estimate. Returns (y, aux, estimate [X])."""
    delta = jnp.zeros(clean_XSD.shape, jnp.float32)
    (y, (corrupted_XSD, aux)), grad_XSD = jax.value_and_grad(forward, has_aux=True)(delta)
    terms = jnp.where(valid_S[:, None], (clean_XSD - corrupted_XSD) * grad_XSD, 0.0)
    return y, aux, jnp.sum(terms, axis=(-2, -1))


def _patched_readouts(backbone: Backbone, batch: FactBatch, config: TraceConfig, runs: _Runs, entering, frk,
                      frk_N: Array, layer_N: Array, m_N: Array) -> Array:
    """Read-outs [N] of patched cells (corrupted run `frk_N` = index into (f, k, r) = `frk`;
    patch at `layer_N`, module `config.modules[m_N]`), each started from the corrupted run's
    cached stream, so layers below its window are never recomputed.

    Cells run `cells_per_batch` at a time; a batch runs layers lo..L-1, lo = its lowest window
    start (one scalar, so every cell of the batch uses the same weights at each layer; a cell
    starting higher repeats its unpatched corrupted layers). Callers order cells by layer, which
    makes lo the window start of nearly every cell: the layer work is Σ (L − start) per cell.
    """
    N = frk_N.shape[0]
    L, W, B = backbone.config.n_layers, config.window, min(config.cells_per_batch, N)
    pad = (-N) % B
    cells = tuple(jnp.concatenate([x, jnp.repeat(x[-1:], pad)]).reshape(-1, B) for x in (frk_N, layer_N, m_N))
    f_all, k_all, r_all = frk
    shift = backbone.config.logit_shift

    def one_batch(c):
        idx_B, layer_B, m_B = c
        f_B, k_B, r_B = f_all[idx_B], k_all[idx_B], r_all[idx_B]
        lo = jnp.min(jnp.maximum(layer_B - W // 2, 0))
        patch_B = jax.vmap(lambda f, k, r, layer, m: runs.edits(f, k, r, layer, runs.module_index[m])[1])(
            f_B, k_B, r_B, layer_B, m_B)
        mask_B = batch.attention_mask_FT[f_B]

        def layer_step(j, x_BTD):
            return jax.vmap(lambda x, patch, mask: backbone.layer(x[None], j, mask[None], edits=patch)[0])(
                x_BTD, patch_B, mask_B)

        x_BTD = jax.lax.fori_loop(lo, L, layer_step, jax.vmap(lambda i: jax.lax.dynamic_index_in_dim(
            entering[i], lo, keepdims=False))(idx_B))

        def readout(x_TD, f, k):
            return readout_at_answer(backbone.head(x_TD[logit_rows(batch, f, shift)][None])[0], batch, f, runs.masked[f, k])

        return jax.vmap(readout)(x_BTD, f_B, k_B)

    return jax.lax.map(one_batch, cells).reshape(-1)[:N]


# --- coordinate selection -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Coordinate:
    """(ℓ*, k*, m*) and the number of steps K of the trajectory that k* indexes: the state at
    step k* of a K-step teacher-forced run has about k*/K of the answer revealed, so capturing
    keys needs K as well as k*."""

    layer: int
    step: int
    module: str
    steps: int = 8

    def __post_init__(self):
        if self.module not in MODULES:
            raise InputError(f"unknown module {self.module!r}; choose from {', '.join(MODULES)}")
        if not 0 <= self.step < self.steps:
            raise InputError(f"step {self.step} is outside 0..{self.steps - 1} (a {self.steps}-step trajectory)")

    @property
    def site(self) -> Site:
        return Site(jnp.int32(self.layer), self.module)

    def as_dict(self) -> dict:
        return {"layer": self.layer, "step": self.step, "module": self.module, "steps": self.steps}

    @classmethod
    def parse(cls, text: str, n_layers: int, steps: int = 8) -> "Coordinate":
        """LAYER,MODULE,STEP of a `steps`-step trajectory (the trace's K), e.g. '3,mlp,1'."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 3:
            raise InputError(f"--coordinate must be LAYER,MODULE,STEP, got {text!r}")
        try:
            layer, step = int(parts[0]), int(parts[2])
        except ValueError:
            raise InputError(f"--coordinate must be LAYER,MODULE,STEP with integers, got {text!r}") from None
        if parts[1] not in MODULES:
            raise InputError(f"unknown module {parts[1]!r} in --coordinate; choose from {', '.join(MODULES)}")
        if not 0 <= layer < n_layers:
            raise InputError(f"layer {layer} is outside 0..{n_layers - 1}")
        if not 0 <= step < steps:
            raise InputError(f"step {step} is outside 0..{steps - 1} (K = --steps {steps})")
        return cls(layer, step, parts[1], steps)

    @classmethod
    def from_trace(cls, trace_dir: str | Path, n_layers: int) -> "Coordinate":
        """The coordinate a `timerome trace` run selected (its summary.json)."""
        path = Path(trace_dir) / "summary.json"
        try:
            summary = json.loads(path.read_text())
            c = summary["coordinate"]
            steps = int(c.get("steps", summary.get("config", {}).get("steps", 8)))
            return cls.parse(f"{c['layer']},{c['module']},{c['step']}", n_layers, steps)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"cannot read a coordinate from {path}: {e}") from None


CAP_MARGIN = 1e-6   # nats: an unconfirmed hybrid cell stays strictly below every confirmed column


def selection_grid(result: TraceResult) -> np.ndarray:
    """The grid a coordinate is chosen from: `tie`, except in a hybrid trace, where a cell the
    exact grid did not confirm is capped below its fact's lowest confirmed column mean, so that
    it cannot outrank a confirmed column (the estimate ranked it lower; its value is unchecked)."""
    tie = np.asarray(result.tie, np.float64)
    if result.confirmed is None:
        return tie
    confirmed = np.asarray(result.confirmed)
    columns = np.where(confirmed, tie, 0.0).sum(axis=1) / np.maximum(confirmed.sum(axis=1), 1)   # [F, L, M]
    floor = np.where(confirmed.any(axis=1), columns, np.inf).min(axis=(1, 2))[:, None, None, None] - CAP_MARGIN
    return np.where(confirmed, tie, np.minimum(np.asarray(result.estimated_tie, np.float64), floor))


def select_coordinate(tie_FKLM: np.ndarray, modules: tuple[str, ...], k_min: int = 0) -> Coordinate:
    """(ℓ*, m*) = argmax over (layer, module) of TIE averaged over facts and steps k >= k_min;
    k* = argmax over steps k >= k_min at (ℓ*, m*) (averaged over facts)."""
    tie = np.asarray(tie_FKLM, np.float64)
    K = tie.shape[1]
    if not 0 <= k_min < K:
        raise InputError(f"k_min must lie in 0..{K - 1}, got {k_min}")
    mean_KLM = tie.mean(axis=0)
    layer, module = np.unravel_index(np.argmax(mean_KLM[k_min:].mean(axis=0)), mean_KLM.shape[1:])
    step = k_min + int(np.argmax(mean_KLM[k_min:, layer, module]))
    return Coordinate(int(layer), step, modules[int(module)], K)


def per_fact_coordinates(tie_FKLM: np.ndarray, modules: tuple[str, ...], k_min: int = 0) -> list[Coordinate]:
    return [select_coordinate(t[None], modules, k_min) for t in np.asarray(tie_FKLM)]


# --- comparing a method with the exact grid --------------------------------------------------------

def rank_agreement(exact_FKLM: np.ndarray, estimate_FKLM: np.ndarray, modules) -> dict:
    """Per-fact Spearman of the estimate vs the exact grid (per module, over K·L cells; and over
    all cells), and top-1 / top-5 cell agreement."""
    from scipy.stats import spearmanr   # scipy is a dependency already (evaluation)

    def rho(a, b):
        value = spearmanr(a.ravel(), b.ravel())[0]
        return float(value) if np.isfinite(value) else None

    F = exact_FKLM.shape[0]
    out = {"facts": F}
    for mi, module in enumerate(modules):
        values = [rho(exact_FKLM[f, ..., mi], estimate_FKLM[f, ..., mi]) for f in range(F)]
        values = [v for v in values if v is not None]
        out[f"spearman_{module}"] = float(np.mean(values)) if values else None
    out["spearman_all_cells"] = float(np.mean([rho(exact_FKLM[f], estimate_FKLM[f]) for f in range(F)]))
    flat_e, flat_a = exact_FKLM.reshape(F, -1), estimate_FKLM.reshape(F, -1)
    out["top1"] = float(np.mean(flat_e.argmax(1) == flat_a.argmax(1)))
    top5 = [len(set(np.argsort(-flat_e[f])[:5]) & set(np.argsort(-flat_a[f])[:5])) / 5 for f in range(F)]
    out["top5_overlap"] = float(np.mean(top5))
    return out


def coordinate_agreement(exact: list[Coordinate], other: list[Coordinate], exact_FKLM, modules,
                         tolerance: float = 0.01) -> dict:
    """Share of facts whose coordinate equals the exact one, and share whose coordinate's exact TIE
    is within `tolerance` (relative, plus 0.001 nats) of the exact best: ties between cells that
    restore the whole effect make the strict match depend on rounding."""
    def value(f, c):
        return float(exact_FKLM[f, c.step, c.layer, modules.index(c.module)])

    same = [a == b for a, b in zip(exact, other)]
    near = [value(f, b) >= value(f, a) - tolerance * abs(value(f, a)) - 1e-3 for f, (a, b) in enumerate(zip(exact, other))]
    return {"same_coordinate": float(np.mean(same)), f"within_{tolerance:.0%}_of_exact_best": float(np.mean(near))}


# --- tracing a fact set -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Traced:
    """A TIE grid over facts (numpy, [F, K, L, M] for tie) and the coordinate it selects."""

    result: TraceResult
    coordinate: Coordinate
    config: TraceConfig
    sigma: float
    seconds: float

    def best_cell_tie(self) -> float:
        c = self.coordinate
        return float(self.result.tie[:, c.step, c.layer, self.config.modules.index(c.module)].mean())

    def total_effect(self) -> float:
        """Mean clean − corrupted answer log-probability at the coordinate's step (nats)."""
        return float((self.result.clean_lp - self.result.corrupted_lp)[:, self.coordinate.step].mean())


def trace(backbone: Backbone, batch: FactBatch, config: TraceConfig, key: Array, *, k_min: int = 0,
          facts_per_chunk: int = 4, mesh=None, progress: Callable | None = None) -> Traced:
    """The TIE grid over every fact of `batch`, `facts_per_chunk` facts per call (per data shard
    on a `mesh`), and the coordinate (ℓ*, m*, k* ≥ k_min) it selects."""
    start = time.perf_counter()
    sigma = subject_embedding_std(backbone, batch)
    result = distributed.map_chunks(tie_grid, batch, chunk_size=facts_per_chunk, before=(backbone,),
                                    after=(sigma, key), static={"config": config}, mesh=mesh, progress=progress)
    coordinate = select_coordinate(selection_grid(result), config.modules, k_min=k_min)
    return Traced(result, coordinate, config, float(sigma), time.perf_counter() - start)
