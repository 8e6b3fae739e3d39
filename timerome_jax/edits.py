"""The generic edits of the method layer (`ports.sites`): pytrees with a site and a pure function.

* `RowEdit`: add to, or replace, the value at a few token positions (the corruption noise on the
  subject embeddings, the TIE patch that restores clean activations at the subject).
* `Steering`: value + α·v at every position (activation steering, CAA).

The edit memory (`timerome_jax.memory.EditMemory`) is the third kind. Any of them attaches to a
backbone with `backbone.with_edits(...)` or acts in one call with `backbone.apply(edits=...)`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ports import Site

Array = jax.Array


def scatter_rows(x_BTD: Array, positions_S: Array, valid_S: Array, rows_SD: Array) -> Array:
    """x with row positions_S[s] replaced by rows_SD[s] wherever valid_S[s].

    A gather + select rather than a scatter, so that padded slots (which repeat a position) can
    never overwrite a real one and restored values are bit-exact copies."""
    T = x_BTD.shape[1]
    hit_TS = (jnp.arange(T)[:, None] == positions_S[None, :]) & valid_S[None, :]
    source_T = jnp.argmax(hit_TS, axis=1)
    take_T = jnp.any(hit_TS, axis=1)
    return jnp.where(take_T[None, :, None], rows_SD[source_T][None].astype(x_BTD.dtype), x_BTD)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowEdit:
    """At `site`, the rows `positions_S` (where `valid_S`) of the value become `rows_SD`
    (`add=False`) or value + `rows_SD` (`add=True`; the rows of batch row 0 are used, as every
    forward that carries one is a single sequence)."""

    site: Site
    positions_S: Array
    valid_S: Array
    rows_SD: Array
    add: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def __call__(self, key_BTI: Array, value_BTD: Array) -> Array:
        rows = value_BTD[0, self.positions_S] + self.rows_SD.astype(value_BTD.dtype) if self.add else self.rows_SD
        return scatter_rows(value_BTD, self.positions_S, self.valid_S, rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Steering:
    """value ← value + α·vector [D] at `site`, at every position (α = 0: bit-identical)."""

    site: Site
    vector_D: Array
    alpha: Array

    def __call__(self, key_BTI: Array, value_BTD: Array) -> Array:
        return jax.lax.cond(self.alpha != 0, lambda v: v + (self.alpha * self.vector_D).astype(v.dtype),
                            lambda v: v, value_BTD)


__all__ = ["RowEdit", "Steering", "scatter_rows"]
