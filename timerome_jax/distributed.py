"""Many devices and many hosts: data-parallel tracing, capture and scoring, and multi-host start-up.

The mesh has two axes (`ports.sharding`): 'data' and 'model'. Parameters are placed by the mesh
profile's rules (replicated for 'dpN', split over 'model' for 'tpN'); facts (or QA rows) are split
over 'data'. Every data-parallel function here is the single-device function run under
`jax.shard_map` with only 'data' manual (`axis_names={'data'}`): each data shard runs the
ordinary jitted code on its own facts, and inside it the 'model' axis stays automatic, so tensor
parallelism composes with it unchanged. No communication happens between data shards.

Results equal the single-device run: a fact's noise draws depend only on its global index
(`tracing.noise_draws`), σ is computed once from the whole fact set and passed in, and
likelihood rows get their PRNG keys from the global row index before they are split.

Multi-host (several processes, each with its own devices): call `initialize()` first in every
process, then build the mesh over `jax.devices()` (all processes' devices) as usual. Every
process reads the same fact file; `shard_rows` hands each device only its rows, and
`to_host` gathers results back to every process.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ports import Backbone
from ports.sharding import data_axis_size
from timerome_jax import likelihood, memory, sampler, tracing
from timerome_jax.errors import InputError

DATA = "data"


# --- multi-host start-up ------------------------------------------------------------------------

def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None) -> bool:
    """Join a multi-host JAX job (`jax.distributed.initialize`); call it before any other JAX call.

    Arguments left out are read from the environment: JAX_COORDINATOR_ADDRESS ('host:port' of
    process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID and JAX_LOCAL_DEVICE_IDS; with none of them set,
    JAX detects the cluster itself (Cloud TPU pods, SLURM, Open MPI). Returns False if this
    process had already joined (calling twice is harmless).
    """
    if jax.distributed.is_initialized():
        return False
    env = os.environ
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    return True


# --- moving rows on and off the mesh --------------------------------------------------------------

def pad_rows(tree: Any, multiple: int) -> tuple[Any, int]:
    """Pad every leaf's leading axis to a multiple of `multiple` by repeating row 0.
    Returns (padded tree, original row count)."""
    leaves = jax.tree.leaves(tree)
    n = int(np.shape(leaves[0])[0])
    padded = -(-n // multiple) * multiple
    if padded == n:
        return tree, n
    rows = np.concatenate([np.arange(n), np.zeros(padded - n, np.int64)])
    return jax.tree.map(lambda x: np.asarray(x)[rows], tree), n


def pad_facts(batch: tracing.TraceBatch, multiple: int) -> tracing.TraceBatch:
    """A TraceBatch padded to a multiple of `multiple` facts with filler rows (fact_index -1,
    excluded from σ; their results are dropped)."""
    padded, n = pad_rows(batch, multiple)
    index = np.asarray(padded.fact_index_F).copy()
    index[n:] = -1
    return dataclasses.replace(padded, fact_index_F=index)


def shard_rows(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf's leading axis over the mesh's 'data' axis (replicated over 'model').

    Each device receives only its rows (`make_array_from_callback`), so this also works when
    the mesh spans several processes that all hold the same host arrays."""
    sharding = NamedSharding(mesh, P(DATA))

    def put(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def replicate(x: Any, mesh: Mesh) -> Any:
    """A scalar, PRNG key or small array placed on every device of the mesh, wherever it was made
    (every process must pass the same value)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = replicate(np.asarray(jax.random.key_data(x)), mesh)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, P()), lambda index: host[index])


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
    """`tree` with every `jax.Array` leaf replicated on the mesh (`replicate`); other leaves kept.

    For small state made on one device that must join a backbone loaded onto the mesh, e.g. an
    edit memory restored from disk (committed to one device) before `memory.attach`: one jitted
    call cannot take arrays committed to different sets of devices."""
    return jax.tree.map(lambda x: replicate(x, mesh) if isinstance(x, jax.Array) else x, tree)


def to_host(tree: Any) -> Any:
    """numpy copies of (possibly sharded) arrays; across processes, every process gets all rows."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def over_facts(fn: Callable, mesh: Mesh, replicated_before: int = 1, replicated_after: int = 0) -> Callable:
    """`fn(*replicated_before, rows, *replicated_after)` with `rows` (a pytree of [F, ...] arrays)
    split over 'data' and the output's leading axis gathered back the same way.

    The other arguments (the backbone, σ, keys, ...) are replicated over 'data' but keep their
    placement over 'model'. F must be a multiple of the 'data' axis size.
    """
    in_specs = (P(),) * replicated_before + (P(DATA),) + (P(),) * replicated_after
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(DATA),
                           axis_names=frozenset({DATA}), check_vma=False)
    return jax.jit(mapped)


# --- data-parallel TIE grid ---------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _grid_fn(mesh: Mesh, config: tracing.TraceConfig):
    def grid(backbone, batch, sigma, key):
        return tracing.tie_grid(backbone, batch, sigma, key, config)

    return over_facts(grid, mesh, replicated_before=1, replicated_after=2)


def tie_grid(backbone: Backbone, batch: tracing.TraceBatch, sigma: jax.Array, key: jax.Array,
             config: tracing.TraceConfig, mesh: Mesh) -> tracing.TraceResult:
    """`tracing.tie_grid` with the facts split over 'data': each data shard traces its own facts.

    `batch.num_facts` must be a multiple of the 'data' axis size (`pad_facts`). The batch may be
    host arrays or already placed with `shard_rows`."""
    n = data_axis_size(mesh)
    if batch.num_facts % n:
        raise InputError(f"{batch.num_facts} facts do not split over a 'data' axis of {n}: pad them "
                         "with distributed.pad_facts")
    if not all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(NamedSharding(mesh, P(DATA)), x.ndim)
               for x in jax.tree.leaves(batch)):
        batch = shard_rows(batch, mesh)
    return _grid_fn(mesh, config)(backbone, batch, replicate(np.float32(sigma), mesh), replicate(key, mesh))


def run_grid(backbone: Backbone, batch: tracing.TraceBatch, key: jax.Array, config: tracing.TraceConfig,
             mesh: Mesh, facts_per_device: int = 4,
             progress: Callable | None = None) -> tuple[tracing.TraceResult, float, float]:
    """`pipeline.run_grid` over a mesh: chunks of `facts_per_device` x (data axis size) facts, each
    split over 'data'. Returns (result [F, ...] as numpy, σ, seconds), equal to the single-device
    run."""
    from timerome_jax import pipeline

    if facts_per_device < 1:
        raise InputError("facts per device must be >= 1")
    start = time.perf_counter()
    sigma = tracing.subject_embedding_std(backbone, batch)
    n = data_axis_size(mesh)
    size = n * min(facts_per_device, -(-batch.num_facts // n))
    parts = []
    pieces = pipeline.chunks(batch, size)
    for chunk in (progress(pieces) if progress else pieces):
        parts.append(to_host(tie_grid(backbone, chunk, sigma, key, config, mesh)))
    merged = jax.tree.map(lambda *xs: np.concatenate(xs)[: batch.num_facts], *parts)
    return merged, float(sigma), time.perf_counter() - start


# --- data-parallel capture of edit keys and deltas ----------------------------------------------

@functools.lru_cache(maxsize=32)
def _capture_fn(mesh: Mesh, module: str, step: int, trace_steps: int, noise_samples: int, noise_scale: float,
                positions: str):
    def capture(backbone, batch, sigma, key, layer):
        return memory.capture_keys_and_deltas(backbone, batch, sigma, key, layer=layer, module=module,
                                              step=step, trace_steps=trace_steps, noise_samples=noise_samples,
                                              noise_scale=noise_scale, positions=positions)

    return over_facts(capture, mesh, replicated_before=1, replicated_after=3)


def capture_keys_and_deltas(backbone: Backbone, batch: tracing.TraceBatch, sigma: jax.Array, key: jax.Array,
                            mesh: Mesh, *, layer: int, module: str, step: int, trace_steps: int = 8,
                            noise_samples: int = 10, noise_scale: float = 3.0, facts_per_device: int = 4,
                            positions: str = "last") -> tuple[np.ndarray, np.ndarray]:
    """`memory.capture_keys_and_deltas` over all facts of `batch`, split over 'data' in chunks of
    `facts_per_device` x (data axis size). Returns numpy keys [F, d_k] and deltas [F, d] (with
    positions "subject": [F, S, d_k] and [F, S, d])."""
    from timerome_jax import pipeline

    n = data_axis_size(mesh)
    fn = _capture_fn(mesh, module, int(step), int(trace_steps), int(noise_samples), float(noise_scale), positions)
    size = n * min(max(facts_per_device, 1), -(-batch.num_facts // n))
    sigma, key, layer = (replicate(x, mesh) for x in (np.float32(sigma), key, np.int32(layer)))
    keys, deltas = [], []
    for chunk in pipeline.chunks(batch, size):
        k, d = to_host(fn(backbone, shard_rows(chunk, mesh), sigma, key, layer))
        keys.append(k)
        deltas.append(d)
    return np.concatenate(keys)[: batch.num_facts], np.concatenate(deltas)[: batch.num_facts]


# --- data-parallel answer log-likelihood (evaluation) -------------------------------------------

@functools.lru_cache(maxsize=32)
def _likelihood_fn(mesh: Mesh, method: str, mc_samples: int, batch_size: int):
    def score(backbone, rows):
        prompt_ids, prompt_mask, answer_ids, answer_mask, keys = rows
        return likelihood.answer_log_likelihood(backbone, prompt_ids, prompt_mask, answer_ids, answer_mask,
                                                keys, method=method, mc_samples=mc_samples,
                                                batch_size=batch_size)

    return over_facts(score, mesh, replicated_before=1)


def answer_log_likelihood(backbone: Backbone, prompt_ids_BP, prompt_mask_BP, answer_ids_BA, answer_mask_BA,
                          key: jax.Array | None, mesh: Mesh, *, method: str = "mc_elbo",
                          mc_samples: int = 128, batch_size: int = 32) -> np.ndarray:
    """`likelihood.answer_log_likelihood_jit` with the B rows split over 'data': float32 [B] numpy,
    equal to the single-device call with the same `key` (one key is split into B row keys before
    the rows are distributed, exactly as the single-device call splits it). `batch_size` counts
    sequences per forward on each data shard."""
    likelihood.check_method(method, mc_samples, batch_size)
    arrays = [np.asarray(a) for a in (prompt_ids_BP, prompt_mask_BP, answer_ids_BA, answer_mask_BA)]
    if any(a.ndim != 2 for a in arrays) or arrays[0].shape != arrays[1].shape or \
            arrays[2].shape != arrays[3].shape or arrays[0].shape[0] != arrays[2].shape[0]:
        raise InputError("prompt ids/mask [B, P] and answer ids/mask [B, A] must be 2-D with "
                         f"matching shapes, got {[a.shape for a in arrays]}")
    sampler.check_sequence_length(backbone, arrays[0].shape[1], arrays[2].shape[1])
    sampler.check_nonempty_rows(arrays[1], "the prompt")
    sampler.check_nonempty_rows(arrays[3], "the answer")
    B = arrays[0].shape[0]
    if method == "mc_elbo" and key is None:
        raise InputError("method 'mc_elbo' needs a PRNG key")
    keys = sampler.row_keys(jax.random.key(0) if key is None else key, B)
    raw_keys = np.asarray(jax.random.key_data(keys))
    rows, n = pad_rows([a.astype(np.int32) for a in arrays] + [raw_keys], data_axis_size(mesh))
    *ids, raw = shard_rows(rows, mesh)
    fn = _likelihood_fn(mesh, method, mc_samples, batch_size)
    typed = jax.random.wrap_key_data(raw, impl=jax.random.key_impl(keys))
    return to_host(fn(backbone, (*ids, typed)))[:n]


__all__ = [
    "answer_log_likelihood", "capture_keys_and_deltas", "initialize", "over_facts", "pad_facts",
    "pad_rows", "replicate", "replicate_tree", "run_grid", "shard_rows", "tie_grid", "to_host",
]
