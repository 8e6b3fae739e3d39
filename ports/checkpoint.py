"""Reading Hugging Face safetensors checkpoints into the Flax parameter tree, and orbax round trips.

The conversion is driven by the family's declarative key table. Shards are read one tensor at a
time through `safe_open(..., framework="np")` (memory-mapped), each tensor transformed and written
into its slot of a preallocated target array, so the host never holds more than one copy of the
parameters plus one tensor. torch is never imported and nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ports.config import TransformerConfig
from ports.errors import CheckpointError, ConfigError
from ports import families

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TIMEROME_META = "timerome.json"
TIMEROME_FORMAT = "timerome-params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def read_config_json(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return raw


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    path = Path(model_dir)
    if not path.exists():
        raise CheckpointError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (expected a checkpoint directory)")
    if not any(path.iterdir()):
        raise CheckpointError(f"{path} is empty: expected a Hugging Face checkpoint (config.json and "
                              "*.safetensors) or the output of `timerome convert`")
    return path


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's shard files: the index's shards, or the single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise CheckpointError(f"shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(model_dir.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{model_dir} holds only pickled weights ({', '.join(pickles)}); TimeROME never unpickles "
            "checkpoints: convert them to safetensors first (in the original environment: "
            "model.save_pretrained(dir, safe_serialization=True))")
    raise CheckpointError(f"no *.safetensors weights in {model_dir}")


def abstract_params(config: TransformerConfig, dtype: Any = jnp.float32) -> Any:
    """ShapeDtypeStruct tree of the parameters, computed without allocating them."""
    from ports.transformer import Transformer

    module = Transformer(config, param_dtype=dtype)
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    return jax.eval_shape(module.init, jax.random.key(0), ids)["params"]


def count_params(config: TransformerConfig) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))


def _leaf(tree: dict, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set_leaf(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _expand_rules(config: TransformerConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], Any]]:
    """checkpoint key -> (target path, slot index in the stacked target, rule)."""
    table: dict[str, tuple[tuple[str, ...], tuple[int, ...], Any]] = {}
    for rule in families.key_table(config):
        axes = rule.stacked_axes
        ranges = {"layer": range(config.n_layers), "expert": range(max(config.num_experts, 1))}
        slots: Iterable[tuple[int, ...]] = [()]
        for axis in axes:
            slots = [s + (i,) for s in slots for i in ranges[axis]]
        for slot in slots:
            key = rule.source.format(**dict(zip(axes, slot)))
            table[key] = (rule.target, slot, rule)
    return table


def load_safetensors_params(model_dir: Path, config: TransformerConfig, dtype: Any = None) -> dict:
    """Stream every shard into a numpy parameter tree; every key consumed, every leaf produced."""
    from safetensors import SafetensorError, safe_open

    expected = abstract_params(config)
    table = _expand_rules(config)
    params: dict = {}
    filled: set[str] = set()
    unexpected: list[str] = []
    for shard in safetensors_files(model_dir):
        try:
            with safe_open(str(shard), framework="np") as f:
                for key in f.keys():
                    if key not in table:
                        unexpected.append(key)
                        continue
                    target, slot, rule = table[key]
                    try:
                        tensor = rule.transform(f.get_tensor(key), config)
                    except CheckpointError as e:
                        raise CheckpointError(f"tensor {key} in {shard.name}: {e}") from None
                    full_shape = tuple(_leaf(expected, target).shape)
                    if tensor.shape != full_shape[len(slot):]:
                        source_shape = f.get_slice(key).get_shape()
                        raise CheckpointError(
                            f"tensor {key} in {shard.name} has shape {list(source_shape)}, which does "
                            f"not fit the config (expected {list(full_shape[len(slot):])} after "
                            f"conversion to {'/'.join(target)})")
                    if dtype is not None:
                        tensor = tensor.astype(dtype)
                    try:
                        array = _leaf(params, target)
                    except KeyError:
                        array = np.empty(full_shape, dtype=tensor.dtype) if slot else None
                    if slot:
                        array[slot] = tensor
                        _set_leaf(params, target, array)
                    else:
                        _set_leaf(params, target, np.ascontiguousarray(tensor))
                    filled.add(key)
        except SafetensorError as e:
            raise CheckpointError(f"{shard} is truncated or not a valid safetensors file ({e})") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {shard}: {e}") from None
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensor(s) the {config.family} "
                              f"architecture does not use: {shown}")
    missing = sorted(set(table) - filled)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s) the config requires: {shown}")
    return params


# --- orbax: converted parameters -------------------------------------------------------------

def is_converted_dir(model_dir: Path) -> bool:
    return (model_dir / TIMEROME_META).is_file()


def save_converted(out_dir: Path, params: Any, raw_config: dict, meta: dict,
                   tokenizer_source: Path | None = None) -> None:
    """Write config.json, timerome.json, the orbax params and tokenizer files into `out_dir`
    (which the caller creates atomically)."""
    import orbax.checkpoint as ocp

    (out_dir / "config.json").write_text(json.dumps(raw_config, indent=2, sort_keys=True) + "\n")
    (out_dir / TIMEROME_META).write_text(json.dumps({"format": TIMEROME_FORMAT, "version": 1, **meta},
                                                    indent=2, sort_keys=True) + "\n")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((out_dir / "params").absolute(), jax.tree.map(jnp.asarray, params))
    checkpointer.wait_until_finished()
    if tokenizer_source is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_source / name).is_file():
                (out_dir / name).write_bytes((tokenizer_source / name).read_bytes())


def load_converted(model_dir: Path, config: TransformerConfig, dtype: Any = None) -> tuple[Any, dict]:
    import orbax.checkpoint as ocp

    try:
        meta = json.loads((model_dir / TIMEROME_META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir / TIMEROME_META} is unreadable: {e}") from None
    if meta.get("format") != TIMEROME_FORMAT:
        raise CheckpointError(f"{model_dir} is not a `timerome convert` output (format "
                              f"{meta.get('format')!r})")
    stored_dtype = jnp.dtype(meta.get("dtype", "float32"))
    target = abstract_params(config, stored_dtype)
    try:
        params = ocp.StandardCheckpointer().restore((model_dir / "params").absolute(), target)
    except Exception as e:  # orbax raises many types for a damaged or mismatched tree
        raise CheckpointError(f"cannot restore converted params from {model_dir / 'params'}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return params, meta
