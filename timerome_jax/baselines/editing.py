"""Rewrite baselines (issue #20; docs/rewrite.md), scored with the same cases and metrics as the
rewrite memory (`timerome_jax.rewrite.case_metrics`):

* in-context editing (IKE's simplest form): no change to the model; every prompt it answers is
  preceded by the new fact, `in_context_prefix(case)` = "{prompt} {o*}. " (pass it as
  `case_metrics(..., prefix=in_context_prefix)`). Locality prompts get the prefix too, as IKE's do.
* FT-L (`fine_tune_site`): constrained fine-tuning of the traced site's projection (the kernel
  that writes the site's value from its key, `ports.sites.site_kernel`) on the new objects'
  MC-ELBO, every entry of the change clipped to ±`norm_bound` after each Adam step (EasyEdit's
  norm constraint). A copy of the weights.
* MEMIT-style (`weight_edit`): the closed-form update W' = W + α Δ Kᵀ (K Kᵀ + λ̃ C)⁻¹ written into
  a copy of the site's kernel, from the same keys and values as the memory (C = I, or the retain
  keys' second moment for a covariance-regularised memory, MEMIT's form at one layer). It equals
  the ungated, unsparsified memory applied at every token (tested), so the comparison with the
  memory isolates what the gate and the sparsification add.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ports import Backbone, Site
from ports.sites import add_to_site_kernel, site_kernel
from timerome_jax.errors import InputError
from timerome_jax.facts import Facts
from timerome_jax.likelihood import answer_log_likelihood
from timerome_jax.memory import EditMemory
from timerome_jax.rewrite import RewriteCase, case_rows

Array = jax.Array


def in_context_prefix(case: RewriteCase) -> str:
    """The new fact, stated before a prompt: "{prompt} {target_new}. "."""
    return f"{case.prompt} {case.target_new.strip()}. "


def weight_edit(backbone: Backbone, memory: EditMemory) -> Backbone:
    """A copy of the backbone whose site kernel carries the memory's primal weight (module doc);
    refuses a gated or sparsified memory, whose edit is not linear in the key."""
    if memory.gate is not None or 0 < int(memory.q) < memory.size:
        raise InputError("a weight edit writes the linear memory: build it without a gate and without q")
    site = Site(int(memory.layer), memory.module)
    weight_DI = memory.primal_weight()          # the read-out acts on raw keys, whitening included
    params = add_to_site_kernel(backbone.params, backbone.config, site, weight_DI.T)
    return dataclasses.replace(backbone, params=params)


@functools.partial(jax.jit, static_argnames=("layer", "module", "steps", "mc_samples"))
def _fine_tune(backbone: Backbone, rows: tuple, layer: int, *, module: str, steps: int, learning_rate: float,
               norm_bound: float, mc_samples: int):
    prompt_ids, prompt_mask, answer_ids, answer_mask, key_data = rows
    keys = jax.random.wrap_key_data(key_data)
    lengths = jnp.sum(answer_mask, axis=1)
    site = Site(layer, module)

    def loss(delta_ID):
        model = dataclasses.replace(backbone, params=add_to_site_kernel(backbone.params, backbone.config, site,
                                                                          delta_ID))
        elbo = answer_log_likelihood(model, prompt_ids, prompt_mask, answer_ids, answer_mask, keys,
                                     method="mc_elbo", mc_samples=mc_samples, batch_size=mc_samples)
        return -jnp.mean(elbo / lengths)

    optimizer = optax.adam(learning_rate)
    delta = jnp.zeros_like(site_kernel(backbone.params, backbone.config, site))

    def step(carry, _):
        delta, state = carry
        value, grad = jax.value_and_grad(loss)(delta)
        updates, state = optimizer.update(grad, state, delta)
        delta = jnp.clip(optax.apply_updates(delta, updates), -norm_bound, norm_bound)
        return (delta, state), value

    (delta, _), losses = jax.lax.scan(step, (delta, optimizer.init(delta)), None, length=steps)
    return delta, jnp.append(losses, loss(delta))


def fine_tune_site(backbone: Backbone, tokenizer, facts: Facts, layer: int, module: str = "mlp", *, steps: int = 25,
                   learning_rate: float = 5e-4, norm_bound: float = 5e-4, mc_samples: int = 8,
                   seed: int = 0) -> tuple[Backbone, np.ndarray]:
    """FT-L (module docstring) on the rewrite facts `facts` (answers = the new objects), all cases
    in one batch: (the fine-tuned copy, the loss −mean ELBO/|o*| before every step and after)."""
    for name, value in (("steps", steps), ("mc_samples", mc_samples)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"FT-L {name.replace('_', ' ')} must be a positive integer, got {value!r}")
    for name, value in (("learning rate", learning_rate), ("norm bound", norm_bound)):
        if not np.isfinite(value) or value <= 0:
            raise InputError(f"FT-L {name} must be a finite number > 0, got {value}")
    site_kernel(backbone.params, backbone.config, Site(layer, module))    # one clear error for resid / MoE
    rows = case_rows(tokenizer, facts, seed, facts.pad_id)
    arrays = tuple(jnp.asarray(x) for x in (rows.prompt_ids, rows.prompt_mask, rows.answer_ids, rows.answer_mask,
                                            rows.key_data))
    delta, losses = _fine_tune(backbone, arrays, layer=int(layer), module=module, steps=steps,
                               learning_rate=learning_rate, norm_bound=norm_bound, mc_samples=mc_samples)
    params = add_to_site_kernel(backbone.params, backbone.config, Site(layer, module), delta)
    return dataclasses.replace(backbone, params=params), np.asarray(losses)


__all__ = ["fine_tune_site", "in_context_prefix", "weight_edit"]
