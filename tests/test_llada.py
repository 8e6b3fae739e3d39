"""LLaDA port: parity with the original PyTorch outputs, interception points, pytree behaviour."""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ports
from conftest import activations

FIXTURE = Path(__file__).parent / "fixtures" / "llada"
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(FIXTURE / "golden.npz"))


@pytest.fixture(scope="module")
def llada():
    return ports.load_pretrained(FIXTURE)


def test_config_from_fixture(llada):
    c = llada.config
    assert (c.family, c.n_layers, c.d_model, c.n_heads, c.mlp_hidden, c.vocab_size) == ("llada", 3, 64, 4, 128, 384)
    assert llada.mask_token_id == 380 and c.logit_shift == 0 and not c.tie_embeddings


def test_logits_match_reference(llada, golden):
    np.testing.assert_allclose(llada.logits(golden["input_ids"]), golden["logits"], **TOL)


def test_hidden_states_match_reference(llada, golden):
    _, inter = activations(llada, jnp.asarray(golden["input_ids"]))
    np.testing.assert_allclose(inter["embed"], golden["hidden_states"][0], **TOL)
    np.testing.assert_allclose(inter["resid"], golden["block_outputs"], **TOL)
    for i in range(1, llada.config.n_layers):
        np.testing.assert_allclose(inter["resid"][i - 1], golden["hidden_states"][i], **TOL)
    np.testing.assert_allclose(inter["final"], golden["hidden_states"][-1], **TOL)


def test_padded_batch_matches_official_key_padding(llada, golden):
    logits = llada.logits(golden["input_ids_padded"], golden["attention_mask_padded"])
    np.testing.assert_allclose(logits, golden["logits_padded"], **TOL)


def test_padding_does_not_leak_into_real_tokens(llada, golden):
    """The unpadded suffix of a left-padded row equals that row run alone (RoPE positions are
    absolute in LLaDA, so compare against the reference run of the same padded row)."""
    ids, mask = golden["input_ids_padded"], golden["attention_mask_padded"]
    changed = ids.copy()
    changed[0, :3] = 7  # different pad token ids must not matter
    a = llada.logits(ids, mask)
    b = llada.logits(changed, mask)
    np.testing.assert_allclose(a[0, 3:], b[0, 3:], atol=1e-6)


def test_all_ones_mask_equals_no_mask(llada, golden):
    ids = golden["input_ids"]
    np.testing.assert_allclose(llada.logits(ids, np.ones_like(ids)), llada.logits(ids), atol=1e-6)


def test_backbone_is_a_pytree_of_params(llada, golden):
    leaves = jax.tree.leaves(llada)
    assert len(leaves) == len(jax.tree.leaves(llada.params))
    doubled = jax.tree.map(lambda x: x, llada)
    assert doubled.config == llada.config and doubled.mask_token_id == 380
    grads = jax.grad(lambda bb: bb.apply(jnp.asarray(golden["input_ids"])).sum())(llada)
    assert jax.tree.structure(grads.params) == jax.tree.structure(llada.params)


def test_interceptors_see_every_documented_point_with_layer_index(llada, golden):
    """attn, mlp, resid outputs and o_proj/down_proj inputs are reachable inside nn.scan, and a
    no-op interceptor changes nothing."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.name in ("attn", "mlp", "resid", "o_proj", "down_proj"):
            seen[context.module.name] = kwargs.get("layer_index") is not None
        return next_fun(*args, **kwargs)

    @jax.jit
    def forward(bb, ids):
        with nn.intercept_methods(record):
            return bb.apply(ids)

    ids = jnp.asarray(golden["input_ids"])
    np.testing.assert_array_equal(forward(llada, ids), llada.logits(ids))
    assert seen == {k: True for k in ("attn", "mlp", "resid", "o_proj", "down_proj")}


def test_zeroing_one_layers_mlp_matches_manual_forward(llada, golden):
    """An interceptor that removes layer 1's MLP output equals zeroing layer 1's down projection."""
    def drop_mlp(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name == "mlp":
            out = jnp.where(kwargs["layer_index"] == 1, jnp.zeros_like(out), out)
        return out

    @jax.jit
    def intercepted(bb, ids):
        with nn.intercept_methods(drop_mlp):
            return bb.apply(ids)

    params = jax.tree.map(lambda x: x, llada.params)
    params["blocks"]["mlp"]["down_proj"]["kernel"] = params["blocks"]["mlp"]["down_proj"]["kernel"].at[1].set(0.0)
    ids = jnp.asarray(golden["input_ids"])
    np.testing.assert_allclose(intercepted(llada, ids), llada.apply(ids, params=params), atol=1e-5)


def test_bf16_checkpoint_stays_bf16(tmp_path, golden):
    from safetensors.numpy import load_file, save_file
    import ml_dtypes
    import shutil

    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(FIXTURE / "model.safetensors").items()}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
    bb = ports.load_pretrained(tmp_path)
    assert {x.dtype for x in jax.tree.leaves(bb.params)} == {jnp.dtype(jnp.bfloat16)}
    logits = bb.logits(golden["input_ids"])
    assert logits.dtype == jnp.float32
    # bf16 has ~3 significant digits; the argmax of most positions survives
    agree = np.mean(np.argmax(logits, -1) == np.argmax(golden["logits"], -1))
    assert agree > 0.8
    assert ports.load_pretrained(tmp_path, dtype=jnp.float32).params["embed"]["embedding"].dtype == jnp.float32


@pytest.mark.parametrize("padded", [False, True])
def test_forward_in_pieces_equals_apply(llada, golden, padded):
    """embed -> layer(0..L-1) -> head (with a traced layer index) equals the scanned forward."""
    ids = jnp.asarray(golden["input_ids_padded" if padded else "input_ids"])
    mask = jnp.asarray(golden["attention_mask_padded"]) if padded else None

    @jax.jit
    def pieces(bb, ids, mask):
        x = bb.embed(ids)
        x = jax.lax.fori_loop(0, bb.config.n_layers, lambda i, x: bb.layer(x, i, mask), x)
        return bb.head(x)

    np.testing.assert_allclose(pieces(llada, ids, mask), llada.logits(ids, mask), atol=1e-5)


def test_logits_at_chosen_rows_equal_the_full_logits_there(llada, golden):
    """`logit_rows_BA` runs the head at a few rows only: those rows of the full logits, unshifted."""
    ids = jnp.asarray(golden["input_ids"])
    B, T = ids.shape
    rows = jnp.asarray(np.stack([np.array([T - 1, 0, 3]) if b % 2 else np.array([2, 2, T - 2]) for b in range(B)]))
    full = llada.apply(ids)
    some = llada.apply(ids, logit_rows_BA=rows)
    assert some.shape == (B, 3, llada.config.vocab_size)
    np.testing.assert_allclose(some, np.take_along_axis(np.asarray(full), np.asarray(rows)[..., None], axis=1), atol=1e-5)
