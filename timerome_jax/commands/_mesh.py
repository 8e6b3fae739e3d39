"""`--mesh PROFILE` and `--distributed` for the commands that run many forwards (trace, edit, eval).

    timerome trace --mesh dp8 ...        # 8 devices, each with all parameters, facts split 8 ways
    timerome trace --mesh tp8 ...        # parameters split 8 ways (heads, MLP, vocabulary, experts)
    timerome eval  --mesh dp2tp4 ...     # 2 data replicas, each 4-way tensor parallel
    timerome trace --distributed --mesh dp16 ...   # in every process of a multi-host job

Without --mesh a command behaves exactly as before (one device, no sharding). Profiles are
described in `ports.sharding`; the product of the counts must equal the number of devices
(`jax.device_count()`, all processes together). A command builds its `Placement` once and passes
the mesh to the API calls as an argument.
"""

from __future__ import annotations

import argparse
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a command's models live: a mesh and its rules, or one device (both None)."""

    mesh: object = None
    rules: object = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Placement":
        """The --mesh profile's mesh; joins the multi-host job first if asked."""
        if getattr(args, "distributed", False) or os.environ.get("TIMEROME_DISTRIBUTED") == "1":
            from timerome_jax import distributed

            distributed.initialize()
        text = getattr(args, "mesh", None)
        if text is None:
            return cls()
        profile = sharding.parse_profile(text)
        return cls(sharding.make_mesh(profile), profile.rules)

    def load(self, path, **kwargs) -> ports.Backbone:
        """`ports.load_pretrained(path, **kwargs)`, straight onto the mesh when there is one."""
        if self.mesh is None:
            return ports.load_pretrained(path, **kwargs)
        return ports.load_pretrained(path, mesh=self.mesh, rules=self.rules, **kwargs)
