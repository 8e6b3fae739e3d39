"""Memory stacks (several edit memories carried by one backbone, `Backbone.with_edits`): edits
attached one by one equal edits attached together and edits given to one call; a stack of memories
at different layers equals the hand-written forward that adds each term where it acts; α = 0
everywhere changes nothing; the stack runs inside jit, the likelihood and the sampler."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ports
from ports.errors import UserError
from timerome_jax import memory as mem

FIXTURES = Path(__file__).parent / "fixtures"
KEY_DIM = {"mlp": 128, "attn": 64, "resid": 64}   # the llada fixture: d_ff 128, N·H = d = 64


@pytest.fixture(scope="module")
def llada():
    return ports.load_pretrained(FIXTURES / "llada")


def memory_at(layer, module, n=3, alpha=1.5, q=None, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, KEY_DIM[module])).astype(np.float32)
    deltas = rng.normal(size=(n, 64)).astype(np.float32)
    return mem.build(keys, deltas, layer=layer, module=module, alpha=alpha, lam=0.2, q=q)[0]


def token_ids(seed=0, shape=(2, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 370, shape), jnp.int32)


def with_down_proj_edits(llada, memories):
    """The plain backbone whose down-projection kernels carry each MLP memory's primal weight
    (q = n: a memory then equals a weight edit)."""
    params = jax.tree.map(lambda x: x, llada.params)
    kernel = params["blocks"]["mlp"]["down_proj"]["kernel"]
    for m in memories:
        kernel = kernel.at[int(m.layer)].add(m.primal_weight().T)
    params["blocks"]["mlp"]["down_proj"]["kernel"] = kernel
    return ports.Backbone(llada.config, params, llada.mask_token_id, llada.dtype, llada.source)


def hand_forward(backbone, ids, resid_memories):
    """embed, then every block, adding each resid memory's term to its layer's output by hand."""
    x = backbone.embed(ids)
    for i in range(backbone.config.n_layers):
        x = backbone.layer(x, jnp.int32(i))
        for m in resid_memories:
            if int(m.layer) == i:
                x = x + m.term(x)
    return backbone.head(x)


forward = jax.jit(lambda bb, ids: bb.apply(ids))


@pytest.mark.parametrize("module", ["mlp", "attn", "resid"])
def test_attaching_one_by_one_together_or_per_call_is_the_same(llada, module):
    m, other = memory_at(1, module, q=2), memory_at(2, module, seed=3)
    ids = token_ids()
    together = forward(llada.with_edits(m, other), ids)
    np.testing.assert_array_equal(forward(llada.with_edits(m).with_edits(other), ids), together)
    np.testing.assert_array_equal(jax.jit(lambda bb, ids: bb.apply(ids, edits=(m, other)))(llada, ids), together)
    assert np.abs(np.asarray(forward(llada.with_edits(m), ids)) - np.asarray(llada.logits(ids))).max() > 1e-3
    assert llada.with_edits(m).without_edits().edits == ()


@pytest.mark.parametrize("mlp_layer, resid_layer", [(1, 2), (2, 0)])
def test_two_memories_at_different_layers_equal_the_hand_written_forward(llada, mlp_layer, resid_layer):
    """MLP memory as a down-projection weight edit, resid memory (sparsified, q=2 of 4) added by
    hand after its block: with the resid memory first, its change reaches the MLP memory's key."""
    mlp_memory = memory_at(mlp_layer, "mlp", n=3, alpha=0.8, seed=1)
    resid_memory = memory_at(resid_layer, "resid", n=4, alpha=1.2, q=2, seed=2)
    ids = token_ids(3)
    stacked = forward(llada.with_edits(mlp_memory, resid_memory), ids)
    expected = hand_forward(with_down_proj_edits(llada, [mlp_memory]), ids, [resid_memory])
    np.testing.assert_allclose(stacked, expected, atol=1e-4)
    for single in (mlp_memory, resid_memory):  # both memories matter
        assert np.abs(np.asarray(stacked) - np.asarray(forward(llada.with_edits(single), ids))).max() > 1e-3


def test_two_mlp_memories_equal_two_weight_edits(llada):
    """Memories at the same site (down_proj) and different layers each act at their own layer."""
    first, second = memory_at(0, "mlp", alpha=0.9, seed=4), memory_at(2, "mlp", n=5, alpha=0.6, seed=5)
    ids = token_ids(6)
    stacked = forward(llada.with_edits(first, second), ids)
    np.testing.assert_allclose(stacked, with_down_proj_edits(llada, [first, second]).logits(ids), atol=1e-4)


def test_resid_memories_at_one_layer_read_the_unedited_output(llada):
    """Two memories at the same (layer, site) both read the block's unedited output and add."""
    a, b = memory_at(1, "resid", seed=7), memory_at(1, "resid", n=5, q=3, seed=8)
    ids = token_ids(9)
    x = llada.embed(ids)
    for i in range(llada.config.n_layers):
        x = llada.layer(x, jnp.int32(i))
        if i == 1:
            x = x + a.term(x) + b.term(x)
    np.testing.assert_allclose(forward(llada.with_edits(a, b), ids), llada.head(x), atol=1e-4)


def test_alpha_zero_everywhere_is_bit_identical(llada):
    stack = [memory_at(0, "mlp", alpha=0.0), memory_at(1, "attn", alpha=0.0, q=2), memory_at(2, "resid", alpha=0.0)]
    ids = token_ids(10)
    np.testing.assert_array_equal(forward(llada.with_edits(*stack), ids), forward(llada, ids))


def test_stack_runs_in_jit_likelihood_and_sampler_without_recompiling(llada):
    from timerome_jax import likelihood, sampler

    stack = llada.with_edits(memory_at(0, "resid", alpha=3.0), memory_at(2, "mlp", alpha=3.0))
    assert type(stack) is ports.Backbone
    ids = token_ids(11, (1, 6))
    answer = jnp.asarray([[5, 9, 11, 3]], jnp.int32)
    lp = jax.jit(lambda bb: likelihood.answer_log_likelihood(bb, ids, jnp.ones_like(ids), answer,
                                                             jnp.ones_like(answer), method="one_step"))
    assert not np.allclose(lp(stack), lp(llada))
    other = llada.with_edits(memory_at(1, "resid", n=5, alpha=0.5, seed=3),
                             memory_at(0, "mlp", n=6, alpha=2.0, q=2, seed=4))
    assert not np.allclose(lp(other), lp(stack))
    assert lp._cache_size() == 2   # the plain backbone and one compilation for both stacks
    zero = llada.with_edits(*[mem.with_hyperparameters(m, alpha=0.0) for m in stack.edits])
    np.testing.assert_array_equal(lp(zero), lp(llada))
    out = sampler.sample_jit(stack, ids, jnp.ones_like(ids), jax.random.key(0), gen_length=4, steps=4, block_length=4)
    assert np.asarray(out).shape == (1, 4)
    x = stack.embed(ids)   # the pieces carry the stack too
    for i in range(llada.config.n_layers):
        x = stack.layer(x, i)
    np.testing.assert_allclose(stack.head(x), stack.apply(ids), atol=1e-5)


def test_bad_edits_are_refused(llada):
    with pytest.raises(UserError, match="an edit at layer 7 is outside 0..2"):
        llada.with_edits(memory_at(0, "mlp"), memory_at(7, "mlp"))
    with pytest.raises(UserError, match="an edit needs a `site`"):
        llada.with_edits(np.zeros(3))
    with pytest.raises(UserError, match="no router"):
        llada.with_edits(mem.EditMemory(**{**memory_at(0, "mlp").__dict__, "module": "router"}))
