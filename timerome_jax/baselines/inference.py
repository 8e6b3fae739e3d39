"""Inference-time baselines (DESIGN.md §5; definitions in docs/baselines.md): activation steering,
contrastive activation addition (CAA) and the random-coordinate memory. Weights are never modified.

All three are built from the forget facts through the tracer's runs at a coordinate, normally the
traced (ℓ*, m*, k*) of the memory they are compared with:

* steer: v = mean_i δ_i (the edit memory's deltas, `memory.capture`); value ← value + α v;
* caa: d = mean over facts of (value_clean − value_corrupted) over every step, draw and subject or
  answer position; CAA suppresses with a negative multiplier, so v = −d;
* random_memory: the same ridge memory (same α, λ, q, facts, hence rank) at a seeded random layer
  other than ℓ* and a random module: the control that shows what tracing adds.

Steering adds at every position of every forward (eval does not know where subjects are). A built
baseline is saved as a directory (`kind`, `baseline.json`, `vector.npz` or `memory/`);
`load_inference_baseline` returns the backbone with its edit attached (`Backbone.with_edits`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ports
from ports import MODULES, Backbone, Site
from ports.errors import CheckpointError
from ports.fileio import atomic_directory
from timerome_jax import distributed
from timerome_jax import memory as mem
from timerome_jax.edits import Steering
from timerome_jax.errors import InputError
from timerome_jax.facts import FactBatch, Facts
from timerome_jax.tracing import Coordinate, clean_run, noise_draws, noise_edit, subject_embedding_std

Array = jax.Array

INFERENCE_METHODS = ("steer", "caa", "random_memory")
KIND_FILE = "kind"
META_FILE = "baseline.json"
VECTOR_FILE = "vector.npz"
MEMORY_DIR = "memory"
FORMAT = "timerome-inference-baseline"


def steer(backbone: Backbone, vector, layer: int, module: str, alpha: float) -> Backbone:
    """The backbone with α·vector added at (layer, module) in every forward."""
    if module not in MODULES:
        raise InputError(f"unknown module {module!r}; choose from {', '.join(MODULES)}")
    if not 0 <= int(layer) < backbone.config.n_layers:
        raise InputError(f"layer {layer} is outside 0..{backbone.config.n_layers - 1}")
    vector = jnp.asarray(vector, jnp.float32)
    if vector.shape != (backbone.config.d_model,):
        raise InputError(f"a steering vector for this model has shape ({backbone.config.d_model},), got {vector.shape}")
    return backbone.with_edits(Steering(Site(jnp.int32(layer), module), vector, jnp.float32(alpha)))


# --- vectors from the tracer's runs --------------------------------------------------------------

def steering_vector(backbone: Backbone, batch: FactBatch, coordinate: Coordinate, key: Array, *,
                    noise_samples: int = 10, noise_scale: float = 3.0, facts_per_chunk: int = 4) -> np.ndarray:
    """v = mean_i δ_i at the coordinate (the edit memory's deltas). [D] float32."""
    entries = mem.capture(backbone, batch, coordinate, key, noise_samples=noise_samples, noise_scale=noise_scale,
                          facts_per_chunk=facts_per_chunk)
    return entries.deltas.mean(axis=0).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("module", "steps", "noise_samples", "noise_scale", "cells_per_batch"))
def contrastive_sums(backbone: Backbone, batch: FactBatch, sigma: Array, key: Array, layer: Array, *,
                     module: str, steps: int, noise_samples: int, noise_scale: float,
                     cells_per_batch: int = 16) -> tuple[Array, Array]:
    """Per fact: Σ over steps k' < K, draws r and positions p ∈ subject ∪ answer of
    (value_clean − value_corrupted) of `module` at `layer` [F, D], and the number of terms [F].

    The clean trajectory is the tracer's teacher-forced one; the noise draws are the tracer's
    (same key, same fact index → same noise as `tie_grid` and `memory.capture`)."""
    S = batch.subject_pos_FS.shape[1]
    D = backbone.config.d_model
    noise = noise_draws(key, batch.fact_index_F, noise_samples, (S, D)) * (noise_scale * sigma)
    site = Site(layer, module)

    def value(ids_T, mask_T, edits=()):
        _, (captured,) = backbone.apply(ids_T[None], mask_T[None], capture=(site,), edits=edits)
        return captured.value[0].astype(jnp.float32)  # [T, D]

    def one_fact(ids, am, ans, pos, valid, noise_RSD):
        states, _, _, _ = clean_run(backbone, ids, am, ans, pos, steps)  # [K, T]
        T = ids.shape[0]
        subject_T = jnp.any((jnp.arange(T)[:, None] == pos[None, :]) & valid[None, :], axis=1)
        where_T = (subject_T | ans.astype(bool)) & am.astype(bool)
        clean_KTD = jax.lax.map(lambda state: value(state, am), states)

        def cell(kr):
            k, r = kr // noise_samples, kr % noise_samples
            diff = clean_KTD[k] - value(states[k], am, (noise_edit(pos, valid, noise_RSD[r]),))
            return jnp.sum(jnp.where(where_T[:, None], diff, 0.0), axis=0)

        cells = jnp.arange(steps * noise_samples)
        sums = jax.lax.map(cell, cells, batch_size=min(cells_per_batch, steps * noise_samples))
        return jnp.sum(sums, axis=0), jnp.sum(where_T) * steps * noise_samples

    return jax.vmap(one_fact)(batch.input_ids_FT, batch.attention_mask_FT, batch.answer_mask_FT,
                              batch.subject_pos_FS, batch.subject_valid_FS, noise)


def caa_difference(backbone: Backbone, batch: FactBatch, coordinate: Coordinate, key: Array, *,
                   steps: int = 8, noise_samples: int = 10, noise_scale: float = 3.0, facts_per_chunk: int = 4,
                   cells_per_batch: int = 16) -> np.ndarray:
    """d = mean over facts of the per-fact mean (clean − corrupted) (module docstring). [D]."""
    sums, counts = distributed.map_chunks(
        contrastive_sums, batch, chunk_size=facts_per_chunk, before=(backbone,),
        after=(subject_embedding_std(backbone, batch), key, jnp.int32(coordinate.layer)),
        static=dict(module=coordinate.module, steps=steps, noise_samples=noise_samples, noise_scale=noise_scale,
                    cells_per_batch=cells_per_batch))
    return (sums / np.maximum(counts, 1)[:, None]).mean(axis=0).astype(np.float32)


def random_coordinate(n_layers: int, traced: Coordinate, seed: int) -> Coordinate:
    """A layer drawn uniformly among the layers other than the traced one (any layer when the model
    has one), a module drawn uniformly, the traced step; numpy's default_rng(seed)."""
    rng = np.random.default_rng(seed)
    layers = [l for l in range(n_layers) if l != traced.layer] or [traced.layer]
    layer = int(layers[int(rng.integers(len(layers)))])
    module = MODULES[int(rng.integers(len(MODULES)))]
    return Coordinate(layer, traced.step, module, traced.steps)


def random_memory(backbone: Backbone, facts: Facts, traced: Coordinate, key: Array, *, seed: int, alpha: float,
                  lam: float, q: int | None = None, noise_samples: int = 10, noise_scale: float = 3.0,
                  facts_per_chunk: int = 4) -> mem.MemoryRecord:
    """The ridge memory of these facts at a random coordinate (same α, λ, q, same facts)."""
    mem.check_hyperparameters(alpha, lam, q, facts.num_facts)
    coordinate = random_coordinate(backbone.config.n_layers, traced, seed)
    entries = mem.capture(backbone, facts.batch, coordinate, key, noise_samples=noise_samples,
                          noise_scale=noise_scale, facts_per_chunk=facts_per_chunk)
    memory, key_scale = mem.build(entries.keys, entries.deltas, layer=coordinate.layer, module=coordinate.module,
                                  alpha=alpha, lam=lam, q=q)
    return mem.MemoryRecord(memory, coordinate, lam, key_scale, facts.ids, backbone.fingerprint())


def mean_value_memory(memory: mem.EditMemory) -> mem.EditMemory:
    """The steering control of a memory: the same keys, read-out and gate, with every stored value
    replaced by the mean of its values (the mean δ). Where one stored key matches, c(x) ≈ e_j, so
    the term is ≈ α · mean δ: the memory still decides *where* to add, but no longer *what*. Compared
    with the memory itself, it measures what the per-fact ridge read-out adds over a gated steering
    vector (issue #19's controls)."""
    valid = memory.valid[:, None]
    mean_D = jnp.sum(jnp.where(valid, memory.deltas, 0.0), axis=0) / jnp.maximum(jnp.sum(memory.valid), 1)
    return dataclasses.replace(memory, deltas=jnp.where(valid, mean_D[None], 0.0).astype(memory.deltas.dtype))


@dataclasses.dataclass(frozen=True)
class InferenceBaseline:
    """A built baseline: `kind`, what to save, and `attach(backbone)`."""

    kind: str
    coordinate: Coordinate          # where it acts
    traced_coordinate: Coordinate   # the coordinate of the traced memory it is compared with
    alpha: float
    fingerprint: str
    fact_ids: tuple[str, ...]
    vector: np.ndarray | None = None        # steer / caa: the added direction v
    difference: np.ndarray | None = None    # steer: mean δ; caa: mean (clean − corrupted)
    record: mem.MemoryRecord | None = None  # random_memory
    settings: dict = dataclasses.field(default_factory=dict)

    def attach(self, backbone: Backbone) -> Backbone:
        """The unedited `backbone` with this baseline's edit."""
        if self.kind == "random_memory":
            return backbone.without_edits().with_edits(self.record.memory)
        return steer(backbone.without_edits(), self.vector, self.coordinate.layer, self.coordinate.module, self.alpha)


def build_inference_baseline(kind: str, backbone: Backbone, facts: Facts, traced: Coordinate, *, seed: int = 0,
                             alpha: float = 1.0, lam: float = 0.1, q: int | None = None, steps: int = 8,
                             noise_samples: int = 10, noise_scale: float = 3.0,
                             facts_per_chunk: int = 4) -> InferenceBaseline:
    """Build one inference-time baseline from the encoded forget facts.

    The noise draws use `jax.random.key(seed)` (as `timerome trace/edit --seed`); the random
    coordinate is drawn with `seed` too."""
    if kind not in INFERENCE_METHODS:
        raise InputError(f"unknown inference-time baseline {kind!r}; choose one of {', '.join(INFERENCE_METHODS)}")
    if not np.isfinite(alpha):
        raise InputError(f"alpha must be finite, got {alpha}")
    key = jax.random.key(seed)
    batch = facts.batch
    common = dict(alpha=float(alpha), fingerprint=backbone.fingerprint(), fact_ids=facts.ids,
                  traced_coordinate=traced)
    settings = {"seed": seed, "noise_samples": noise_samples, "noise_scale": noise_scale}
    if kind == "steer":
        mean_delta = steering_vector(backbone, batch, traced, key, noise_samples=noise_samples,
                                     noise_scale=noise_scale, facts_per_chunk=facts_per_chunk)
        return InferenceBaseline(kind, traced, vector=mean_delta, difference=mean_delta, settings=settings, **common)
    if kind == "caa":
        d = caa_difference(backbone, batch, traced, key, steps=steps, noise_samples=noise_samples,
                           noise_scale=noise_scale, facts_per_chunk=facts_per_chunk)
        return InferenceBaseline(kind, traced, vector=-d, difference=d, settings={**settings, "steps": steps}, **common)
    if alpha < 0:
        raise InputError(f"alpha must be >= 0, got {alpha}")
    record = random_memory(backbone, facts, traced, key, seed=seed, alpha=alpha, lam=lam, q=q,
                           noise_samples=noise_samples, noise_scale=noise_scale, facts_per_chunk=facts_per_chunk)
    return InferenceBaseline(kind, record.coordinate, record=record,
                             settings={**settings, "lam": lam, "q": q, "rank": record.memory.size}, **common)


def save_inference_baseline(baseline: InferenceBaseline, out_dir: str | Path, *, model: str | None = None,
                            extra: dict | None = None, overwrite: bool = False) -> Path:
    """Atomic save (module docstring). `model` is recorded so that eval can load the base model."""
    meta = {"format": FORMAT, "version": 1, "kind": baseline.kind, "coordinate": baseline.coordinate.as_dict(),
            "traced_coordinate": baseline.traced_coordinate.as_dict(), "alpha": baseline.alpha,
            "fingerprint": baseline.fingerprint, "model": model, "fact_ids": list(baseline.fact_ids),
            "settings": baseline.settings, **(extra or {})}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        if baseline.kind == "random_memory":
            mem.save(baseline.record, tmp / MEMORY_DIR)
        else:
            np.savez(tmp / VECTOR_FILE, vector=np.asarray(baseline.vector, np.float32),
                     difference=np.asarray(baseline.difference, np.float32))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / KIND_FILE).write_text(baseline.kind + "\n")
    return Path(out_dir)


def is_inference_baseline(path: str | Path) -> bool:
    """Whether `path` is a directory written by `save_inference_baseline` (it has a `kind` file)."""
    return (Path(path) / KIND_FILE).is_file()


def read_kind(path: str | Path) -> str:
    path = Path(path)
    try:
        kind = (path / KIND_FILE).read_text().strip()
    except OSError as e:
        raise CheckpointError(f"{path} is not an inference-time baseline directory (no readable '{KIND_FILE}' "
                              f"file: {e.strerror})") from None
    if kind not in INFERENCE_METHODS:
        raise CheckpointError(f"{path / KIND_FILE} names an unknown baseline {kind!r}")
    return kind


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        Coordinate(**meta["coordinate"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / META_FILE} is missing or corrupted: {e}") from None
    return meta


def load_inference_baseline(path: str | Path, backbone: Backbone | None = None) -> Backbone:
    """The base model with the saved baseline attached (a `Backbone`: run anything on it).

    `backbone` is the base model; None loads the model recorded at build time. A baseline built for
    another model (fingerprint mismatch) is refused with `CheckpointError`."""
    path = Path(path)
    kind = read_kind(path)
    meta = read_meta(path)
    if backbone is None:
        if not meta.get("model"):
            raise CheckpointError(f"{path} does not record its model; pass the base model")
        backbone = ports.load_pretrained(meta["model"])
    if meta["fingerprint"] != backbone.fingerprint():
        raise CheckpointError(f"the baseline in {path} was built for model {meta['fingerprint']}, not for this "
                              f"model ({backbone.fingerprint()}); rebuild it with `timerome unlearn` on this model")
    c = Coordinate(**meta["coordinate"])
    if kind == "random_memory":
        return backbone.without_edits().with_edits(mem.load(path / MEMORY_DIR, backbone).memory)
    try:
        with np.load(path / VECTOR_FILE) as arrays:
            vector = np.asarray(arrays["vector"], np.float32)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path / VECTOR_FILE} is missing or corrupted: {e}") from None
    return steer(backbone.without_edits(), vector, c.layer, c.module, float(meta["alpha"]))


__all__ = ["INFERENCE_METHODS", "InferenceBaseline", "build_inference_baseline", "caa_difference", "contrastive_sums",
           "is_inference_baseline", "load_inference_baseline", "random_coordinate", "random_memory", "read_kind",
           "read_meta", "save_inference_baseline", "steer", "steering_vector"]
