"""Training-time unlearning baselines on the masked-diffusion loss (DESIGN.md §5), with optax.

The exact objectives, defaults, optimiser, minibatching and convergence rules are in
docs/baselines.md; the notation used here: a row b is a QA pair laid out by `suites.encode_rows`,
NLL_θ(b) = Σ_{j masked ∧ scored} −log p_θ(y_j | x_noisy) / p_b over one draw of the forward
process (`masking.forward_process`), n(b) its number of scored tokens and ℓ_θ(S) = mean_b
NLL_θ(b) / n(b) (LLaDA's SFT loss). Objectives (γ forget weight, α retain weight):

* gradascent: −γ ℓ_θ(F);  graddiff: −γ ℓ_θ(F) + α ℓ_θ(R);
* npo: γ (2/β) mean_b softplus(β [NLL_ref(b) − NLL_θ(b)]) + α ℓ_θ(R) (paired masks);
* simnpo: γ (2/β) mean_b softplus(−β [NLL_θ(b)/n(b) − δ]) + α ℓ_θ(R);
* rmu: γ A(h_θ(F), c u) + α A(h_θ(R), h_frozen(R)) on layer ℓ's residual stream, training only the
  weights that write the MLP site of layers ℓ−2..ℓ; c = 2 × the mean activation norm by default.

A run stops on the first of 'target', 'plateau' (after `min_epochs`), 'max_steps' or 'diverged',
judged on ForgetLP (MC-ELBO, one fixed key) every `eval_every` steps; its cost is measured.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ports import Backbone, Site
from timerome_jax import likelihood, resources
from timerome_jax.errors import InputError
from timerome_jax.masking import forward_process, token_logits
from timerome_jax.suites import Rows

Array = jax.Array

TRAINING_METHODS = ("gradascent", "graddiff", "npo", "simnpo", "rmu")
USES_REFERENCE = ("npo", "rmu")

# (γ forget weight, α retain weight, β) per method; None = not used.
DEFAULTS = {
    "gradascent": dict(forget_weight=1.0, retain_weight=0.0, beta=None),
    "graddiff": dict(forget_weight=1.0, retain_weight=1.0, beta=None),
    "npo": dict(forget_weight=1.0, retain_weight=1.0, beta=0.1),
    "simnpo": dict(forget_weight=0.125, retain_weight=1.0, beta=4.5),
    "rmu": dict(forget_weight=1.0, retain_weight=1.0, beta=None),
}
RMU_COEFF = 2.0
RMU_TRAINED_LAYERS = 3  # ℓ−2, ℓ−1, ℓ


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """Training rows on device: ids / attention [B, T] int32, noise / score masks [B, T] bool."""

    input_ids: Array
    attention_mask: Array
    noise_mask: Array
    score_mask: Array

    @classmethod
    def of(cls, rows: Rows, index: np.ndarray | None = None) -> "Batch":
        arrays = rows.training_arrays()
        if index is not None:
            arrays = tuple(a[index] for a in arrays)
        return cls(*(jnp.asarray(a) for a in arrays))


@dataclasses.dataclass(frozen=True)
class Objective:
    """The static description of a loss (hashable: one compilation per objective and shape)."""

    method: str
    forget_weight: float
    retain_weight: float
    beta: float | None = None
    delta: float = 0.0
    rmu_layer: int | None = None
    rmu_coeff: float = RMU_COEFF
    rmu_scale: str = "relative"

    @property
    def uses_retain(self) -> bool:
        return self.retain_weight != 0.0

    @property
    def uses_reference(self) -> bool:
        return self.method in USES_REFERENCE


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the model and the data. `None` = the method's default."""

    method: str
    lr: float = 1e-5
    max_steps: int = 200
    batch_size: int = 8
    seed: int = 0
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    forget_weight: float | None = None
    retain_weight: float | None = None
    beta: float | None = None
    delta: float = 0.0
    rmu_layer: int | None = None
    rmu_coeff: float = RMU_COEFF
    rmu_scale: str = "relative"
    eval_every: int | None = None
    patience: int = 3
    tol: float = 0.1
    min_epochs: float = 5.0
    target_drop: float | None = None
    mc_samples: int = 4
    monitor_retain: bool = False
    eval_batch_size: int = 64

    def validate(self, n_layers: int | None = None) -> None:
        if self.method not in TRAINING_METHODS:
            raise InputError(f"unknown training method {self.method!r}; choose one of {', '.join(TRAINING_METHODS)}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"the learning rate must be a finite number > 0, got {self.lr}")
        for name in ("max_steps", "batch_size", "patience", "mc_samples", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise InputError(f"{flag} must be an integer >= 1, got {value!r}")
        if self.eval_every is not None and (not isinstance(self.eval_every, int) or self.eval_every < 1):
            raise InputError(f"--eval-every must be an integer >= 1, got {self.eval_every!r}")
        for name in ("weight_decay", "clip_norm", "tol", "delta", "rmu_coeff", "min_epochs"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(f"--{name.replace('_', '-')} must be finite")
        if self.weight_decay < 0 or self.clip_norm <= 0 or self.tol < 0 or self.min_epochs < 0:
            raise InputError("weight decay, tolerance and minimum epochs must be >= 0 and the clip norm > 0")
        for name in ("forget_weight", "retain_weight"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise InputError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.beta is not None and (not math.isfinite(self.beta) or self.beta <= 0):
            raise InputError(f"--beta must be a finite number > 0, got {self.beta}")
        if self.target_drop is not None and (not math.isfinite(self.target_drop) or self.target_drop <= 0):
            raise InputError(f"--target-drop must be a finite number > 0 (nats), got {self.target_drop}")
        if self.rmu_scale not in ("relative", "absolute"):
            raise InputError(f"--rmu-scale must be 'relative' or 'absolute', got {self.rmu_scale!r}")
        if not math.isfinite(self.rmu_coeff) or self.rmu_coeff <= 0:
            raise InputError(f"--rmu-coeff must be a finite number > 0, got {self.rmu_coeff}")
        if n_layers is not None and self.rmu_layer is not None and not 0 <= self.rmu_layer < n_layers:
            raise InputError(f"--rmu-layer must lie in 0..{n_layers - 1}, got {self.rmu_layer}")

    def objective(self, n_layers: int) -> Objective:
        self.validate(n_layers)
        d = DEFAULTS[self.method]
        beta = self.beta if self.beta is not None else d["beta"]
        return Objective(
            method=self.method,
            forget_weight=float(self.forget_weight if self.forget_weight is not None else d["forget_weight"]),
            retain_weight=float(self.retain_weight if self.retain_weight is not None else d["retain_weight"]),
            beta=None if beta is None else float(beta), delta=float(self.delta),
            rmu_layer=(self.rmu_layer if self.rmu_layer is not None else n_layers // 2) if self.method == "rmu" else None,
            rmu_coeff=float(self.rmu_coeff), rmu_scale=self.rmu_scale)


# --- losses -----------------------------------------------------------------------------------

def row_nll(backbone: Backbone, key: Array, batch: Batch, eps: float = 1e-3) -> tuple[Array, Array]:
    """(NLL_θ(b) [B], n(b) [B]): per-row masked-diffusion NLL estimate on the scored tokens and the
    number of scored tokens (see the module docstring). The masks depend only on `key`."""
    noisy, masked, p_mask = forward_process(key, batch.input_ids, batch.noise_mask, backbone.mask_token_id, eps)
    logits = token_logits(backbone, noisy, batch.attention_mask)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_nll = -jnp.take_along_axis(log_probs, batch.input_ids[..., None], axis=-1)[..., 0]
    weighted = jnp.where(masked & batch.score_mask, token_nll / p_mask[:, None], 0.0)
    return jnp.sum(weighted, axis=-1), jnp.sum(batch.score_mask, axis=-1)


def sft_loss(backbone: Backbone, key: Array, batch: Batch) -> Array:
    """ℓ_θ: mean over rows of NLL_θ(b) / n(b)."""
    nll, count = row_nll(backbone, key, batch)
    return jnp.mean(nll / jnp.maximum(count, 1))


def residual_activations(backbone: Backbone, key: Array, batch: Batch, layer: int, eps: float = 1e-3) -> Array:
    """Block-output activations [B, T, D] (float32) of `layer` on the noised rows (same masks as
    `row_nll` for the same key)."""
    noisy, _, _ = forward_process(key, batch.input_ids, batch.noise_mask, backbone.mask_token_id, eps)
    _, (resid,) = backbone.apply(noisy, batch.attention_mask, capture=(Site(layer, "resid"),))
    return resid.value.astype(jnp.float32)


def activation_mse(h_BTD: Array, target_BTD: Array, mask_BT: Array) -> Array:
    """A(h, g, m) = mean_b [Σ_t m_bt mean_d (h − g)² / Σ_t m_bt] (open-unlearning's RMU loss)."""
    per_token = jnp.mean((h_BTD - target_BTD) ** 2, axis=-1)
    per_row = jnp.sum(jnp.where(mask_BT, per_token, 0.0), axis=-1) / jnp.maximum(jnp.sum(mask_BT, axis=-1), 1)
    return jnp.mean(per_row)


def control_vector(key: Array, d_model: int, coeff: float) -> Array:
    """c u: u_d ~ U[0, 1) normalised to unit length (RMU), times the steering coefficient c."""
    u = jax.random.uniform(key, (d_model,), jnp.float32)
    return coeff * u / jnp.linalg.norm(u)


@functools.partial(jax.jit, static_argnames=("layer",))
def _activation_norms(backbone: Backbone, key: Array, batch: Batch, row_valid: Array, *, layer: int):
    """(Σ ‖h_ℓ‖ over the scored tokens of the valid rows, their number) for one chunk of rows."""
    norms = jnp.linalg.norm(residual_activations(backbone, key, batch, layer), axis=-1)
    take = batch.score_mask & row_valid[:, None]
    return jnp.sum(jnp.where(take, norms, 0.0)), jnp.sum(take)


def activation_scale(backbone: Backbone, key: Array, rows: Rows, layer: int, chunk: int) -> float:
    """s = mean ‖h_ℓ‖ of the model over the scored tokens of `rows` (noised by the forward process
    with `key`), in chunks of `chunk` rows (one compilation)."""
    total, count = 0.0, 0
    for start in range(0, rows.num_rows, chunk):
        index = np.arange(start, start + chunk)
        s, n = _activation_norms(backbone, key, Batch.of(rows, index % rows.num_rows),
                                 jnp.asarray(index < rows.num_rows), layer=layer)
        total, count = total + float(s), count + int(n)
    return total / max(count, 1)


def objective_terms(objective: Objective, backbone: Backbone, reference: Backbone | None, key: Array,
                    forget: Batch, retain: Batch | None, control: Array | None) -> tuple[Array, dict]:
    """(L, terms) for one step; terms holds the forget and retain parts (for logging and tests)."""
    o = objective
    k_forget, k_retain = jax.random.split(key)
    terms: dict[str, Array] = {}
    if o.method == "rmu":
        h = residual_activations(backbone, k_forget, forget, o.rmu_layer)
        forget_term = activation_mse(h, jnp.broadcast_to(control, h.shape), forget.score_mask)
        retain_term = jnp.zeros((), jnp.float32)
        if o.uses_retain:
            h_r = residual_activations(backbone, k_retain, retain, o.rmu_layer)
            h_ref = jax.lax.stop_gradient(residual_activations(reference, k_retain, retain, o.rmu_layer))
            retain_term = activation_mse(h_r, h_ref, retain.score_mask)
    else:
        if o.method in ("gradascent", "graddiff"):
            forget_term = -sft_loss(backbone, k_forget, forget)
        elif o.method == "npo":
            nll, _ = row_nll(backbone, k_forget, forget)
            nll_ref, _ = row_nll(reference, k_forget, forget)
            log_ratio = jax.lax.stop_gradient(nll_ref) - nll  # log π_θ − log π_ref, paired masks
            forget_term = (2.0 / o.beta) * jnp.mean(jax.nn.softplus(o.beta * log_ratio))
            terms["log_ratio"] = jnp.mean(log_ratio)
        elif o.method == "simnpo":
            nll, count = row_nll(backbone, k_forget, forget)
            per_token = nll / jnp.maximum(count, 1) - o.delta
            forget_term = (2.0 / o.beta) * jnp.mean(jax.nn.softplus(-o.beta * per_token))
        else:
            raise ValueError(f"unknown method {o.method!r}")
        retain_term = sft_loss(backbone, k_retain, retain) if o.uses_retain else jnp.zeros((), jnp.float32)
    terms.update(forget=forget_term, retain=retain_term)
    return o.forget_weight * forget_term + o.retain_weight * retain_term, terms


# --- what is trained ---------------------------------------------------------------------------

def trainable_layout(backbone: Backbone, objective: Objective) -> tuple[tuple[int, ...], tuple]:
    """(indices of trained leaves in `jax.tree.leaves(params)`, per trained leaf a layer mask
    (tuple of L 0/1 or None = every element)). RMU trains the weights that write the MLP site's
    value (the down projections, stacked over layers) of layers ℓ−2..ℓ."""
    n_layers = backbone.config.n_layers
    leaves = jax.tree.leaves(backbone.params)
    if objective.method != "rmu":
        return tuple(range(len(leaves))), tuple(None for _ in leaves)
    layers = [l for l in range(objective.rmu_layer - RMU_TRAINED_LAYERS + 1, objective.rmu_layer + 1) if l >= 0]
    mask = tuple(1.0 if l in layers else 0.0 for l in range(n_layers))
    index = backbone.writer_weights("mlp")
    if not index:
        raise InputError("RMU needs the MLP down-projection, which this backbone's parameters lack")
    return index, tuple(mask for _ in index)


def _apply_layer_masks(tree: list, masks: tuple) -> list:
    out = []
    for x, m in zip(tree, masks):
        if m is None:
            out.append(x)
        else:
            mask = jnp.asarray(m, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            out.append(x * mask)
    return out


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float
    weight_decay: float
    clip_norm: float

    def build(self) -> optax.GradientTransformation:
        return optax.chain(optax.clip_by_global_norm(self.clip_norm),
                           optax.adamw(self.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=self.weight_decay))


def _merge(treedef, frozen: list, trained: list, index: tuple[int, ...]) -> Any:
    leaves, t, f = [], iter(trained), iter(frozen)
    chosen = set(index)
    for i in range(len(frozen) + len(trained)):
        leaves.append(next(t) if i in chosen else next(f))
    return jax.tree.unflatten(treedef, leaves)


@functools.partial(jax.jit, static_argnames=("objective", "optim", "index", "masks", "treedef"),
                   donate_argnames=("trained", "opt_state"))
def _train_step(skeleton: Backbone, trained: list, frozen: list, opt_state, reference_params, key, forget: Batch,
                retain: Batch | None, control, *, objective: Objective, optim: Optim, index, masks, treedef):
    reference = None if reference_params is None else dataclasses.replace(skeleton, params=reference_params)

    def loss_fn(trained_leaves):
        model = dataclasses.replace(skeleton, params=_merge(treedef, frozen, trained_leaves, index))
        return objective_terms(objective, model, reference, key, forget, retain, control)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    grads = _apply_layer_masks(grads, masks)
    updates, opt_state = optim.build().update(grads, opt_state, trained)
    updates = _apply_layer_masks(updates, masks)
    return optax.apply_updates(trained, updates), opt_state, loss, terms, optax.tree.norm(grads)


@functools.partial(jax.jit, static_argnames=("mc_samples", "batch_size"))
def _mean_answer_lp(backbone: Backbone, prompt_ids, prompt_mask, answer_ids, answer_mask, key, *,
                    mc_samples: int, batch_size: int):
    return jnp.mean(likelihood.answer_log_likelihood(backbone, prompt_ids, prompt_mask, answer_ids, answer_mask,
                                                     key, method="mc_elbo", mc_samples=mc_samples,
                                                     batch_size=batch_size))


def _estimator_args(rows: Rows):
    return tuple(jnp.asarray(a, jnp.int32) for a in (rows.prompt_ids, rows.prompt_mask, rows.answer_ids,
                                                        rows.answer_mask))


class RowStream:
    """`batch_size` row indices per step: seeded permutations, one per epoch, read in order."""

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.n, self.b = num_rows, batch_size
        self.rng = np.random.default_rng(seed)
        self.buffer = np.zeros((0,), np.int64)

    def next(self) -> np.ndarray:
        while len(self.buffer) < self.b:
            self.buffer = np.concatenate([self.buffer, self.rng.permutation(self.n)])
        out, self.buffer = self.buffer[: self.b], self.buffer[self.b:]
        return out


# --- the run ------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
    params: Any
    stats: dict


def _stop_reason(forget_lp: list[float], config: TrainConfig, plateau_allowed: bool = True) -> str | None:
    e = len(forget_lp) - 1
    if e < 1:
        return None
    if config.target_drop is not None and forget_lp[0] - forget_lp[e] >= config.target_drop:
        return "target"
    if plateau_allowed and e >= config.patience and forget_lp[e - config.patience] - forget_lp[e] < config.tol:
        return "plateau"
    return None


def train(backbone: Backbone, forget: Rows, retain: Rows | None, config: TrainConfig,
          progress: Callable[[dict], None] | None = None,
          checkpoint: Callable[[int, Backbone], dict] | None = None) -> TrainResult:
    """Run one training-time baseline to convergence (module docstring). Returns the new params
    (same tree structure, shapes and dtypes) and the statistics written to train_stats.json.

    `checkpoint(step, model)`, when given, is called at every evaluation (step 0 included) with the
    model of that step; the dict it returns joins that evaluation's row (an early-stopped
    checkpoint's own scores, e.g. on held-out sets), and its time is reported apart
    (`checkpoint_seconds`), outside the training and evaluation costs."""
    L = backbone.config.n_layers
    objective = config.objective(L)
    if objective.uses_retain and retain is None:
        raise InputError(f"{config.method} uses a retain set (retain weight {objective.retain_weight:g}); "
                         "pass --num-retain >= 1 or --retain-weight 0")
    if backbone.mask_token_id is None:
        raise InputError("the model has no mask token id")
    steps_per_epoch = forget.num_rows / config.batch_size
    eval_every = config.eval_every or max(1, math.ceil(steps_per_epoch))
    min_steps = math.ceil(config.min_epochs * steps_per_epoch)
    root = jax.random.key(config.seed)
    train_key, eval_key, control_key = (jax.random.fold_in(root, i) for i in range(3))
    control, rmu_target = None, {}
    setup_start = time.perf_counter()
    if objective.method == "rmu":
        scale = (activation_scale(backbone, control_key, forget, objective.rmu_layer, config.batch_size)
                 if objective.rmu_scale == "relative" else 1.0)
        control = control_vector(control_key, backbone.config.d_model, objective.rmu_coeff * scale)
        rmu_target = {"rmu_activation_norm": scale if objective.rmu_scale == "relative" else None,
                      "rmu_target_norm": objective.rmu_coeff * scale}
    setup_seconds = time.perf_counter() - setup_start  # RMU's activation scale (compiled and run)

    leaves, treedef = jax.tree.flatten(backbone.params)
    index, masks = trainable_layout(backbone, objective)
    # copies: the step donates (reuses) the buffers of the trained leaves and the optimiser state,
    # while the caller's backbone (and the reference, for NPO / RMU) keeps the original arrays
    trained = [jnp.array(leaves[i], copy=True) for i in index]
    frozen = [x for i, x in enumerate(leaves) if i not in set(index)]
    optim = Optim(float(config.lr), float(config.weight_decay), float(config.clip_norm))
    opt_state = optim.build().init(trained)
    reference_params = backbone.params if objective.uses_reference else None
    skeleton = dataclasses.replace(backbone, params=None)
    forget_stream = RowStream(forget.num_rows, config.batch_size, config.seed)
    retain_stream = RowStream(retain.num_rows, config.batch_size, config.seed + 1) if objective.uses_retain else None
    use_retain = objective.uses_retain
    static = dict(objective=objective, optim=optim, index=index, masks=masks, treedef=treedef)

    def batches():
        f = Batch.of(forget, forget_stream.next())
        r = Batch.of(retain, retain_stream.next()) if use_retain else None
        return f, r

    forget_est = _estimator_args(forget)
    retain_est = _estimator_args(retain) if retain is not None and config.monitor_retain else None
    est_static = dict(mc_samples=config.mc_samples, batch_size=config.eval_batch_size)

    # ahead-of-time compilation, timed on its own
    t0 = time.perf_counter()
    f0 = Batch.of(forget, np.arange(config.batch_size) % forget.num_rows)  # shapes only
    r0 = Batch.of(retain, np.arange(config.batch_size) % retain.num_rows) if use_retain else None
    step_fn = _train_step.lower(skeleton, trained, frozen, opt_state, reference_params, train_key, f0, r0, control,
                                **static).compile()
    est_fns = {"forget": _mean_answer_lp.lower(backbone, *forget_est, eval_key, **est_static).compile()}
    if retain_est is not None:
        est_fns["retain"] = _mean_answer_lp.lower(backbone, *retain_est, eval_key, **est_static).compile()
    compile_seconds = time.perf_counter() - t0

    evaluations: list[dict] = []
    losses: list[float] = []
    train_seconds = eval_seconds = 0.0
    stop_reason = None

    checkpoint_seconds = 0.0

    def evaluate(step: int, params) -> None:
        nonlocal eval_seconds, checkpoint_seconds
        start = time.perf_counter()
        model = dataclasses.replace(backbone, params=params)
        row = {"step": step, "forget_lp": float(est_fns["forget"](model, *forget_est, eval_key))}
        if "retain" in est_fns:
            row["retain_lp"] = float(est_fns["retain"](model, *retain_est, eval_key))
        eval_seconds += time.perf_counter() - start
        if checkpoint is not None:
            start = time.perf_counter()
            row.update(checkpoint(step, model))
            checkpoint_seconds += time.perf_counter() - start
        evaluations.append(row)
        if progress:
            progress(row)

    step = 0
    with resources.Measure() as measure:
        evaluate(0, backbone.params)
        while stop_reason is None:
            step += 1
            f, r = batches()
            start = time.perf_counter()
            trained, opt_state, loss, terms, grad_norm = step_fn(
                skeleton, trained, frozen, opt_state, reference_params, jax.random.fold_in(train_key, step), f, r,
                control)
            loss = float(loss)
            train_seconds += time.perf_counter() - start
            losses.append(loss)
            if not math.isfinite(loss):
                stop_reason = "diverged"
            elif step % eval_every == 0 or step == config.max_steps:
                evaluate(step, _merge(treedef, frozen, trained, index))
                stop_reason = _stop_reason([e["forget_lp"] for e in evaluations], config, step >= min_steps)
            if stop_reason is None and step >= config.max_steps:
                stop_reason = "max_steps"
    params = _merge(treedef, frozen, trained, index)
    if stop_reason == "diverged" and evaluations[-1]["step"] != step:
        evaluate(step, params)
    cost = measure.as_dict()
    first, last = evaluations[0], evaluations[-1]
    stats = {
        "method": config.method,
        "objective": dataclasses.asdict(objective), **rmu_target,
        "config": dataclasses.asdict(config),
        "optimizer": {"name": "adamw", "lr": config.lr, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                      "weight_decay": config.weight_decay, "clip_by_global_norm": config.clip_norm,
                      "schedule": "constant"},
        "trained_parameters": int(sum(leaves[i].size if m is None else leaves[i].size // L * int(sum(m))
                                      for i, m in zip(index, masks))),
        "total_parameters": int(sum(int(np.prod(x.shape)) for x in leaves)),
        "num_forget": forget.num_rows, "num_retain": 0 if retain is None else retain.num_rows,
        "forget_ids": list(forget.ids), "retain_ids": [] if retain is None else list(retain.ids),
        "steps": step, "epochs": step * config.batch_size / forget.num_rows, "eval_every": eval_every,
        "stop_reason": stop_reason, "converged": stop_reason in ("plateau", "target"),
        "convergence_rule": {"metric": "ForgetLP (mean MC-ELBO answer log-likelihood, nats per QA, fixed key)",
                             "mc_samples": config.mc_samples, "patience": config.patience, "tol": config.tol,
                             "min_steps": min_steps,
                             "target_drop": config.target_drop, "max_steps": config.max_steps},
        "forget_lp_initial": first["forget_lp"], "forget_lp_final": last["forget_lp"],
        "forget_lp_drop": first["forget_lp"] - last["forget_lp"],
        "retain_lp_initial": first.get("retain_lp"), "retain_lp_final": last.get("retain_lp"),
        "evaluations": evaluations, "loss_curve": losses,
        "setup_seconds": setup_seconds, "compile_seconds": compile_seconds, "wall_clock_seconds": cost["seconds"],
        "train_seconds": train_seconds, "eval_seconds": eval_seconds, "checkpoint_seconds": checkpoint_seconds,
        "seconds_per_step": train_seconds / max(step, 1),
        "peak_memory": cost, "device": resources.device_description(),
    }
    return TrainResult(params=params, stats=stats)


__all__ = ["Batch", "DEFAULTS", "Objective", "TRAINING_METHODS", "TrainConfig", "TrainResult", "activation_mse",
           "control_vector", "objective_terms", "residual_activations", "row_nll", "sft_loss", "train",
           "trainable_layout"]
