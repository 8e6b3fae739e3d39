"""Checkpoint conversion: sharded reads, orbax round trip, and one clear error per bad input."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ports
from ports import CheckpointError, ConfigError

FIXTURE = Path(__file__).parent / "fixtures" / "llada"
EMBED_KEY = "model.transformer.wte.weight"


def copy_fixture(dst: Path, tensors=None, config=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    config = config if config is not None else json.loads((FIXTURE / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config))
    tensors = tensors if tensors is not None else load_file(FIXTURE / "model.safetensors")
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def reference():
    return ports.load_pretrained(FIXTURE)


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_checkpoint_equals_single_file(tmp_path, reference):
    tensors = load_file(FIXTURE / "model.safetensors")
    keys = sorted(tensors)
    shards = {"model-00001-of-00003.safetensors": keys[:7], "model-00002-of-00003.safetensors": keys[7:20],
              "model-00003-of-00003.safetensors": keys[20:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, tmp_path / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
    assert_same_params(ports.load_pretrained(tmp_path), reference)


def test_convert_round_trip_and_reload(tmp_path, reference):
    out = ports.convert(FIXTURE, tmp_path / "converted")
    restored = ports.load_pretrained(out)
    assert_same_params(restored, reference)
    assert restored.mask_token_id == reference.mask_token_id
    assert restored.fingerprint() == reference.fingerprint()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_convert_refuses_to_overwrite_without_flag(tmp_path):
    out = tmp_path / "converted"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ports.UserError, match="already exists"):
        ports.convert(FIXTURE, out)
    assert (out / "keep.txt").read_text() == "x"


def test_failed_convert_leaves_no_output(tmp_path):
    tensors = load_file(FIXTURE / "model.safetensors")
    del tensors[EMBED_KEY]
    bad = copy_fixture(tmp_path / "bad", tensors)
    with pytest.raises(CheckpointError):
        ports.convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fingerprint_changes_with_weights(tmp_path, reference):
    tensors = load_file(FIXTURE / "model.safetensors")
    tensors[EMBED_KEY] = tensors[EMBED_KEY] + 1e-3
    other = ports.load_pretrained(copy_fixture(tmp_path, tensors))
    assert other.fingerprint() != reference.fingerprint()


# --- bad inputs: one clear error each -------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="neither a directory nor an embedded model"):
        ports.load_pretrained(tmp_path / "nope")


def test_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is empty"):
        ports.load_pretrained(tmp_path)


def test_missing_config_json(tmp_path):
    shutil.copy(FIXTURE / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="no config.json"):
        ports.load_pretrained(tmp_path)


def test_invalid_config_json(tmp_path):
    copy_fixture(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ports.load_pretrained(tmp_path)


def test_unknown_model_type(tmp_path):
    config = json.loads((FIXTURE / "config.json").read_text()) | {"model_type": "gpt2"}
    with pytest.raises(ConfigError, match="unknown model_type 'gpt2'"):
        ports.load_pretrained(copy_fixture(tmp_path, config=config))


def test_unknown_config_field(tmp_path):
    config = json.loads((FIXTURE / "config.json").read_text()) | {"sliding_window_size": 4}
    with pytest.raises(ConfigError, match="unknown llada config field.*sliding_window_size"):
        ports.load_pretrained(copy_fixture(tmp_path, config=config))


def test_unsupported_config_value(tmp_path):
    config = json.loads((FIXTURE / "config.json").read_text()) | {"alibi": True}
    with pytest.raises(ConfigError, match="alibi=True"):
        ports.load_pretrained(copy_fixture(tmp_path, config=config))


def test_missing_tensor(tmp_path):
    tensors = load_file(FIXTURE / "model.safetensors")
    del tensors["model.transformer.blocks.2.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*blocks\.2\.up_proj\.weight"):
        ports.load_pretrained(copy_fixture(tmp_path, tensors))


def test_extra_tensor(tmp_path):
    tensors = load_file(FIXTURE / "model.safetensors")
    tensors["model.transformer.blocks.3.q_proj.weight"] = tensors["model.transformer.blocks.0.q_proj.weight"]
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) the llada architecture does not use.*blocks\.3\.q_proj"):
        ports.load_pretrained(copy_fixture(tmp_path, tensors))


def test_wrong_shape(tmp_path):
    tensors = load_file(FIXTURE / "model.safetensors")
    tensors["model.transformer.blocks.1.ff_proj.weight"] = np.zeros((96, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ff_proj\.weight.*shape \[96, 64\]"):
        ports.load_pretrained(copy_fixture(tmp_path, tensors))


def test_truncated_safetensors(tmp_path):
    copy_fixture(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a valid safetensors"):
        ports.load_pretrained(tmp_path)


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
    # not even a valid pickle: proves we never try to open it
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never unpickles.*safetensors"):
        ports.load_pretrained(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    copy_fixture(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {EMBED_KEY: "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing: model-00002-of-00002.safetensors"):
        ports.load_pretrained(tmp_path)


def test_mask_token_outside_vocab(tmp_path):
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        ports.load_pretrained(FIXTURE, mask_token_id=10_000)
