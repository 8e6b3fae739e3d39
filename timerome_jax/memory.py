"""The low-rank residual edit memory: closed-form ridge memory injected at every forward.

Definitions (DESIGN.md §3). At the traced coordinate (layer ℓ*, module m*, step k*):

* key k_i: the module's input at the last subject token of fact i at step k* of the clean run
  (mlp: input of the down projection [F]; attn: input of the output projection [N·H];
  resid: the residual stream itself [D]). For a mixture-of-experts MLP, whose experts have no
  shared down projection, the key is the mixture's input [D].
* target delta δ_i: mean over noise draws of (value_corrupted − value_clean) of the module's
  output at the same place — the change that makes the layer behave as if the subject were
  unknown. Gradient-free.
* Dual ridge form: G = K Kᵀ + λ̃ I (n × n, rows of K are keys), λ̃ = λ · mean_i ‖k_i‖².
  For a token with key x: c(x) = G⁻¹ K x; keep the q largest |c_j| (q = n: all);
  value ← value + α Δᵀ c_q(x). Without sparsification this is value + W x with
  W = α Δᵀ G⁻¹ K = α Δᵀ K (KᵀK + λ̃ I)⁻¹ in the primal form.

Covariance-regularised variant (beyond the paper; MEMIT / AlphaEdit's idea): replace λ̃ I in the
primal by λ̃ C, C the second moment of the module's keys over retain text, so the edit avoids the
directions retain inputs use. With C = L Lᵀ and whitening M = L⁻¹, KᵀK + λ̃ C = L (K̃ᵀK̃ + λ̃ I) Lᵀ
for whitened keys K̃ = K Mᵀ, hence W = α Δᵀ K (KᵀK + λ̃ C)⁻¹ = α Δᵀ (K̃K̃ᵀ + λ̃ I)⁻¹ K̃ M: the plain
dual memory of the whitened keys, with its readout mapped back to raw keys (A = G̃⁻¹ K̃ M). The
forward is unchanged (c = A x); λ̃ = λ · mean ‖k̃‖² stays scale-free.

Implementation choices (documented in docs/memory.md):
* The readout A = G⁻¹ K [n, d_k] is solved once (Cholesky, jitted) so a forward costs n·d_k +
  n·d per token and never solves or inverts anything.
* Two equal ways to solve it (push-through identity (K Kᵀ + λ̃ I)⁻¹ K = K (Kᵀ K + λ̃ I)⁻¹): the
  dual form factors the n × n G (O(n² d_k + n³)); the primal form the d_k × d_k Kᵀ K + λ̃ I
  (O(n d_k² + d_k³): linear in n). `build` picks the smaller system (form "auto"): the dual
  while the capacity is ≤ d_k, the primal beyond. A dual memory keeps G's Cholesky factor, a
  primal one P = (Kᵀ K + λ̃ I)⁻¹; each has its own incremental insertion.
* Buffers have a fixed capacity (a power of two ≥ n) with a validity mask: inserting facts up to
  the capacity changes array values, not shapes, so jitted forwards do not recompile.
* λ̃ is fixed when a memory is first built (`key_scale` = mean ‖k‖² of the initial keys, or a
  value the caller passes) and reused by insertions; an insertion then equals a batch build with
  the same `key_scale`, and costs O(n² + n·d_k) in the dual form (Schur-complement update of A and
  the Cholesky factor) or O(n·d_k + d_k²) in the primal (Sherman–Morrison update of P and A)
  instead of a fresh solve.
* The memory is applied through `flax.linen.intercept_methods` at (ℓ*, m*); the layer is data
  and the term is computed under `lax.cond`, so other layers pay nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from ports import Backbone
from ports.errors import CheckpointError
from ports.fileio import atomic_directory
from timerome_jax import sampler, tracing
from timerome_jax.errors import InputError

Array = jax.Array
MEMORY_FORMAT = "timerome-edit-memory"


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
    def capacity(self) -> int:
        return self.keys.shape[0]

    @property
    def form(self) -> str:
        """"dual" (G's Cholesky factor) or "primal" (P = (Kᵀ K + λ̃ I)⁻¹)."""
        return "dual" if self.cholesky is not None else "primal"

    @property
    def size(self) -> int:
        return int(jnp.sum(self.valid))

    def match(self, x_Nk: Array) -> Array:
        """Cosine of each key x [..., d_k] with its nearest stored key (whitened space) -> [...]."""
        x = x_Nk.astype(jnp.float32)
        if self.whitening is not None:
            x = jnp.einsum("...k,jk->...j", x, self.whitening)
        keys = self.keys / jnp.maximum(jnp.linalg.norm(self.keys, axis=-1, keepdims=True), 1e-12)
        cosine = jnp.einsum("...k,ck->...c", x, keys) / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return jnp.max(jnp.where(self.valid, cosine, -jnp.inf), axis=-1)

    def coefficients(self, x_Nk: Array, passes: Array | None = None) -> Array:
        """c_q(x) for keys x [..., d_k] -> [..., C] (top-q by magnitude, ties kept; zero where a
        gated memory's `match` is below its gate; `passes` [...] = that test, when already known)."""
        c = jnp.einsum("...k,ck->...c", x_Nk.astype(jnp.float32), self.readout)
        c = jnp.where(self.valid, c, 0.0)
        if self.gate is not None:
            passes = self.match(x_Nk) >= self.gate if passes is None else passes
            c = jnp.where(passes[..., None], c, 0.0)

        def sparsify(c):
            magnitude = jnp.where(self.valid, jnp.abs(c), -1.0)
            kth = jnp.sort(magnitude, axis=-1)[..., ::-1]
            threshold = jnp.take(kth, jnp.clip(self.q - 1, 0, self.capacity - 1), axis=-1)[..., None]
            return jnp.where(magnitude >= threshold, c, 0.0)

        # the per-token sort is the memory's main cost: skip it when nothing is dropped
        return jax.lax.cond((self.q > 0) & (self.q < jnp.sum(self.valid)), sparsify, lambda c: c, c)

    def term(self, x_Nk: Array) -> Array:
        """α Δᵀ c_q(x): the value added for keys x [..., d_k] -> [..., d]. A gated memory computes
        the match first and skips the read-out when no token of the call passes (the common case
        away from the edited facts: a third of the work)."""
        def full(x, passes=None):
            return self.alpha * jnp.einsum("...c,cd->...d", self.coefficients(x, passes), self.deltas)

        if self.gate is None:
            return full(x_Nk)
        passes = self.match(x_Nk) >= self.gate
        zero = jnp.zeros(x_Nk.shape[:-1] + self.deltas.shape[-1:], jnp.float32)
        return jax.lax.cond(jnp.any(passes), full, lambda x, passes: zero, x_Nk, passes)

    def primal_weight(self) -> Array:
        """W = α Δᵀ G⁻¹ K [d, d_k] (for tests and inspection; never used in the forward)."""
        return self.alpha * self.deltas.T @ self.readout


def check_steps(steps: Sequence[int], count: int, what: str) -> tuple[int, ...]:
    """`steps` as distinct ints in 0..count − 1 (at least one), or one error naming `what`."""
    steps = tuple(int(k) for k in steps)
    if not steps or len(set(steps)) != len(steps) or not all(0 <= k < count for k in steps):
        raise InputError(f"{what} must be distinct steps in 0..{count - 1}, got {list(steps)}")
    return steps


@dataclasses.dataclass(frozen=True)
class SamplerCapture:
    """Memory entries along the sampler's own trajectory (beyond the paper; docs/memory.md).

    The tracer's trajectory lays a fact out as prompt + its answer's length of masks and reveals
    the true answer; the sampler lays it out as prompt + `gen_length` masks and reveals its own
    proposals block by block. With bidirectional attention the subject's keys differ between the
    two, and a gated memory built from the tracer's states alone fires on a minority of the
    subject tokens of a generation (docs/RESULTS.md §9). With a SamplerCapture, each fact also
    gets entries in the unedited greedy sampler's states before `capture_steps` of its
    (`gen_length`, `steps`, `block_length`) schedule; use the schedule you generate with.
    `mentions` (with key positions "subject"): the subject's copies in the generated answer are
    subject tokens too, from the step they are revealed on (`workflow.sampler_states`); off by
    default: on tofu-tiny it added a third more entries and moved forget ROUGE-L by 0.002."""

    gen_length: int
    steps: int
    block_length: int
    capture_steps: tuple[int, ...]
    mentions: bool = False

    def __post_init__(self):
        sampler.check_schedule(self.gen_length, self.steps, self.block_length)
        object.__setattr__(self, "capture_steps", check_steps(self.capture_steps, self.steps, "sampler capture steps"))

    @classmethod
    def evenly(cls, count: int, *, gen_length: int, steps: int, block_length: int,
               mentions: bool = False) -> "SamplerCapture":
        """`count` steps spread evenly over the schedule, the first step included."""
        if not isinstance(count, (int, np.integer)) or not 1 <= count <= steps:
            raise InputError(f"the number of sampler steps to capture must lie in 1..{steps}, got {count}")
        return cls(gen_length, steps, block_length, tuple(int(k) for k in np.unique(
            np.floor(np.arange(count) * steps / count).astype(int))), mentions)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"capture_steps": list(self.capture_steps)}


@dataclasses.dataclass(frozen=True)
class MemoryRecord:
    """An EditMemory plus what it was built from and for (not a pytree; saved alongside)."""

    memory: EditMemory
    coordinate: tracing.Coordinate
    lam: float
    key_scale: float
    fact_ids: tuple[str, ...]      # one per entry (a fact captured at S steps has S entries)
    fingerprint: str
    capture_steps: tuple[int, ...] = ()   # steps its facts were captured at; () = (coordinate.step,)
    key_positions: str = "last"           # "last" subject token (the paper's) or every "subject" token
    sampler_capture: SamplerCapture | None = None   # also captured along the sampler's trajectory

    def __post_init__(self):
        if not self.capture_steps:
            object.__setattr__(self, "capture_steps", (self.coordinate.step,))

    def with_memory(self, memory: EditMemory, **changes) -> "MemoryRecord":
        return dataclasses.replace(self, memory=memory, **changes)


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


def whitening_from_moment(moment_kk: Array, *, shrinkage: float = 1e-2) -> np.ndarray:
    """M = L⁻¹ for C = L Lᵀ, C = the key second moment shrunk towards its mean eigenvalue,
    C ← C + shrinkage · (tr C / d_k) I (positive definite even from fewer tokens than d_k)."""
    moment = np.asarray(moment_kk, np.float64)
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


def build(keys_nk: Array, deltas_nd: Array, *, layer: int, module: str, alpha: float, lam: float,
          q: int | None = None, key_scale: float | None = None, capacity: int | None = None,
          whitening: Array | None = None, form: str = "auto") -> tuple[EditMemory, float]:
    """Batch build from raw keys [n, d_k] and deltas [n, d]. Returns (memory, key_scale).

    `whitening` M [d_k, d_k] (`whitening_from_moment`) gives the covariance-regularised memory;
    `key_scale` is then the mean ‖M k‖² of the whitened keys. `form` "dual", "primal" or "auto"
    (the smaller system: dual while the capacity is ≤ d_k); both give the same readout."""
    keys_nk, deltas_nd = np.asarray(keys_nk, np.float32), np.asarray(deltas_nd, np.float32)
    n = keys_nk.shape[0]
    check_hyperparameters(alpha, lam, q, n)
    if deltas_nd.shape[0] != n:
        raise InputError(f"{n} keys but {deltas_nd.shape[0]} deltas")
    if whitening is not None:
        whitening = np.asarray(whitening, np.float32)
        if whitening.shape != (keys_nk.shape[1],) * 2:
            raise InputError(f"the whitening must be [{keys_nk.shape[1]}, {keys_nk.shape[1]}] for keys of "
                             f"width {keys_nk.shape[1]}, got {list(whitening.shape)}")
        keys_nk = keys_nk @ whitening.T
    if key_scale is None:
        key_scale = float(np.mean(np.sum(keys_nk.astype(np.float64) ** 2, axis=1)))
    if not key_scale > 0:
        raise InputError("all keys are zero: the memory has nothing to match")
    cap = capacity or _capacity_for(n)
    form = _form_for(cap, keys_nk.shape[1], form)
    if form == "dual":
        check_capacity(cap)
    keys = np.zeros((cap, keys_nk.shape[1]), np.float32); keys[:n] = keys_nk
    deltas = np.zeros((cap, deltas_nd.shape[1]), np.float32); deltas[:n] = deltas_nd
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


def insert(memory: EditMemory, keys_nk: Array, deltas_nd: Array) -> EditMemory:
    """Sequential insertion of facts, one incremental update each (Schur complement in the dual
    form, Sherman–Morrison in the primal). The capacity doubles when full: one recompilation per
    doubling, not per fact; a dual memory whose capacity passes d_k becomes primal then."""
    keys_nk, deltas_nd = jnp.asarray(keys_nk, jnp.float32), jnp.asarray(deltas_nd, jnp.float32)
    if keys_nk.shape[0] != deltas_nd.shape[0] or keys_nk.shape[0] == 0:
        raise InputError("insert needs as many deltas as keys, and at least one fact")
    final = _capacity_for(memory.size + keys_nk.shape[0])
    if memory.form == "dual" and _form_for(final, memory.keys.shape[1]) == "dual":
        check_capacity(final)
    for key_k, delta_d in zip(keys_nk, deltas_nd):
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


def remove_facts(record: MemoryRecord, fact_ids: Sequence[str]) -> MemoryRecord:
    """Roll back the facts with these ids (as stored in the record)."""
    unknown = [f for f in fact_ids if f not in record.fact_ids]
    if unknown:
        raise InputError(f"fact id(s) not in this memory: {', '.join(unknown[:5])}")
    positions = [i for i, f in enumerate(record.fact_ids) if f in set(fact_ids)]
    kept = tuple(f for f in record.fact_ids if f not in set(fact_ids))
    return record.with_memory(remove(record.memory, positions), fact_ids=kept)


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


# --- injection ------------------------------------------------------------------------------

def _site(module: str, is_moe: bool) -> str:
    """The submodule whose call the memory wraps (its input is the key, its output the value)."""
    if module == "mlp":
        return "mlp" if is_moe else "down_proj"
    return {"attn": "o_proj", "resid": "resid"}[module]


def make_interceptor(memory: EditMemory, is_moe: bool):
    site = _site(memory.module, is_moe)

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or context.module.name != site:
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        key = out if memory.module == "resid" else args[0]
        key = key.reshape(key.shape[:2] + (-1,))  # o_proj input [B,T,N,H] -> [B,T,N·H]
        layer = kwargs["layer_index"]
        add = jax.lax.cond(layer == memory.layer, lambda k: memory.term(k).astype(out.dtype),
                           lambda k: jnp.zeros_like(out), key)
        return out + add

    return interceptor


def edited_apply(backbone: Backbone, memory: EditMemory | None, *args, **kwargs):
    """`backbone.apply(*args, **kwargs)` with the memory injected (enter inside your jit)."""
    if memory is None:
        return backbone.apply(*args, **kwargs)
    with nn.intercept_methods(make_interceptor(memory, backbone.config.is_moe)):
        return backbone.apply(*args, **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EditedBackbone(Backbone):
    """A Backbone whose every forward carries the memory: the sampler, the likelihoods, the
    tracer and the metrics take it wherever they take a Backbone, unchanged. The interceptor is
    entered by `Backbone.interception` inside `apply`/`embed`/`layer`/`head`, i.e. inside
    whatever jit calls them; the memory's arrays are pytree leaves, so another memory of the same
    capacity reuses the compiled code."""

    memory: EditMemory | None = None

    def interception(self):
        if self.memory is None:
            return super().interception()
        return nn.intercept_methods(make_interceptor(self.memory, self.config.is_moe))


def attach(backbone: Backbone, memory: EditMemory) -> EditedBackbone:
    """The backbone with the memory injected at every forward (weights untouched)."""
    base = backbone if type(backbone) is Backbone else Backbone(
        backbone.config, backbone.params, backbone.mask_token_id, backbone.dtype, backbone.source)
    return EditedBackbone(base.config, base.params, base.mask_token_id, base.dtype, base.source, memory=memory)


def make_stack_interceptor(memories: Sequence[EditMemory], is_moe: bool):
    """One interceptor applying every memory of `memories`, each at its own layer and site, as
    `make_interceptor` applies one. Memories at the same site read the same key (the site's
    unedited input; for resid its unedited output) and their terms add; a memory at a later
    layer sees the stream the earlier ones changed, as stacked weight edits would."""
    by_site: dict[str, list[EditMemory]] = {}
    for memory in memories:
        by_site.setdefault(_site(memory.module, is_moe), []).append(memory)

    def interceptor(next_fun, args, kwargs, context):
        here = by_site.get(context.module.name) if context.method_name == "__call__" else None
        if not here:
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        layer = kwargs["layer_index"]
        total = out
        # a static loop over the stack (a few memories); each term runs only at its own layer
        for memory in here:
            key = out if memory.module == "resid" else args[0]
            key = key.reshape(key.shape[:2] + (-1,))
            total = total + jax.lax.cond(layer == memory.layer, lambda k, m=memory: m.term(k).astype(out.dtype),
                                         lambda k: jnp.zeros_like(out), key)
        return total

    return interceptor


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EditedStack(Backbone):
    """A Backbone carrying several memories at once (e.g. one per (layer, module) of per-fact
    coordinates), all applied by one interceptor at every forward, like `EditedBackbone`. The
    memories are a tuple of pytrees: another stack of the same modules and capacities reuses the
    compiled code."""

    memories: tuple[EditMemory, ...] = ()

    def interception(self):
        if not self.memories:
            return super().interception()
        return nn.intercept_methods(make_stack_interceptor(self.memories, self.config.is_moe))


def attach_stack(backbone: Backbone, memories: Sequence[EditMemory]) -> EditedStack:
    """The backbone with every memory of `memories` injected at every forward (weights untouched).
    A stack of one memory computes exactly what `attach` does."""
    memories = tuple(memories)
    if not memories:
        raise InputError("a memory stack needs at least one memory")
    n_layers = backbone.config.n_layers
    for i, memory in enumerate(memories):
        if not isinstance(memory, EditMemory):
            raise InputError(f"memory {i} of the stack is a {type(memory).__name__}, not an EditMemory")
        if not 0 <= int(memory.layer) < n_layers:
            raise InputError(f"memory {i} of the stack acts at layer {int(memory.layer)}, outside 0..{n_layers - 1}")
    base = backbone if type(backbone) is Backbone else Backbone(
        backbone.config, backbone.params, backbone.mask_token_id, backbone.dtype, backbone.source)
    return EditedStack(base.config, base.params, base.mask_token_id, base.dtype, base.source, memories=memories)


# --- capture of keys and deltas -----------------------------------------------------------------

def _capture_apply(backbone: Backbone, module: str, ids_1T: Array, mask_1T: Array,
                   iv: tracing.Intervention | None, window: int):
    """Forward that returns (key [L, T, d_k], value [L, T, d]) of `module` at every layer."""
    site = _site(module, backbone.config.is_moe)

    def sow_key(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name == site:
            key = out if module == "resid" else args[0]
            context.module.sow("intermediates", "edit_key", key.reshape(key.shape[:2] + (-1,)))
            context.module.sow("intermediates", "edit_value", out)
        return out

    variables = {"params": backbone.params}
    def run():
        return backbone.module.apply(variables, ids_1T, mask_1T, mutable=["intermediates"])
    with nn.intercept_methods(sow_key):
        if iv is None:
            _, state = run()
        else:
            with nn.intercept_methods(tracing.make_interceptor(iv, window)):
                _, state = run()
    found = {}
    def visit(tree):
        for name, value in tree.items():
            if name in ("edit_key", "edit_value"):
                found[name] = value[0]
            elif isinstance(value, dict):
                visit(value)
    visit(state["intermediates"])
    return found["edit_key"][:, 0], found["edit_value"][:, 0]


KEY_POSITIONS = ("last", "subject")


def check_key_positions(positions: str) -> str:
    if positions not in KEY_POSITIONS:
        raise InputError(f"key positions must be one of {', '.join(KEY_POSITIONS)}, got {positions!r}")
    return positions


def _keys_and_deltas_at_state(backbone: Backbone, module: str, layer: Array, state_T: Array, am_T: Array,
                              pos_S: Array, valid_S: Array, noise_RSD: Array, positions: str) -> tuple[Array, Array]:
    """One fact's key(s) and delta(s) in one denoising state (the shared core of both captures)."""
    S, D = noise_RSD.shape[1:]
    clean_key, clean_value = _capture_apply(backbone, module, state_T[None], am_T[None], None, 1)

    def corrupted(noise_SD):
        iv = tracing.Intervention(pos_S, valid_S, noise_SD, jnp.int32(-1), jnp.int32(0),
                                  jnp.zeros((backbone.config.n_layers, 3, S, D)))
        return _capture_apply(backbone, module, state_T[None], am_T[None], iv, 1)[1][layer][pos_S]

    delta_SD = jnp.mean(jax.vmap(corrupted)(noise_RSD), axis=0) - clean_value[layer][pos_S]
    key_SK = clean_key[layer][pos_S]
    if positions == "subject":
        return key_SK, delta_SD
    last = jnp.sum(valid_S) - 1
    return key_SK[last], delta_SD[last]


@functools.partial(jax.jit, static_argnames=("module", "step", "trace_steps", "noise_samples", "noise_scale",
                                             "positions"))
def capture_keys_and_deltas(backbone: Backbone, batch: tracing.TraceBatch, sigma: Array, key: Array, *,
                            layer: Array, module: str, step: int, trace_steps: int = 8, noise_samples: int = 10,
                            noise_scale: float = 3.0, positions: str = "last") -> tuple[Array, Array]:
    """k_i and δ_i for every fact of `batch` at (layer, module, step).

    positions "last" (the paper's): the last subject token, keys [F, d_k], deltas [F, d].
    positions "subject" (beyond the paper): every subject token, keys [F, S, d_k], deltas [F, S, d]
    (S = the batch's subject width; entries where `batch.subject_valid_FS` is False are padding).
    The last subject token alone carries only part of what the corruption removes: the earlier
    subject tokens stay clean and later layers read the name from them (docs/memory.md).

    The clean trajectory is the teacher-forced one of the tracer with `trace_steps` steps K (the
    state at `step` is the tracer's x_step, about step/K of the answer revealed; only the first
    step + 1 steps run); δ averages value_corrupted − value_clean over `noise_samples` draws whose
    keys follow the tracer's (fold_in of the fact index, then the draw), so a trace and a memory
    built with the same key see the same noise.
    """
    if not 0 <= step < trace_steps:
        raise InputError(f"step {step} is outside 0..{trace_steps - 1} (a {trace_steps}-step trajectory)")
    check_key_positions(positions)
    S = batch.subject_pos_FS.shape[1]
    D = backbone.config.d_model
    noise = tracing.noise_draws(key, batch.fact_index_F, noise_samples, (S, D)) * (noise_scale * sigma)

    def one_fact(ids, am, ans, pos_S, valid, noise_RSD):
        states, _, _, _ = tracing.clean_run(backbone, ids, am, ans, pos_S, trace_steps, upto=step + 1)
        return _keys_and_deltas_at_state(backbone, module, layer, states[step], am, pos_S, valid, noise_RSD,
                                         positions)

    return jax.vmap(one_fact)(batch.input_ids_FT, batch.attention_mask_FT, batch.answer_mask_FT,
                              batch.subject_pos_FS, batch.subject_valid_FS, noise)


@functools.partial(jax.jit, static_argnames=("module", "noise_samples", "noise_scale", "positions"))
def capture_at_states(backbone: Backbone, states_FT: Array, attention_mask_FT: Array, subject_pos_FS: Array,
                      subject_valid_FS: Array, fact_index_F: Array, sigma: Array, key: Array, *, layer: Array,
                      module: str, noise_samples: int = 10, noise_scale: float = 3.0,
                      positions: str = "last") -> tuple[Array, Array]:
    """`capture_keys_and_deltas` in given denoising states instead of the tracer's: row f of
    `states_FT` is any sequence (e.g. a prompt followed by a sampler's partly denoised answer, see
    `workflow.capture_along_sampler`) whose subject sits at `subject_pos_FS[f]`. The noise of fact
    f is the tracer's draw for `fact_index_F[f]`, whatever the state. Same output shapes."""
    check_key_positions(positions)
    S = subject_pos_FS.shape[1]
    noise = tracing.noise_draws(key, fact_index_F, noise_samples, (S, backbone.config.d_model)) * (noise_scale * sigma)

    def one_fact(state_T, am_T, pos_S, valid_S, noise_RSD):
        return _keys_and_deltas_at_state(backbone, module, layer, state_T, am_T, pos_S, valid_S, noise_RSD,
                                         positions)

    return jax.vmap(one_fact)(states_FT, attention_mask_FT, subject_pos_FS, subject_valid_FS, noise)


def _token_keys(backbone: Backbone, ids_BT: Array, mask_BT: Array, layer: Array, module: str) -> Array:
    """The module's keys at `layer` for every token of every row [B, T, d_k] (float32)."""
    def one(ids_T, mask_T):
        return _capture_apply(backbone, module, ids_T[None], mask_T[None], None, 1)[0][layer]

    return jax.vmap(one)(ids_BT, mask_BT).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("module",))
def key_second_moment(backbone: Backbone, ids_BT: Array, mask_BT: Array, take_BT: Array, *, layer: Array,
                      module: str) -> tuple[Array, Array]:
    """(Σ x xᵀ [d_k, d_k], number of tokens) of the module's keys x at `layer` over the tokens
    where `take_BT` is set (the statistic C of the covariance-regularised memory, per chunk)."""
    keys_BTk = jnp.where(take_BT[..., None], _token_keys(backbone, ids_BT, mask_BT, layer, module), 0.0)
    return jnp.einsum("btk,btl->kl", keys_BTk, keys_BTk), jnp.sum(take_BT)


@jax.jit
def match_scores(backbone: Backbone, memory: EditMemory, ids_BT: Array, mask_BT: Array) -> Array:
    """`memory.match` of every token's key at the memory's site [B, T] (to calibrate a gate)."""
    return memory.match(_token_keys(backbone, ids_BT, mask_BT, memory.layer, memory.module))


# --- persistence ------------------------------------------------------------------------------

def save(record: MemoryRecord, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Atomic save: orbax arrays + memory.json; a killed save leaves the previous memory intact."""
    import orbax.checkpoint as ocp

    m = record.memory
    arrays = {"layer": m.layer, "keys": m.keys, "deltas": m.deltas, "valid": m.valid, "readout": m.readout,
              "alpha": m.alpha, "ridge": m.ridge, "q": m.q}
    if m.form == "dual":
        arrays["cholesky"] = m.cholesky
    else:
        arrays["inverse"] = m.inverse
    if m.whitening is not None:
        arrays["whitening"] = m.whitening
    if m.gate is not None:
        arrays["gate"] = m.gate
    meta = {"format": MEMORY_FORMAT, "version": 1, "module": m.module, "capacity": m.capacity, "form": m.form,
            "covariance_regularised": m.whitening is not None, "gated": m.gate is not None,
            "key_dim": int(m.keys.shape[1]), "value_dim": int(m.deltas.shape[1]),
            "coordinate": record.coordinate.as_dict(), "lam": record.lam, "key_scale": record.key_scale,
            "fact_ids": list(record.fact_ids), "fingerprint": record.fingerprint, "size": m.size,
            "capture_steps": list(record.capture_steps), "key_positions": record.key_positions,
            "sampler_capture": None if record.sampler_capture is None else record.sampler_capture.as_dict()}
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
        coordinate = tracing.Coordinate(**meta["coordinate"])
        positions = meta.get("key_positions", "last")   # memories saved before it was recorded
        if positions not in KEY_POSITIONS:
            raise ValueError(f"key_positions {positions!r}")
        sampler_capture = meta.get("sampler_capture")
        sampler_capture = None if sampler_capture is None else SamplerCapture(**sampler_capture)
        form = meta.get("form", "dual")                 # memories saved before the primal form existed
        if form not in ("dual", "primal"):
            raise ValueError(f"form {form!r}")
    except (OSError, ValueError, KeyError, TypeError, InputError) as e:
        raise CheckpointError(f"{meta_path} is corrupted: {e}") from None
    if backbone is not None and meta["fingerprint"] != backbone.fingerprint():
        raise CheckpointError(
            f"the memory in {path} was built for model {meta['fingerprint']}, not for this model "
            f"({backbone.fingerprint()}); rebuild it with `timerome edit` on this model")
    f32, i32 = jnp.float32, jnp.int32
    target = {"layer": jax.ShapeDtypeStruct((), i32), "keys": jax.ShapeDtypeStruct((cap, dk), f32),
              "deltas": jax.ShapeDtypeStruct((cap, dv), f32), "valid": jax.ShapeDtypeStruct((cap,), bool),
              "readout": jax.ShapeDtypeStruct((cap, dk), f32),
              "alpha": jax.ShapeDtypeStruct((), f32), "ridge": jax.ShapeDtypeStruct((), f32),
              "q": jax.ShapeDtypeStruct((), i32)}
    if form == "dual":
        target["cholesky"] = jax.ShapeDtypeStruct((cap, cap), f32)
    else:
        target["inverse"] = jax.ShapeDtypeStruct((dk, dk), f32)
    if meta.get("covariance_regularised", False):
        target["whitening"] = jax.ShapeDtypeStruct((dk, dk), f32)
    if meta.get("gated", False):
        target["gate"] = jax.ShapeDtypeStruct((), f32)
    try:
        arrays = ocp.StandardCheckpointer().restore((path / "arrays").absolute(), target)
    except Exception as e:  # orbax raises many types for damaged files
        raise CheckpointError(f"the memory arrays in {path} are corrupted or incomplete "
                              f"({type(e).__name__})") from None
    memory = EditMemory(module=meta["module"], **{"cholesky": None, **arrays})
    if memory.size != meta.get("size"):
        raise CheckpointError(f"{path}: memory.json says {meta.get('size')} facts, the arrays hold {memory.size}")
    return MemoryRecord(memory=memory, coordinate=coordinate, lam=float(meta["lam"]),
                        key_scale=float(meta["key_scale"]), fact_ids=tuple(meta["fact_ids"]),
                        fingerprint=meta["fingerprint"], capture_steps=tuple(meta.get("capture_steps", ())),
                        key_positions=positions, sampler_capture=sampler_capture)
