"""A built memory with what it was built from (`MemoryRecord`), saved and loaded atomically.

A memory directory holds `memory.json` (format, coordinate, λ, key scale, fact ids — one per
entry —, model fingerprint, form, capture settings) and `arrays/` (orbax: the `EditMemory`
arrays). A killed save leaves the previous memory intact; loading onto a model with another
fingerprint, or whose site widths differ from the arrays', is refused with one clear error.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp

from ports import Backbone, Site
from ports.errors import CheckpointError
from ports.fileio import atomic_directory
from timerome_jax.errors import InputError
from timerome_jax.memory import ridge
from timerome_jax.memory.spec import KEY_POSITIONS, RewriteValues, SamplerCapture
from timerome_jax.tracing import Coordinate

MEMORY_FORMAT = "timerome-edit-memory"
# the EditMemory fields saved as arrays (those that are None are not saved)
ARRAYS = ("layer", "keys", "deltas", "valid", "readout", "alpha", "ridge", "q", "cholesky", "inverse", "whitening",
          "gate")


@dataclasses.dataclass(frozen=True)
class MemoryRecord:
    """An EditMemory plus what it was built from and for (not a pytree; saved alongside)."""

    memory: ridge.EditMemory
    coordinate: Coordinate
    lam: float
    key_scale: float
    fact_ids: tuple[str, ...]      # one per entry (a fact captured at S steps has S entries)
    fingerprint: str
    capture_steps: tuple[int, ...] = ()   # steps its facts were captured at; () = (coordinate.step,)
    key_positions: str = "last"           # "last" subject token (the paper's) or every "subject" token
    sampler_capture: SamplerCapture | None = None   # also captured along the sampler's trajectory
    rewrite: RewriteValues | None = None            # a rewrite memory's value method (None: forgetting)

    def __post_init__(self):
        if not self.capture_steps:
            object.__setattr__(self, "capture_steps", (self.coordinate.step,))

    def with_memory(self, memory: ridge.EditMemory, **changes) -> "MemoryRecord":
        return dataclasses.replace(self, memory=memory, **changes)

    def remove_facts(self, fact_ids: Sequence[str]) -> "MemoryRecord":
        """Roll back every entry of the facts with these ids (equals a build without them)."""
        unknown = [f for f in fact_ids if f not in self.fact_ids]
        if unknown:
            raise InputError(f"fact id(s) not in this memory: {', '.join(unknown[:5])}")
        drop = set(fact_ids)
        positions = [i for i, f in enumerate(self.fact_ids) if f in drop]
        kept = tuple(f for f in self.fact_ids if f not in drop)
        return self.with_memory(ridge.remove(self.memory, positions), fact_ids=kept)


def save(record: MemoryRecord, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Atomic save: orbax arrays + memory.json; a killed save leaves the previous memory intact."""
    import orbax.checkpoint as ocp

    m = record.memory
    arrays = {name: getattr(m, name) for name in ARRAYS if getattr(m, name) is not None}
    meta = {"format": MEMORY_FORMAT, "version": 1, "module": m.module, "capacity": m.capacity, "form": m.form,
            "covariance_regularised": m.whitening is not None, "gated": m.gate is not None,
            "key_dim": int(m.keys.shape[1]), "value_dim": int(m.deltas.shape[1]),
            "coordinate": record.coordinate.as_dict(), "lam": record.lam, "key_scale": record.key_scale,
            "fact_ids": list(record.fact_ids), "fingerprint": record.fingerprint, "size": m.size,
            "capture_steps": list(record.capture_steps), "key_positions": record.key_positions,
            "sampler_capture": None if record.sampler_capture is None else record.sampler_capture.as_dict(),
            "rewrite": None if record.rewrite is None else record.rewrite.as_dict()}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((tmp / "arrays").absolute(), arrays)
        checkpointer.wait_until_finished()
        (tmp / "memory.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out_dir)


def load(path: str | Path, backbone: Backbone | None = None) -> MemoryRecord:
    """Load a saved memory; with `backbone`, refuse one built for a different model."""
    import orbax.checkpoint as ocp

    path = Path(path)
    meta_path = path / "memory.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not an edit-memory directory (no memory.json)")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != MEMORY_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        cap, dk, dv = int(meta["capacity"]), int(meta["key_dim"]), int(meta["value_dim"])
        coordinate = Coordinate(**meta["coordinate"])
        positions = meta.get("key_positions", "last")   # memories saved before it was recorded
        if positions not in KEY_POSITIONS:
            raise ValueError(f"key_positions {positions!r}")
        sampler_capture = meta.get("sampler_capture")
        sampler_capture = None if sampler_capture is None else SamplerCapture(**sampler_capture)
        rewrite = meta.get("rewrite")                   # memories saved before rewrites existed: None
        rewrite = None if rewrite is None else RewriteValues(**rewrite)
        form = meta.get("form", "dual")                 # memories saved before the primal form existed
        if form not in ("dual", "primal"):
            raise ValueError(f"form {form!r}")
    except (OSError, ValueError, KeyError, TypeError, InputError) as e:
        raise CheckpointError(f"{meta_path} is corrupted: {e}") from None
    if backbone is not None and meta["fingerprint"] != backbone.fingerprint():
        raise CheckpointError(
            f"the memory in {path} was built for model {meta['fingerprint']}, not for this model "
            f"({backbone.fingerprint()}); rebuild it with `timerome edit` on this model")
    shapes = {"layer": (), "alpha": (), "ridge": (), "q": (), "gate": (), "valid": (cap,), "keys": (cap, dk),
              "readout": (cap, dk), "deltas": (cap, dv), "cholesky": (cap, cap), "inverse": (dk, dk),
              "whitening": (dk, dk)}
    stored = {"cholesky": form == "dual", "inverse": form == "primal", "gate": meta.get("gated", False),
              "whitening": meta.get("covariance_regularised", False)}
    dtypes = {"layer": jnp.int32, "q": jnp.int32, "valid": bool}
    target = {name: jax.ShapeDtypeStruct(shapes[name], dtypes.get(name, jnp.float32))
              for name in ARRAYS if stored.get(name, True)}
    try:
        arrays = ocp.StandardCheckpointer().restore((path / "arrays").absolute(), target)
    except Exception as e:  # orbax raises many types for damaged files
        raise CheckpointError(f"the memory arrays in {path} are corrupted or incomplete "
                              f"({type(e).__name__})") from None
    memory = ridge.EditMemory(module=meta["module"], **{"cholesky": None, "inverse": None, **arrays})
    if memory.size != meta.get("size"):
        raise CheckpointError(f"{path}: memory.json says {meta.get('size')} facts, the arrays hold {memory.size}")
    if backbone is not None:
        site = Site(None, memory.module)
        widths = (site.key_width(backbone.config), site.value_width(backbone.config))
        if (dk, dv) != widths:
            raise CheckpointError(f"{path}: the memory's keys and values are {dk} and {dv} wide, but this model's "
                                  f"{memory.module} site has widths {widths[0]} and {widths[1]}")
    return MemoryRecord(memory=memory, coordinate=coordinate, lam=float(meta["lam"]),
                        key_scale=float(meta["key_scale"]), fact_ids=tuple(meta["fact_ids"]),
                        fingerprint=meta["fingerprint"], capture_steps=tuple(meta.get("capture_steps", ())),
                        key_positions=positions, sampler_capture=sampler_capture, rewrite=rewrite)


__all__ = ["MEMORY_FORMAT", "MemoryRecord", "load", "save"]
