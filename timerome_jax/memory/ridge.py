"""The ridge algebra of the edit memory (DESIGN.md §3; docs/memory.md derives every step).

Entries are keys k_i [I] and deltas δ_i [D] (`memory.capture`). The dual ridge form: G = K Kᵀ + λ̃ I
(rows of K are keys), λ̃ = λ · mean_i ‖k_i‖²; for a token with key x, c(x) = G⁻¹ K x, keep the q
largest |c_j| (q = 0: all), value ← value + α Δᵀ c_q(x). Without sparsification this is value + W x
with W = α Δᵀ K (KᵀK + λ̃ I)⁻¹. The covariance-regularised variant (λ̃ C instead of λ̃ I) is the same
memory on whitened keys K̃ = K Mᵀ (C = L Lᵀ, M = L⁻¹), its readout mapped back to raw keys.

Implementation choices:
* the readout A = G⁻¹ K [C, I] is solved once (jitted Cholesky), so a forward never solves;
* two equal solves (push-through identity): the dual factors the C × C G, the primal the I × I
  KᵀK + λ̃ I; `build` picks the smaller ("auto"). Insertion updates either incrementally (Schur
  complement / Sherman–Morrison) instead of re-solving, with λ̃ fixed at the first build;
* buffers have a fixed capacity C (a power of two) and a validity mask: insertions change values,
  not shapes, so jitted forwards do not recompile;
* an `EditMemory` is an edit (`ports.sites`) at (ℓ*, m*): `backbone.with_edits(memory)`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from ports import Site
from timerome_jax.errors import InputError

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EditMemory:
    """Everything a forward needs, as arrays (a pytree: a new memory of the same capacity and
    module reuses compiled code). `module` is the only static field.

    layer: int32 []; keys [C, d_k]; deltas [C, d]; valid [C] bool; readout [C, d_k] = G⁻¹ K (zero
    on invalid rows); the factorisation, by form: dual memories hold `cholesky` [C, C], the lower
    factor of G (identity on invalid rows), primal ones `inverse` [d_k, d_k] = (Kᵀ K + λ̃ I)⁻¹;
    alpha, ridge (λ̃, absolute) float32 []; q int32 [] (0 = keep every coefficient).
    Covariance-regularised memories also hold `whitening` [d_k, d_k] = M = L⁻¹ (C = L Lᵀ); their
    `keys` are then the whitened keys K̃ = K Mᵀ and `readout` = G̃⁻¹ K̃ M still reads raw keys.
    Plain ridge memories have `whitening` None.
    Gated memories (beyond the paper) also hold `gate` float32 [] = τ: the term is added only at
    tokens whose key has cosine ≥ τ with its nearest stored key (in the whitened space when
    `whitening` is set), so inputs unlike every edited fact pass unchanged. `gate` None = the
    paper's memory, which acts on every token.
    """

    layer: Array
    keys: Array
    deltas: Array
    valid: Array
    cholesky: Array | None
    readout: Array
    alpha: Array
    ridge: Array
    q: Array
    whitening: Array | None = None
    gate: Array | None = None
    inverse: Array | None = None
    module: str = dataclasses.field(metadata=dict(static=True), default="mlp")

    @property
    def site(self) -> Site:
        return Site(self.layer, self.module)

    def __call__(self, key_BTI: Array, value_BTD: Array) -> Array:
        """The edit: value + α Δᵀ c_q(key) at every token (`ports.sites`)."""
        return value_BTD + self.term(key_BTI).astype(value_BTD.dtype)

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    @property
    def form(self) -> str:
        """"dual" (G's Cholesky factor) or "primal" (P = (Kᵀ K + λ̃ I)⁻¹)."""
        return "dual" if self.cholesky is not None else "primal"

    @property
    def size(self) -> int:
        return int(jnp.sum(self.valid))

    def match(self, x_I: Array) -> Array:
        """Cosine of each key x [..., d_k] with its nearest stored key (whitened space) -> [...]."""
        x = x_I.astype(jnp.float32)
        if self.whitening is not None:
            x = jnp.einsum("...k,jk->...j", x, self.whitening)
        keys = self.keys / jnp.maximum(jnp.linalg.norm(self.keys, axis=-1, keepdims=True), 1e-12)
        cosine = jnp.einsum("...k,ck->...c", x, keys) / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return jnp.max(jnp.where(self.valid, cosine, -jnp.inf), axis=-1)

    def coefficients(self, x_I: Array, passes: Array | None = None) -> Array:
        """c_q(x) for keys x [..., d_k] -> [..., C] (top-q by magnitude, ties kept; zero where a
        gated memory's `match` is below its gate; `passes` [...] = that test, when already known)."""
        c = jnp.einsum("...k,ck->...c", x_I.astype(jnp.float32), self.readout)
        c = jnp.where(self.valid, c, 0.0)
        if self.gate is not None:
            passes = self.match(x_I) >= self.gate if passes is None else passes
            c = jnp.where(passes[..., None], c, 0.0)

        def sparsify(c):
            magnitude = jnp.where(self.valid, jnp.abs(c), -1.0)
            kth = jnp.sort(magnitude, axis=-1)[..., ::-1]
            threshold = jnp.take(kth, jnp.clip(self.q - 1, 0, self.capacity - 1), axis=-1)[..., None]
            return jnp.where(magnitude >= threshold, c, 0.0)

        # the per-token sort is the memory's main cost: skip it when nothing is dropped
        return jax.lax.cond((self.q > 0) & (self.q < jnp.sum(self.valid)), sparsify, lambda c: c, c)

    def term(self, x_I: Array) -> Array:
        """α Δᵀ c_q(x): the value added for keys x [..., d_k] -> [..., d]. A gated memory computes
        the match first and skips the read-out when no token of the call passes (the common case
        away from the edited facts: a third of the work)."""
        def full(x, passes=None):
            return self.alpha * jnp.einsum("...c,cd->...d", self.coefficients(x, passes), self.deltas)

        if self.gate is None:
            return full(x_I)
        passes = self.match(x_I) >= self.gate
        zero = jnp.zeros(x_I.shape[:-1] + self.deltas.shape[-1:], jnp.float32)
        return jax.lax.cond(jnp.any(passes), full, lambda x, passes: zero, x_I, passes)

    def primal_weight(self) -> Array:
        """W = α Δᵀ G⁻¹ K [d, d_k] (for tests and inspection; never used in the forward)."""
        return self.alpha * self.deltas.T @ self.readout


# --- hyperparameter checks ------------------------------------------------------------------

def check_hyperparameters(alpha: float, lam: float, q: int | None, n: int) -> None:
    if not np.isfinite(alpha) or alpha < 0:
        raise InputError(f"alpha must be a finite number >= 0, got {alpha}")
    if not np.isfinite(lam) or lam <= 0:
        raise InputError(f"lambda (ridge) must be a finite number > 0, got {lam}")
    if n < 1:
        raise InputError("the edit memory needs at least one fact")
    if q is not None and not 1 <= q <= n:
        raise InputError(f"q must lie in 1..n = 1..{n} (number of memory entries), got {q}")


# The dual form holds capacity × capacity float32 matrices (G's Cholesky factor, its solve). At
# capacity 32,768 (4 GiB each) XLA's CPU Cholesky crashed the process with a segmentation fault
# (jax 0.10.2, measured 2026-11-24); 16,384 (1 GiB) builds in ~19 s on 2 cores. The primal form
# (the default beyond capacity d_k) holds d_k × d_k matrices and has no such limit.
MAX_CAPACITY = 16_384


def _capacity_for(n: int) -> int:
    return max(8, 1 << (n - 1).bit_length())


def check_capacity(capacity: int) -> None:
    """Refuse a dual-form memory past MAX_CAPACITY."""
    if capacity > MAX_CAPACITY:
        raise InputError(
            f"a dual-form edit memory of capacity {capacity:,} entries needs {capacity:,}² float32 matrices "
            f"({capacity ** 2 * 4 / 2 ** 30:.0f} GiB each); the limit is {MAX_CAPACITY:,} entries. Build it in the "
            f"primal form (form='primal', or 'auto'), which solves a key-width system instead")


# --- build / insert / remove ------------------------------------------------------------------

@jax.jit
def _solve(keys: Array, valid: Array, ridge: Array, whitening: Array | None = None) -> tuple[Array, Array]:
    """Cholesky factor of G = K Kᵀ + λ̃ I (identity on invalid rows) and readout G⁻¹ K (· M when
    the keys are whitened, so the readout reads raw keys)."""
    k = jnp.where(valid[:, None], keys, 0.0)
    gram = k @ k.T + ridge * jnp.eye(keys.shape[0])
    gram = jnp.where(valid[:, None] & valid[None, :], gram, jnp.eye(keys.shape[0]))
    chol = jnp.linalg.cholesky(gram)
    readout = jsl.cho_solve((chol, True), k)
    return chol, readout if whitening is None else readout @ whitening


@jax.jit
def _solve_primal(keys: Array, valid: Array, ridge: Array, whitening: Array | None = None) -> tuple[Array, Array]:
    """P = (Kᵀ K + λ̃ I)⁻¹ [d_k, d_k] and the readout K P (· M for whitened keys) [C, d_k]: the
    dual readout G⁻¹ K by the push-through identity, in O(C d_k² + d_k³)."""
    k = jnp.where(valid[:, None], keys, 0.0)
    eye = jnp.eye(keys.shape[1])
    chol = jnp.linalg.cholesky(k.T @ k + ridge * eye)
    chol_inv = jsl.solve_triangular(chol, eye, lower=True)
    inverse = chol_inv.T @ chol_inv          # P = L⁻ᵀ L⁻¹, symmetric by construction
    # one [C, d_k] × [d_k, d_k] product instead of two triangular solves with C right-hand sides:
    # 3× faster at C = 1024, d_k = 256 on 2 CPU cores, the same readout to ~1e-6 relative
    readout = k @ inverse
    return inverse, readout if whitening is None else readout @ whitening


FORMS = ("auto", "dual", "primal")


def _form_for(capacity: int, key_dim: int, form: str = "auto") -> str:
    """The form a memory of this capacity is solved in: "auto" = the smaller linear system."""
    if form not in FORMS:
        raise InputError(f"the memory form must be one of {', '.join(FORMS)}, got {form!r}")
    if form == "auto":
        return "primal" if capacity > key_dim else "dual"
    return form


def _factorise(keys: Array, valid: Array, ridge: Array, whitening: Array | None, form: str) -> dict:
    """The fields a memory of this form holds for these (stored, whitened) keys."""
    if form == "dual":
        chol, readout = _solve(keys, valid, ridge, whitening)
        return {"cholesky": chol, "inverse": None, "readout": readout}
    inverse, readout = _solve_primal(keys, valid, ridge, whitening)
    return {"cholesky": None, "inverse": inverse, "readout": readout}


def whitening_from_moment(moment_II: Array, *, shrinkage: float = 1e-2) -> np.ndarray:
    """M = L⁻¹ for C = L Lᵀ, C = the key second moment shrunk towards its mean eigenvalue,
    C ← C + shrinkage · (tr C / d_k) I (positive definite even from fewer tokens than d_k)."""
    moment = np.asarray(moment_II, np.float64)
    if moment.ndim != 2 or moment.shape[0] != moment.shape[1]:
        raise InputError(f"a key second moment must be a square matrix, got shape {moment.shape}")
    if not np.all(np.isfinite(moment)) or not np.allclose(moment, moment.T, rtol=1e-5, atol=1e-6 * np.abs(moment).max()):
        raise InputError("a key second moment must be a finite symmetric matrix")
    if not np.isfinite(shrinkage) or shrinkage <= 0:
        raise InputError(f"the covariance shrinkage must be a finite number > 0, got {shrinkage}")
    scale = np.trace(moment) / moment.shape[0]
    if not scale > 0:
        raise InputError("the key second moment has no positive trace: no retain keys were collected")
    regularised = moment + shrinkage * scale * np.eye(moment.shape[0])
    try:
        chol = np.linalg.cholesky(regularised)
    except np.linalg.LinAlgError:
        raise InputError("the key second moment is not positive semi-definite") from None
    return np.linalg.solve(chol, np.eye(moment.shape[0])).astype(np.float32)


def build(keys_EI: Array, deltas_ED: Array, *, layer: int, module: str, alpha: float, lam: float,
          q: int | None = None, key_scale: float | None = None, capacity: int | None = None,
          whitening: Array | None = None, form: str = "auto") -> tuple[EditMemory, float]:
    """Batch build from raw keys [n, d_k] and deltas [n, d]. Returns (memory, key_scale).

    `whitening` M [d_k, d_k] (`whitening_from_moment`) gives the covariance-regularised memory;
    `key_scale` is then the mean ‖M k‖² of the whitened keys. `form` "dual", "primal" or "auto"
    (the smaller system: dual while the capacity is ≤ d_k); both give the same readout."""
    keys_EI, deltas_ED = np.asarray(keys_EI, np.float32), np.asarray(deltas_ED, np.float32)
    n = keys_EI.shape[0]
    check_hyperparameters(alpha, lam, q, n)
    if deltas_ED.shape[0] != n:
        raise InputError(f"{n} keys but {deltas_ED.shape[0]} deltas")
    if whitening is not None:
        whitening = np.asarray(whitening, np.float32)
        if whitening.shape != (keys_EI.shape[1],) * 2:
            raise InputError(f"the whitening must be [{keys_EI.shape[1]}, {keys_EI.shape[1]}] for keys of "
                             f"width {keys_EI.shape[1]}, got {list(whitening.shape)}")
        keys_EI = keys_EI @ whitening.T
    if key_scale is None:
        key_scale = float(np.mean(np.sum(keys_EI.astype(np.float64) ** 2, axis=1)))
    if not key_scale > 0:
        raise InputError("all keys are zero: the memory has nothing to match")
    cap = capacity or _capacity_for(n)
    form = _form_for(cap, keys_EI.shape[1], form)
    if form == "dual":
        check_capacity(cap)
    keys = np.zeros((cap, keys_EI.shape[1]), np.float32); keys[:n] = keys_EI
    deltas = np.zeros((cap, deltas_ED.shape[1]), np.float32); deltas[:n] = deltas_ED
    valid = np.arange(cap) < n
    ridge = jnp.float32(lam * key_scale)
    whitening = None if whitening is None else jnp.asarray(whitening)
    factors = _factorise(jnp.asarray(keys), jnp.asarray(valid), ridge, whitening, form)
    memory = EditMemory(layer=jnp.int32(layer), keys=jnp.asarray(keys), deltas=jnp.asarray(deltas),
                        valid=jnp.asarray(valid), alpha=jnp.float32(alpha), ridge=ridge, q=jnp.int32(q or 0),
                        whitening=whitening, module=module, **factors)
    return memory, key_scale


@jax.jit
def _insert_one(memory: EditMemory, key_k: Array, delta_d: Array) -> EditMemory:
    """Add one fact in O(C² + C·d_k): block Cholesky and Schur-complement update of G⁻¹ K.
    Whitened memories work on k̃ = M k; their readout row is mapped back by M (kᵀ MᵀM = k̃ᵀ M)."""
    n = jnp.sum(memory.valid)
    if memory.whitening is not None:
        key_k = memory.whitening @ key_k
    k_valid = jnp.where(memory.valid[:, None], memory.keys, 0.0)
    g = jnp.where(memory.valid, k_valid @ key_k, 0.0)            # K k_new     [C]
    gamma = key_k @ key_k + memory.ridge                          # ‖k‖² + λ̃
    l_row = jsl.solve_triangular(memory.cholesky, g, lower=True)  # L⁻¹ g
    schur = gamma - l_row @ l_row                                 # s = γ − gᵀ G⁻¹ g
    b = jsl.solve_triangular(memory.cholesky.T, l_row, lower=False)  # G⁻¹ g
    read_k = key_k if memory.whitening is None else key_k @ memory.whitening
    u = (read_k - memory.readout.T @ g) / schur                   # new readout row
    readout = memory.readout - jnp.outer(b, u)
    readout = readout.at[n].set(u)
    chol = memory.cholesky.at[n].set(jnp.where(jnp.arange(memory.capacity) < n, l_row, 0.0))
    chol = chol.at[n, n].set(jnp.sqrt(schur))
    return dataclasses.replace(memory, keys=memory.keys.at[n].set(key_k), deltas=memory.deltas.at[n].set(delta_d),
                               valid=memory.valid.at[n].set(True), cholesky=chol, readout=readout)


@jax.jit
def _insert_one_primal(memory: EditMemory, key_k: Array, delta_d: Array) -> EditMemory:
    """Add one fact to a primal memory in O(C·d_k + d_k²) (Sherman–Morrison): with b = P k and
    s = 1 + kᵀ b, P ← P − b bᵀ / s, old readout rows A ← A − (K b)(bᵀ M) / s, new row bᵀ M / s."""
    n = jnp.sum(memory.valid)
    if memory.whitening is not None:
        key_k = memory.whitening @ key_k
    b = memory.inverse @ key_k
    s = 1.0 + key_k @ b
    kb = jnp.where(memory.valid, jnp.where(memory.valid[:, None], memory.keys, 0.0) @ b, 0.0)
    read_b = b if memory.whitening is None else b @ memory.whitening
    readout = (memory.readout - jnp.outer(kb, read_b) / s).at[n].set(read_b / s)
    return dataclasses.replace(memory, keys=memory.keys.at[n].set(key_k), deltas=memory.deltas.at[n].set(delta_d),
                               valid=memory.valid.at[n].set(True), inverse=memory.inverse - jnp.outer(b, b) / s,
                               readout=readout)


def _grow(memory: EditMemory, capacity: int) -> EditMemory:
    """The memory at a larger capacity, in the form `_form_for` picks for it (a dual memory that
    outgrows d_k is re-solved once in the primal form)."""
    pad = capacity - memory.capacity
    grown = dataclasses.replace(
        memory, keys=jnp.pad(memory.keys, ((0, pad), (0, 0))), deltas=jnp.pad(memory.deltas, ((0, pad), (0, 0))),
        valid=jnp.pad(memory.valid, (0, pad)), readout=jnp.pad(memory.readout, ((0, pad), (0, 0))))
    form = _form_for(capacity, memory.keys.shape[1])
    if memory.form == "dual" and form == "primal":
        return dataclasses.replace(grown, **_factorise(grown.keys, grown.valid, memory.ridge, memory.whitening, form))
    if memory.form == "dual":
        chol = jnp.eye(capacity).at[: memory.capacity, : memory.capacity].set(memory.cholesky)
        return dataclasses.replace(grown, cholesky=chol)
    return grown


def insert(memory: EditMemory, keys_EI: Array, deltas_ED: Array) -> EditMemory:
    """Sequential insertion of facts, one incremental update each (Schur complement in the dual
    form, Sherman–Morrison in the primal). The capacity doubles when full: one recompilation per
    doubling, not per fact; a dual memory whose capacity passes d_k becomes primal then."""
    keys_EI, deltas_ED = jnp.asarray(keys_EI, jnp.float32), jnp.asarray(deltas_ED, jnp.float32)
    if keys_EI.shape[0] != deltas_ED.shape[0] or keys_EI.shape[0] == 0:
        raise InputError("insert needs as many deltas as keys, and at least one fact")
    final = _capacity_for(memory.size + keys_EI.shape[0])
    if memory.form == "dual" and _form_for(final, memory.keys.shape[1]) == "dual":
        check_capacity(final)
    for key_k, delta_d in zip(keys_EI, deltas_ED):
        if memory.size == memory.capacity:
            memory = _grow(memory, 2 * memory.capacity)
        memory = (_insert_one if memory.form == "dual" else _insert_one_primal)(memory, key_k, delta_d)
    return memory


def remove(memory: EditMemory, indices: Sequence[int]) -> EditMemory:
    """Roll back facts (by position in the memory): equals a build without them (same λ̃)."""
    n = memory.size
    drop = set(int(i) for i in indices)
    if not drop or not drop <= set(range(n)):
        raise InputError(f"facts to remove must be positions in 0..{n - 1}")
    keep = [i for i in range(n) if i not in drop]
    if not keep:
        raise InputError("removing every fact leaves an empty memory; delete the memory instead")
    keys = np.zeros_like(np.asarray(memory.keys)); keys[: len(keep)] = np.asarray(memory.keys)[keep]
    deltas = np.zeros_like(np.asarray(memory.deltas)); deltas[: len(keep)] = np.asarray(memory.deltas)[keep]
    valid = np.arange(memory.capacity) < len(keep)
    factors = _factorise(jnp.asarray(keys), jnp.asarray(valid), memory.ridge, memory.whitening, memory.form)
    q = memory.q if int(memory.q) <= len(keep) else jnp.int32(len(keep))
    return dataclasses.replace(memory, keys=jnp.asarray(keys), deltas=jnp.asarray(deltas), valid=jnp.asarray(valid),
                               q=q, **factors)


def with_hyperparameters(memory: EditMemory, alpha: float | None = None, q: int | None = None) -> EditMemory:
    """Same memory, other α or q (no re-solve; λ needs a rebuild)."""
    n = memory.size
    check_hyperparameters(float(memory.alpha) if alpha is None else alpha, 1.0, q, n)
    changes = {}
    if alpha is not None:
        changes["alpha"] = jnp.float32(alpha)
    if q is not None:
        changes["q"] = jnp.int32(q)
    return dataclasses.replace(memory, **changes)


def with_gate(memory: EditMemory, gate: float | None) -> EditMemory:
    """Same memory, gated at cosine τ = `gate` (in [-1, 1]); None removes the gate."""
    if gate is None:
        return dataclasses.replace(memory, gate=None)
    if not np.isfinite(gate) or not -1.0 <= gate <= 1.0:
        raise InputError(f"the gate is a cosine threshold in [-1, 1], got {gate}")
    return dataclasses.replace(memory, gate=jnp.float32(gate))


def check_gate_rate(rate: float, what: str = "the gate rate") -> float:
    """A gate rate is a fraction in (0, 1); `what` names it in the error (e.g. a CLI flag)."""
    if not np.isfinite(rate) or not 0.0 < rate < 1.0:
        raise InputError(f"{what} must be a fraction in (0, 1), got {rate}")
    return rate


def gate_for_rate(match_scores: np.ndarray, rate: float) -> float:
    """τ such that a fraction `rate` of the given keys' match scores reach it (the (1 − rate)
    quantile): with retain keys, the share of retain tokens the gated memory still edits."""
    scores = np.asarray(match_scores, np.float64).ravel()
    check_gate_rate(rate)
    if scores.size == 0:
        raise InputError("no retain keys to calibrate the gate on")
    return float(np.clip(np.quantile(scores, 1.0 - rate), -1.0, 1.0))


__all__ = ["EditMemory", "FORMS", "MAX_CAPACITY", "build", "check_capacity", "check_gate_rate",
           "check_hyperparameters", "gate_for_rate", "insert", "remove", "whitening_from_moment", "with_gate",
           "with_hyperparameters"]
