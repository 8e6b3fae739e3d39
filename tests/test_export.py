"""ports.export: Flax params -> LLaDA-format safetensors with the original key names."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import ports
from ports import checkpoint
from ports.errors import ConfigError, UserError
from ports.export import LLADA_AUTO_MAP, checkpoint_tensors, inverse_transform, llada_config, save_safetensors
from ports.families import base
from ports.families.base import KeyRule

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "llada"


@pytest.fixture(scope="module")
def llada():
    return ports.load_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def exported(llada, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "llada"
    raw = checkpoint.read_config_json(FIXTURE)
    save_safetensors(llada, out, raw, extra_files={"README.md": "exported\n"})
    return out


def _tensors(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_exported_keys_and_tensors_equal_the_fixture(exported):
    original, _ = _tensors(FIXTURE / "model.safetensors")
    written, metadata = _tensors(exported / "model.safetensors")
    assert sorted(written) == sorted(original)
    assert metadata == {"format": "pt"}
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype and written[key].shape == tensor.shape, key
        np.testing.assert_array_equal(written[key], tensor, err_msg=key)


def test_reload_gives_identical_params_and_logits(llada, exported):
    again = ports.load_pretrained(exported)
    assert again.config == llada.config
    leaves = jax.tree_util.tree_leaves_with_path(llada.params)
    reloaded = dict(jax.tree_util.tree_leaves_with_path(again.params))
    assert set(reloaded) == {p for p, _ in leaves}
    for path, leaf in leaves:
        np.testing.assert_array_equal(np.asarray(reloaded[path]), np.asarray(leaf))
    golden = np.load(FIXTURE / "golden.npz")
    np.testing.assert_array_equal(again.logits(golden["input_ids"]), llada.logits(golden["input_ids"]))
    assert again.fingerprint() == llada.fingerprint()
    assert json.loads((exported / "config.json").read_text()) == json.loads((FIXTURE / "config.json").read_text())
    assert (exported / "README.md").read_text() == "exported\n"


@pytest.mark.parametrize("family", ["llada", "mmada", "dream", "diffullama", "llada_moe"])
def test_every_fixture_family_round_trips(family, tmp_path):
    """The inverse transforms cover every key table (GQA, q/k/v bias, q/k norm, experts)."""
    model = ports.load_pretrained(FIXTURES / family)
    out = save_safetensors(model, tmp_path / family, checkpoint.read_config_json(FIXTURES / family))
    original, _ = _tensors(FIXTURES / family / "model.safetensors")
    written, _ = _tensors(out / "model.safetensors")
    assert sorted(written) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(written[key], original[key], err_msg=key)


def test_trained_params_round_trip_through_a_generated_config(llada, tmp_path):
    """A backbone with new weights and a config built by `llada_config` exports and reloads."""
    params = jax.tree.map(lambda x: x + 0.25 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)),
                          llada.params)
    config = llada.config.replace(eos_token_id=5, pad_token_id=5, mask_token_id=7)
    model = ports.Backbone(config=config, params=params, mask_token_id=7)
    raw = llada_config(config)
    fixture_raw = json.loads((FIXTURE / "config.json").read_text())
    assert set(raw) == set(fixture_raw) - {"auto_map"}
    assert llada_config(config, auto_map=LLADA_AUTO_MAP)["auto_map"] == fixture_raw["auto_map"]
    out = save_safetensors(model, tmp_path / "m", raw)
    again = ports.load_pretrained(out)
    assert again.config == config and again.mask_token_id == 7
    ids = np.arange(24).reshape(2, 12) % config.vocab_size
    np.testing.assert_array_equal(again.logits(ids), model.logits(ids))


def test_config_that_does_not_describe_the_backbone_is_refused(llada, tmp_path):
    raw = checkpoint.read_config_json(FIXTURE)
    with pytest.raises(ConfigError, match="n_layers"):
        save_safetensors(llada, tmp_path / "bad", {**raw, "n_layers": 2})
    assert not (tmp_path / "bad").exists()


def test_existing_directory_needs_overwrite(llada, tmp_path):
    raw = checkpoint.read_config_json(FIXTURE)
    out = save_safetensors(llada, tmp_path / "m", raw, extra_files={"README.md": "first\n"})
    with pytest.raises(UserError, match="already exists"):
        save_safetensors(llada, out, raw)
    save_safetensors(llada, out, raw, overwrite=True)
    assert not (out / "README.md").exists()  # the directory was replaced as a whole
    assert ports.load_pretrained(out).fingerprint() == llada.fingerprint()


def test_transform_without_inverse_is_refused():
    rule = KeyRule(("x",), "some.weight", lambda w, c: w * 2)
    with pytest.raises(ConfigError, match="no inverse"):
        inverse_transform(rule)


def test_inverse_transforms_invert_the_forward_ones(llada):
    c = llada.config
    rng = np.random.default_rng(0)
    cases = [
        (base.identity, (c.d_model,)),
        (base.transpose, (c.mlp_hidden, c.d_model)),
        (base.split_heads_in("n_heads"), (c.n_heads * c.head_dim, c.d_model)),
        (base.split_heads_in("n_kv_heads"), (c.n_kv_heads * c.head_dim, c.d_model)),
        (base.split_heads_bias("n_heads"), (c.n_heads * c.head_dim,)),
        (base.split_heads_out, (c.d_model, c.n_heads * c.head_dim)),
    ]
    for forward, shape in cases:
        torch_layout = rng.normal(size=shape).astype(np.float32)
        inverse = inverse_transform(KeyRule(("x",), "k", forward))
        np.testing.assert_array_equal(inverse(forward(torch_layout, c), c), torch_layout)


def test_tensors_come_in_key_table_order(llada):
    keys = [k for k, _ in checkpoint_tensors(llada)]
    assert keys[0] == "model.transformer.wte.weight"
    assert keys[1:4] == [f"model.transformer.blocks.{i}.attn_norm.weight" for i in range(3)]
    assert len(keys) == len(set(keys)) == 30
