"""One chunking driver for every many-forward job (tracing, capture, scoring), on one device or a mesh.

`map_chunks(fn, rows, ...)` cuts `rows` (a pytree of [N, ...] host arrays: facts, QA rows) into
equal-shape chunks (the last filled with copies of row 0, whose results are dropped), so `fn`
compiles once, and concatenates the results on the host. With `mesh=None` each chunk is one call
of `fn` on the default device. With a `jax.sharding.Mesh` (`ports.sharding`) each chunk holds
`chunk_size` rows per device of the mesh's 'data' axis and runs under `jax.shard_map` with only
'data' manual: every data shard runs the ordinary code on its rows, the 'model' axis stays
automatic (tensor parallelism composes unchanged), and no data shard talks to another. Results
equal the single-device run because a row's randomness depends only on its own index
(`tracing.noise_draws`, `likelihood.pair_keys`) and set-level statistics (σ) are computed once and
passed in.

Multi-host (several processes, each with its own devices): call `initialize()` first in every
process and build the mesh over `jax.devices()`. Every process reads the same inputs; each device
receives only its rows and every process gets all results back.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ports.sharding import data_axis_size
from timerome_jax.errors import InputError

DATA = "data"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None) -> bool:
    """Join a multi-host JAX job (`jax.distributed.initialize`); call it before any other JAX call.

    Arguments left out are read from JAX_COORDINATOR_ADDRESS ('host:port' of process 0),
    JAX_NUM_PROCESSES, JAX_PROCESS_ID and JAX_LOCAL_DEVICE_IDS; with none set, JAX detects the
    cluster itself (Cloud TPU pods, SLURM, Open MPI). Returns False if this process had already
    joined (calling twice is harmless).
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


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every `jax.Array` leaf of `tree` (PRNG keys included) placed on every device of the mesh,
    wherever it was made; other leaves kept. For small state made on one device that must join a
    backbone loaded onto the mesh (one jitted call cannot mix device sets). Every process must
    pass the same values. Arrays already placed on this mesh (a backbone loaded onto it) stay."""
    def put(x):
        if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
            return x
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(np.asarray(jax.random.key_data(x))), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, NamedSharding(mesh, P()), lambda index: host[index])

    return jax.tree.map(put, tree)


def _split_rows(tree: Any, mesh: Mesh) -> Any:
    """Every leaf's leading axis over the mesh's 'data' axis; each device receives only its rows."""
    sharding = NamedSharding(mesh, P(DATA))

    def put(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(np.asarray(jax.random.key_data(x))), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """numpy copies of (possibly sharded) arrays; across processes, every process gets all rows."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


@functools.lru_cache(maxsize=64)
def _on_mesh(fn: Callable, static: tuple, mesh: Mesh, before: int, after: int) -> Callable:
    def run(*args):
        return fn(*args, **dict(static))

    in_specs = (P(),) * before + (P(DATA),) + (P(),) * after
    return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=P(DATA),
                                 axis_names=frozenset({DATA}), check_vma=False))


def num_rows(rows: Any) -> int:
    return int(np.shape(jax.tree.leaves(rows)[0])[0])


def chunks(rows: Any, size: int):
    """(chunk, number of real rows) for equal-shape chunks of `size` rows of `rows` (a pytree of
    [N, ...] arrays); the last chunk is filled with copies of row 0."""
    n = num_rows(rows)
    for start in range(0, n, size):
        index = np.arange(start, start + size)
        yield jax.tree.map(lambda x: x[np.where(index < n, index, 0)], rows), min(size, n - start)


def map_chunks(fn: Callable, rows: Any, *, chunk_size: int, before: tuple = (), after: tuple = (),
               static: dict | None = None, mesh: Mesh | None = None, progress: Callable | None = None) -> Any:
    """`fn(*before, chunk, *after, **static)` over equal-shape chunks of `rows`; outputs [N, ...]
    as numpy.

    `rows`: a pytree of [N, ...] arrays (the fact or QA axis first). `chunk_size`: rows per call
    (per data shard with a mesh; fewer when N is small). `before`, `after`: arguments every call
    shares (the backbone, σ, keys), replicated over the mesh's 'data' axis. `static`: hashable
    keyword arguments (`fn` compiles once per value). `progress`: optional wrapper over the chunks.
    """
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise InputError(f"the chunk size must be an integer >= 1, got {chunk_size!r}")
    static = dict(static or {})
    n = num_rows(rows)
    shards = 1 if mesh is None else data_axis_size(mesh)
    size = shards * min(chunk_size, -(-n // shards))
    if mesh is None:
        call = functools.partial(fn, **static)
    else:
        call = _on_mesh(fn, tuple(sorted(static.items())), mesh, len(before), len(after))
        before, after = replicate((before, after), mesh)
    pieces = list(chunks(rows, size))
    parts = []
    for chunk, _ in (progress(pieces) if progress else pieces):
        if mesh is not None:
            chunk = _split_rows(chunk, mesh)
        parts.append(to_host(call(*before, chunk, *after)))
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *parts)


__all__ = ["chunks", "data_axis_size", "initialize", "map_chunks", "num_rows", "replicate", "to_host"]
