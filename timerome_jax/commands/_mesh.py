"""`--mesh PROFILE` and `--distributed` for the commands that run many forwards (trace, edit, eval).

    timerome trace --mesh dp8 ...        # 8 devices, each with all parameters, facts split 8 ways
    timerome trace --mesh tp8 ...        # parameters split 8 ways (heads, MLP, vocabulary, experts)
    timerome eval  --mesh dp2tp4 ...     # 2 data replicas, each 4-way tensor parallel
    timerome trace --distributed --mesh dp16 ...   # in every process of a multi-host job

Without --mesh a command behaves exactly as before (one device, no sharding). Profiles are
described in `ports.sharding`; the product of the counts must equal the number of devices
(`jax.device_count()`, all processes together).
"""

from __future__ import annotations

import argparse
import os

import ports
from ports import sharding


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", metavar="PROFILE", default=None,
                        help="run over a device mesh: dpN (data parallel, parameters replicated), tpN "
                             "(tensor parallel) or dpNtpM; default: one device")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-host: join the job with jax.distributed.initialize first (reads "
                             "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or detects "
                             "SLURM / Open MPI / Cloud TPU)")


def mesh_profile(args: argparse.Namespace) -> sharding.MeshProfile | None:
    """The parsed --mesh profile (None without --mesh); joins the multi-host job first if asked."""
    if getattr(args, "distributed", False) or os.environ.get("TIMEROME_DISTRIBUTED") == "1":
        from timerome_jax import distributed

        distributed.initialize()
    text = getattr(args, "mesh", None)
    return None if text is None else sharding.parse_profile(text)


def mesh_from_args(args: argparse.Namespace):
    """The `jax.sharding.Mesh` for --mesh (built once per args), or None without --mesh."""
    cached = getattr(args, "_timerome_mesh", None)
    if cached is not None:
        return cached
    profile = mesh_profile(args)
    if profile is None:
        return None
    mesh = sharding.make_mesh(profile)
    args._timerome_mesh = mesh
    args._timerome_rules = profile.rules
    return mesh


def backbone_on_mesh(args: argparse.Namespace, path, **kwargs) -> ports.Backbone:
    """`ports.load_pretrained(path, **kwargs)`, with the parameters loaded straight onto the
    --mesh profile's mesh and rules when --mesh is given."""
    mesh = mesh_from_args(args)
    if mesh is None:
        return ports.load_pretrained(path, **kwargs)
    return ports.load_pretrained(path, mesh=mesh, rules=args._timerome_rules, **kwargs)

