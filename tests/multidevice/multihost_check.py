"""One process of a 2-process (multi-host) job on CPU: joins with `distributed.initialize()`, loads
a fixture onto a mesh spanning both processes and compares with the single-device model.

Launched twice by tests/test_sharding.py with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES=2,
JAX_PROCESS_ID and 4 CPU devices each; prints one JSON line. CPU processes talk through gloo.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from timerome_jax import distributed  # noqa: E402

joined = distributed.initialize()

import numpy as np  # noqa: E402

import ports  # noqa: E402
from ports import sharding  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "llada"


@jax.jit
def forward(backbone, ids):
    return backbone.apply(ids)


def main() -> None:
    mesh = sharding.make_mesh("dp2tp4")  # 2 x 4 over both processes' devices
    sharded = ports.load_pretrained(FIXTURE, mesh=mesh, rules=sharding.rules_for("dp2tp4"))
    local = ports.load_pretrained(FIXTURE)  # this process's first device only
    ids = np.random.default_rng(0).integers(0, 370, (4, 10)).astype(np.int32)
    # rows 0-1 go to one process's devices, 2-3 to the other's; every process gets all logits back
    logits = distributed.map_chunks(forward, ids, chunk_size=2, before=(sharded,), mesh=mesh)
    expected = np.asarray(local.logits(ids))
    spans = {leaf.sharding.mesh.devices.size for leaf in jax.tree.leaves(sharded.params)}
    print(json.dumps({
        "joined": joined, "process": jax.process_index(), "processes": jax.process_count(),
        "devices": jax.device_count(), "local_devices": jax.local_device_count(),
        "mesh_devices": sorted(spans), "fully_addressable": any(
            leaf.is_fully_addressable for leaf in jax.tree.leaves(sharded.params)),
        "rejoin": distributed.initialize(),
        "max_abs_diff": float(np.abs(logits - expected).max())}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
