"""The method is architecture-agnostic: the TIE grid and an edit memory run unchanged on every
ported backbone (random fixture weights, so only the mechanics are checked)."""

from pathlib import Path

import jax
import numpy as np
import pytest

import ports
from timerome_jax import memory as mem
from timerome_jax import tracing as tr
from timerome_jax.facts import fact_batch

FIXTURES = Path(__file__).parent / "fixtures"
# one memory site per family keeps the suite fast while covering every site (MoE: the mixture)
FAMILY_MODULE = {"llada": "mlp", "mmada": "attn", "dream": "resid", "diffullama": "attn", "llada_moe": "mlp"}


@pytest.mark.parametrize("family, module", FAMILY_MODULE.items())
def test_trace_then_edit(family, module):
    mask_id = int(np.load(FIXTURES / family / "golden.npz")["mask_token_id"])
    bb = ports.load_pretrained(FIXTURES / family, mask_token_id=mask_id)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 370, 7)), list(rng.integers(3, 370, 5))]
    answers = [list(rng.integers(3, 370, 4)), list(rng.integers(3, 370, 3))]
    batch = fact_batch(prompts, answers, [(1, 4), (2, 4)], pad_id=0)
    sigma = tr.subject_embedding_std(bb, batch)
    cfg = tr.TraceConfig(steps=2, noise_samples=2)
    result = tr.tie_grid(bb, batch, sigma, jax.random.key(0), cfg)
    L = bb.config.n_layers
    assert result.tie.shape == (2, 2, L, 3) and np.isfinite(np.asarray(result.tie)).all()
    assert np.abs(np.asarray(result.clean_lp - result.corrupted_lp)).max() > 0

    coord = tr.select_coordinate(np.asarray(result.tie), cfg.modules)
    keys, deltas, _ = mem.capture(bb, batch, tr.Coordinate(coord.layer, coord.step, module, 2), jax.random.key(1),
                                  noise_samples=2)
    memory, _ = mem.build(keys, deltas, layer=coord.layer, module=module, alpha=1.0, lam=0.1)
    ids = batch.input_ids_FT
    edited = jax.jit(lambda bb, ids: bb.apply(ids))(bb.with_edits(memory), ids)
    assert edited.shape == (2, ids.shape[1], bb.config.vocab_size) and np.isfinite(np.asarray(edited)).all()
    # the edit reaches the logits (a coordinate in the last layer's resid only moves its own rows)
    assert np.abs(np.asarray(edited) - np.asarray(bb.logits(ids))).max() > 1e-4
