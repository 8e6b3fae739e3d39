"""The masked-diffusion sampler (LLaDA's `generate`), batched, as one `lax.scan` inside one jit.

Layout. A batch is `prompt_ids_BP` (left-padded; `prompt_mask_BP` is 1 on real tokens) followed by
G answer positions, all attended. The sampler starts with every answer position masked and runs K
steps; step k belongs to block `k // (K / num_blocks)` (semi-autoregressive blocks of length
`block_length`), runs one forward, proposes a token for every answer position and reveals
`reveal_counts(...)[k]` of the still-masked positions of the current block. Revealed positions are
never masked again.

Choices (see docs/diffusion.md):
  * Proposals never take the mask token (its logit is excluded from the argmax); the confidence of a
    proposal is still its probability under the full softmax.
  * Sampling at temperature tau > 0 is Gumbel-argmax of `logits / tau + g`, which is LLaDA's
    `exp(logits) / (-log u) ** tau` in log space (float32 instead of float64).
  * Ties in confidence go to the earlier position (a stable sort), as DESIGN.md asks for tracing.
  * Randomness is per row: `key` is one PRNG key (split into B row keys) or B keys. Row b's noise at
    step k is one uniform draw from `fold_in(row_keys[b], k)` over the G answer positions (Gumbel
    noise and random-remasking scores both come from it), so a row's result does not depend on the
    batch it is in or on its padding.

Two kinds of entry points:
  * pure, traceable functions (`sample`, `denoise_step`, `answer_logits`, ...): call them inside your
    own `jax.jit`, e.g. with a `flax.linen.intercept_methods` context entered inside the traced
    function. They are deliberately not jitted: a jitted inner function caches its trace and would
    silently ignore an interceptor entered around a later call.
  * `sample_jit`: the host-side entry point; validates concrete arrays (no empty prompt) and runs the
    compiled sampler. It refuses traced arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ports import Backbone
from timerome_jax import masking
from timerome_jax.errors import InputError
from timerome_jax.tokenization import pad_left

Array = jax.Array

REMASKING = ("low_confidence", "random")


# ----------------------------------------------------------------------------- schedule

SCHEDULE_FILE = "generation_config.json"   # in a model directory: its recommended gen_length, steps, block_length
DEFAULT_SCHEDULE = {"gen_length": 128, "steps": 128, "block_length": 32}


def recommended_schedule(backbone: Backbone) -> dict:
    """The (gen_length, steps, block_length) the model's directory recommends in
    `generation_config.json` (LLaDA's `generate` argument names; other keys ignored), else
    `DEFAULT_SCHEDULE`. Answers can depend on the schedule: the embedded models were checked at
    the one they record."""
    import json
    from pathlib import Path

    path = Path(backbone.source or "") / SCHEDULE_FILE
    if not backbone.source or not path.is_file():
        return dict(DEFAULT_SCHEDULE)
    try:
        found = json.loads(path.read_text())
        schedule = {k: int(found.get(k, v)) for k, v in DEFAULT_SCHEDULE.items()}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise InputError(f"{path} is not a valid generation config: {e}") from None
    check_schedule(**schedule)
    return schedule


def check_schedule(gen_length: int, steps: int, block_length: int) -> int:
    """Validate the (G, K, B) triple and return the number of blocks G // B."""
    for name, value in (("gen length", gen_length), ("steps", steps), ("block length", block_length)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if gen_length % block_length:
        raise InputError(f"gen length {gen_length} is not divisible by block length {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise InputError(f"steps {steps} is not divisible by the number of blocks {num_blocks} "
                         f"(gen length {gen_length} / block length {block_length})")
    return num_blocks


def linear_counts(total, steps: int):
    """The linear schedule: how many of `total` tokens each of `steps` steps reveals — total // steps
    each, the remainder to the first steps (LLaDA's `get_num_transfer_tokens`). int32 [steps];
    `total` may be a traced scalar (the tracer's answer length): numpy for a Python int, jnp else."""
    xp = np if isinstance(total, (int, np.integer)) else jnp
    k = xp.arange(steps)
    return (total // steps + (k < total % steps)).astype(xp.int32)


def reveal_counts(gen_length: int, steps: int, block_length: int) -> np.ndarray:
    """How many tokens each sampler step reveals: int32 [K]. Each block gets K / num_blocks steps
    and the `linear_counts` of its `block_length` tokens."""
    num_blocks = check_schedule(gen_length, steps, block_length)
    return np.tile(linear_counts(block_length, steps // num_blocks), num_blocks)


def step_blocks(gen_length: int, steps: int, block_length: int) -> np.ndarray:
    """The block each step works on: int32 [K]."""
    num_blocks = check_schedule(gen_length, steps, block_length)
    return (np.arange(steps) // (steps // num_blocks)).astype(np.int32)


def check_remasking(remasking: str) -> None:
    if remasking not in REMASKING:
        raise InputError(f"unknown remasking {remasking!r}; choose one of {', '.join(REMASKING)}")


def check_sequence_length(backbone: Backbone, prompt_length: int, answer_length: int) -> None:
    """Prompt + answer must fit the model's maximum length; the prompt must not be empty."""
    if prompt_length < 1:
        raise InputError("the prompt is empty: at least one prompt token is needed")
    total = prompt_length + answer_length
    limit = backbone.config.max_seq_len
    if total > limit:
        raise InputError(f"prompt of {prompt_length} tokens + answer of {answer_length} tokens = "
                         f"{total} exceeds the model's maximum length {limit}")


def check_temperature(temperature) -> None:
    if not (isinstance(temperature, (int, float, np.number)) and float(temperature) >= 0.0):
        raise InputError(f"temperature must be a number >= 0, got {temperature!r}")


def check_mask_token(backbone: Backbone) -> int:
    if backbone.mask_token_id is None:
        raise InputError("the model has no mask token id; pass mask_token_id to load_pretrained")
    return int(backbone.mask_token_id)


# ----------------------------------------------------------------------------- keys

def typed_keys(key: Array) -> Array:
    """`key` as typed PRNG key(s): raw `PRNGKey` uint32 [..., 2] arrays are wrapped."""
    key = key if isinstance(key, jax.Array) else jnp.asarray(key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype != jnp.uint32 or key.ndim not in (1, 2) or key.shape[-1] != 2:
        raise InputError(f"expected a PRNG key, got an array of dtype {key.dtype} and shape "
                         f"{tuple(key.shape)}")
    return jax.random.wrap_key_data(key)


def row_keys(key: Array, batch: int) -> Array:
    """One typed PRNG key per row, [B].

    `key` is a single key (typed `jax.random.key` or raw `PRNGKey` uint32[2]), which is split into
    `batch` keys, or `batch` keys (typed [B] or raw [B, 2]), used as given.
    """
    key = typed_keys(key)
    if key.ndim == 0:
        return jax.random.split(key, batch)
    if key.shape == (batch,):
        return key
    raise InputError(f"expected one PRNG key or {batch} keys (one per row), got key shape "
                     f"{tuple(key.shape)}")


# ----------------------------------------------------------------------------- building blocks

def is_greedy(temperature) -> bool:
    """True for a concrete temperature 0 (the greedy path is chosen when tracing)."""
    return isinstance(temperature, (int, float, np.number)) and float(temperature) == 0.0


def answer_logits(backbone: Backbone, prompt_ids_BP: Array, prompt_mask_BP: Array,
                  answer_ids_BA: Array, answer_mask_BA: Array) -> Array:
    """float32 logits [B, A, V] at the answer positions of `[prompt | answer]`, row i predicting
    answer token i for every backbone (the logit shift is handled by `masking.token_logits`).

    Padding (prompt on the left, answer on the right) enters through the attention mask only.
    """
    P = prompt_ids_BP.shape[1]
    ids = jnp.concatenate([prompt_ids_BP, answer_ids_BA], axis=1).astype(jnp.int32)
    mask = jnp.concatenate([prompt_mask_BP, answer_mask_BA], axis=1).astype(jnp.int32)
    return masking.token_logits(backbone, ids, mask)[:, P:]


def top_proposal(logits_BGV: Array, mask_token_id: int) -> tuple[Array, Array]:
    """The model's own top proposal at every position and its probability (its "confidence").

    Returns (tokens [B, G] int32, probability [B, G] float32). The mask token is never proposed; the
    probability is under the full softmax.
    """
    log_probs = jax.nn.log_softmax(logits_BGV, axis=-1)
    tokens = jnp.argmax(log_probs.at[..., mask_token_id].set(-jnp.inf), axis=-1).astype(jnp.int32)
    return tokens, jnp.exp(jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0])


def step_noise(step_keys_B: Array, gen_length: int, vocab_size: int, *,
               temperature: float | Array = 0.0,
               remasking: str = "low_confidence") -> tuple[Array | None, Array | None]:
    """The random numbers of one step: (Gumbel noise [B, G, V] or None, uniform scores [B, G] or
    None), from a single uniform draw per row (each PRNG call costs XLA compile time).

    Gumbel noise is drawn when sampling (temperature not a Python 0), uniform scores for 'random'
    remasking; greedy low-confidence steps draw nothing.
    """
    check_remasking(remasking)
    sampling = not is_greedy(temperature)
    width = (vocab_size if sampling else 0) + (1 if remasking == "random" else 0)
    if width == 0:
        return None, None
    tiny = jnp.finfo(jnp.float32).tiny
    u = jax.vmap(lambda k: jax.random.uniform(k, (gen_length, width), jnp.float32, tiny, 1.0))(
        step_keys_B)
    gumbel = -jnp.log(-jnp.log(u[..., :vocab_size])) if sampling else None
    uniform = u[..., -1] if remasking == "random" else None
    return gumbel, uniform


def propose_tokens(logits_BGV: Array, mask_token_id: int, temperature: float | Array = 0.0,
                   gumbel_BGV: Array | None = None) -> Array:
    """x0 proposals [B, G]: argmax (temperature 0) or Gumbel-argmax of `logits / temperature`.

    A Python 0 selects the greedy path at trace time; any other value (a float or a traced scalar,
    which must then be > 0) samples with `gumbel_BGV` (see `step_noise`).
    """
    logits = logits_BGV.at[..., mask_token_id].set(-jnp.inf)
    if is_greedy(temperature):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if gumbel_BGV is None:
        raise ValueError("sampling at temperature > 0 needs Gumbel noise (see step_noise)")
    return jnp.argmax(logits / temperature + gumbel_BGV, axis=-1).astype(jnp.int32)


def reveal_scores(logits_BGV: Array, proposals_BG: Array, remasking: str = "low_confidence",
                  uniform_BG: Array | None = None) -> Array:
    """Scores [B, G] that decide which proposals are revealed (highest first).

    'low_confidence': the softmax probability of the proposal (LLaDA's low-confidence remasking);
    'random': the uniform scores `uniform_BG` (see `step_noise`).
    """
    check_remasking(remasking)
    if remasking == "random":
        if uniform_BG is None:
            raise ValueError("random remasking needs uniform scores (see step_noise)")
        return uniform_BG
    probs = jax.nn.softmax(logits_BGV, axis=-1)
    return jnp.take_along_axis(probs, proposals_BG[..., None], axis=-1)[..., 0]


def select_reveals(scores_BG: Array, candidates_BG: Array, count: Array) -> Array:
    """Boolean [B, G]: the `count` candidates with the highest scores, ties to the earlier position.

    `count` is a scalar or [B]; it must not exceed the number of candidates of a row.
    """
    score = jnp.where(candidates_BG, scores_BG, -jnp.inf)
    order = jnp.argsort(-score, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    return (rank < jnp.asarray(count)[..., None]) & candidates_BG


def denoise_step(backbone: Backbone, prompt_ids_BP: Array, prompt_mask_BP: Array,
                 answer_BG: Array, masked_BG: Array, allowed_BG: Array, count: Array,
                 step_keys_B: Array, *, temperature: float = 0.0,
                 remasking: str = "low_confidence") -> tuple[Array, Array, Array]:
    """One sampler step: one forward, propose, score, reveal `count` masked positions in `allowed`.

    Args:
      answer_BG: current answer tokens (any value where masked; the model sees the mask token there).
      masked_BG: True where the answer position is still masked.
      allowed_BG: True on the positions this step may reveal (the current block).
      count: scalar (or [B]) number of positions to reveal.
      step_keys_B: one key per row for this step (read only when sampling or remasking randomly).

    Returns (answer_BG, masked_BG, revealed_BG) after the step.
    """
    mask_id = check_mask_token(backbone)
    ids = jnp.where(masked_BG, mask_id, answer_BG)
    logits = answer_logits(backbone, prompt_ids_BP, prompt_mask_BP, ids, jnp.ones_like(ids))
    gumbel, uniform = step_noise(step_keys_B, ids.shape[1], logits.shape[-1],
                                 temperature=temperature, remasking=remasking)
    proposals = propose_tokens(logits, mask_id, temperature, gumbel)
    scores = reveal_scores(logits, proposals, remasking, uniform)
    revealed = select_reveals(scores, masked_BG & allowed_BG, count)
    return jnp.where(revealed, proposals, ids), masked_BG & ~revealed, revealed


# ----------------------------------------------------------------------------- the sampler

def sample(backbone: Backbone, prompt_ids_BP: Array, prompt_mask_BP: Array, key: Array, *,
           gen_length: int, steps: int, block_length: int, temperature: float = 0.0,
           remasking: str = "low_confidence", return_order: bool = False):
    """Generate G = `gen_length` answer tokens for each prompt (pure; call inside a jit).

    Args:
      prompt_ids_BP: int [B, P] left-padded prompts; prompt_mask_BP: 1 on real tokens.
      key: one PRNG key or B keys (see `row_keys`); unused when temperature is 0 and remasking is
        'low_confidence'.
      gen_length, steps, block_length: G, K and the block length (static).
      temperature: tau; a Python 0 is greedy (chosen at trace time), anything else (also a traced
        scalar) samples with Gumbel noise and must be > 0.
      remasking: 'low_confidence' or 'random' (static).
      return_order: also return the step at which each answer position was revealed.

    Returns answer_ids [B, G] int32, or (answer_ids [B, G], reveal_step [B, G] int32) with
    `return_order`; the state before step k is `where(reveal_step < k, answer_ids, mask)`.
    """
    counts = reveal_counts(gen_length, steps, block_length)
    blocks = step_blocks(gen_length, steps, block_length)
    check_remasking(remasking)
    if isinstance(temperature, (int, float, np.number)):
        check_temperature(temperature)
    mask_id = check_mask_token(backbone)
    B, P = prompt_ids_BP.shape
    check_sequence_length(backbone, P, gen_length)
    keys = row_keys(key, B)
    allowed_KG = (np.arange(gen_length)[None, :] // block_length) == blocks[:, None]

    def body(carry, xs):
        answer, masked = carry
        step_keys, count, allowed = xs
        answer, masked, revealed = denoise_step(
            backbone, prompt_ids_BP, prompt_mask_BP, answer, masked,
            jnp.broadcast_to(allowed, masked.shape), count, step_keys,
            temperature=temperature, remasking=remasking)
        return (answer, masked), revealed

    init = (jnp.full((B, gen_length), mask_id, jnp.int32), jnp.ones((B, gen_length), bool))
    # row b's key at step k is fold_in(keys[b], k); computed once, outside the loop
    keys_KB = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, k))(
        jnp.arange(steps, dtype=jnp.int32))
    xs = (keys_KB, jnp.asarray(counts), jnp.asarray(allowed_KG))
    (answer, _), revealed_KBG = jax.lax.scan(body, init, xs)
    if not return_order:
        return answer
    return answer, jnp.argmax(revealed_KBG, axis=0).astype(jnp.int32)


def _sample_traced_temperature(backbone, prompt_ids_BP, prompt_mask_BP, key, temperature, *,
                               greedy: bool, **static):
    # temperature is an argument, not a static, so sweeping it does not recompile
    return sample(backbone, prompt_ids_BP, prompt_mask_BP, key,
                  temperature=0.0 if greedy else temperature, **static)


_SAMPLE_STATIC = ("gen_length", "steps", "block_length", "remasking", "return_order", "greedy")
_sample_compiled = jax.jit(_sample_traced_temperature, static_argnames=_SAMPLE_STATIC)


def reject_tracers(what: str, *arrays) -> None:
    if any(isinstance(a, jax.core.Tracer) for a in arrays):
        raise TypeError(f"{what} is the host entry point; inside traced code call the pure function "
                        "(a nested jit would ignore interceptors entered around it)")


def check_nonempty_rows(mask_BT, what: str) -> None:
    """Every row of a concrete padding mask must hold at least one real token."""
    lengths = np.asarray(mask_BT).astype(bool).sum(axis=-1)
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise InputError(f"{what} of row(s) {', '.join(map(str, empty[:10]))} is empty")


def sample_jit(backbone: Backbone, prompt_ids_BP, prompt_mask_BP, key, *, gen_length: int,
               steps: int, block_length: int, temperature: float = 0.0,
               remasking: str = "low_confidence", return_order: bool = False):
    """`sample`, compiled once per shape and static arguments, with host-side input checks."""
    reject_tracers("sample_jit", prompt_ids_BP, prompt_mask_BP, key)
    reveal_counts(gen_length, steps, block_length)
    check_remasking(remasking)
    prompt_ids_BP, prompt_mask_BP = np.asarray(prompt_ids_BP), np.asarray(prompt_mask_BP)
    if prompt_ids_BP.ndim != 2 or prompt_ids_BP.shape != prompt_mask_BP.shape:
        raise InputError(f"prompt ids {prompt_ids_BP.shape} and mask {prompt_mask_BP.shape} must "
                         "both be [batch, length]")
    check_sequence_length(backbone, prompt_ids_BP.shape[1], gen_length)
    check_nonempty_rows(prompt_mask_BP, "the prompt")
    check_temperature(temperature)
    return _sample_compiled(backbone, jnp.asarray(prompt_ids_BP, jnp.int32),
                            jnp.asarray(prompt_mask_BP, jnp.int32), key,
                            jnp.float32(temperature), greedy=is_greedy(float(temperature)),
                            gen_length=gen_length, steps=steps, block_length=block_length,
                            remasking=remasking, return_order=return_order)


def sample_many(backbone: Backbone, prompts: list[list[int]], key, *, pad_id: int,
                batch_size: int = 8, gen_length: int, steps: int, block_length: int,
                temperature: float = 0.0, remasking: str = "low_confidence", progress=None) -> np.ndarray:
    """Generate for any number of tokenized prompts: int32 [N, G], in input order (host side).

    Prompts are cut into batches of `batch_size`, all left-padded to the longest prompt and the last
    batch filled with copies, so the sampler compiles once. Row n uses `fold_in(key, n)`, so its
    result does not depend on `batch_size`. `progress`: optional wrapper over the batches.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    if not prompts:
        raise InputError("no prompts to generate for")
    key = typed_keys(key)
    if key.ndim:
        raise InputError(f"sample_many takes one PRNG key, got key shape {tuple(key.shape)}")
    ids, mask = pad_left(prompts, pad_id)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(len(prompts)))
    batch_size = min(batch_size, len(prompts))
    outputs = []
    starts = list(range(0, len(prompts), batch_size))
    for start in (progress(starts) if progress else starts):
        rows = np.arange(start, start + batch_size).clip(max=len(prompts) - 1)
        answer = sample_jit(backbone, ids[rows], mask[rows], keys[rows], gen_length=gen_length,
                            steps=steps, block_length=block_length, temperature=temperature,
                            remasking=remasking)
        outputs.append(np.asarray(answer)[: len(prompts) - start])
    return np.concatenate(outputs, axis=0)


__all__ = [
    "REMASKING", "answer_logits", "check_schedule", "denoise_step", "linear_counts", "propose_tokens",
    "reveal_counts", "reveal_scores", "row_keys", "sample", "sample_jit", "sample_many",
    "select_reveals", "step_blocks", "step_noise", "top_proposal", "typed_keys",
]
