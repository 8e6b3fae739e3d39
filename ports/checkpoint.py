"""Reading Hugging Face safetensors checkpoints into the Flax parameter tree, and orbax round trips.

The conversion is driven by the family's declarative key table. Tensors are read one at a time
through `safe_open(..., framework="np")`, each transformed and written into its slot of a
preallocated target: a numpy array, or (given shardings) an array already on its devices, so the
host never holds more than one copy of the parameters plus one tensor (measured:
tests/test_sharding.py).
torch is never imported and nothing is unpickled.
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
SAVE_CHUNK_BYTES = 2 ** 24
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


def _shard_keys(shard: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(shard), framework="np") as f:
            return list(f.keys())
    except SafetensorError as e:
        raise CheckpointError(f"{shard} is truncated or not a valid safetensors file ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {shard}: {e}") from None


def _stream_tensors(model_dir: Path, config: TransformerConfig, dtype: Any, expected: Any):
    """Yield (target path, slot, full target shape, converted tensor) for every checkpoint tensor,
    shard by shard in file order; then refuse unknown and missing keys.

    Each tensor is read through its own short-lived `safe_open`: the shard is memory-mapped, and
    pages touched through a mapping count as resident memory until it is closed, so keeping a
    5 GB shard open while reading it would add the whole shard to the process's peak memory.
    """
    from safetensors import SafetensorError, safe_open

    table = _expand_rules(config)
    filled: set[str] = set()
    unexpected: list[str] = []
    for shard in safetensors_files(model_dir):
        for key in _shard_keys(shard):
            if key not in table:
                unexpected.append(key)
                continue
            if key in filled:
                raise CheckpointError(f"tensor {key} is stored in more than one shard (again in {shard.name})")
            target, slot, rule = table[key]
            try:
                with safe_open(str(shard), framework="np") as f:
                    raw = f.get_tensor(key)
                    source_shape = f.get_slice(key).get_shape()
            except SafetensorError as e:
                raise CheckpointError(f"{shard} is truncated or not a valid safetensors file ({e})") from None
            except OSError as e:
                raise CheckpointError(f"cannot read {shard}: {e}") from None
            try:
                tensor = rule.transform(raw, config)
            except CheckpointError as e:
                raise CheckpointError(f"tensor {key} in {shard.name}: {e}") from None
            full_shape = tuple(_leaf(expected, target).shape)
            if tensor.shape != full_shape[len(slot):]:
                raise CheckpointError(
                    f"tensor {key} in {shard.name} has shape {list(source_shape)}, which does "
                    f"not fit the config (expected {list(full_shape[len(slot):])} after "
                    f"conversion to {'/'.join(target)})")
            if dtype is not None:
                tensor = tensor.astype(dtype)
            filled.add(key)
            yield target, slot, full_shape, tensor
            del raw, tensor
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensor(s) the {config.family} "
                              f"architecture does not use: {shown}")
    missing = sorted(set(table) - filled)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s) the config requires: {shown}")


class _NumpySink:
    """Leaves as numpy arrays; stacked leaves preallocated and filled slot by slot."""

    def __init__(self):
        self.params: dict = {}

    def put(self, target, slot, full_shape, tensor) -> None:
        if not slot:
            _set_leaf(self.params, target, np.ascontiguousarray(tensor))
            return
        try:
            array = _leaf(self.params, target)
        except KeyError:
            array = np.empty(full_shape, dtype=tensor.dtype)
            _set_leaf(self.params, target, array)
        array[slot] = tensor

    def finish(self) -> dict:
        return self.params


def _to_devices(value: np.ndarray, sharding) -> jax.Array:
    """A host array placed with `sharding`; each device receives only its own block."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _layer_sharding(sharding):
    """Sharding of one layer of a stacked [L, ...] leaf (the layer axis is never sharded)."""
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        if spec and spec[0] is not None:
            raise CheckpointError(f"the layer axis of a stacked parameter cannot be sharded ({sharding.spec})")
        return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
    raise CheckpointError(f"unsupported sharding {type(sharding).__name__} (use NamedSharding)")


_ZEROS_CACHE: dict = {}
_SET_LAYER_CACHE: dict = {}


def _zeros_on(shape, dtype, sharding) -> jax.Array:
    key = (tuple(shape), np.dtype(dtype).str, sharding)
    if key not in _ZEROS_CACHE:
        _ZEROS_CACHE[key] = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return _ZEROS_CACHE[key]()


def _set_layer(array: jax.Array, value: jax.Array, layer: int) -> jax.Array:
    """array[layer] = value, in place (the old buffer is donated)."""
    key = array.sharding
    if key not in _SET_LAYER_CACHE:
        _SET_LAYER_CACHE[key] = jax.jit(
            lambda a, v, i: jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), i, 0),
            donate_argnums=0, out_shardings=array.sharding)
    return _SET_LAYER_CACHE[key](array, value, np.int32(layer))


class _DeviceSink:
    """Leaves built directly on their devices with their final sharding.

    Unstacked leaves (embedding, head, final norm) go through `jax.make_array_from_callback`. A
    stacked [L, ...] leaf is allocated once on its devices and each layer is written into it by a
    jitted in-place update (donated buffer) as soon as the layer's tensor is read; the expert
    tensors of a mixture layer are gathered on the host into one [E, ...] block first. The host
    therefore holds at most one tensor (or one layer's experts) beyond what the devices hold.
    """

    def __init__(self, shardings: Any):
        self.shardings = shardings
        self.params: dict = {}
        self.staged: dict = {}

    def put(self, target, slot, full_shape, tensor) -> None:
        sharding = _leaf(self.shardings, target)
        if not slot:
            _set_leaf(self.params, target, _to_devices(tensor, sharding))
            return
        layer, rest = slot[0], slot[1:]
        if rest:
            buffer, count = self.staged.pop((target, layer), (None, 0))
            if buffer is None:
                buffer = np.empty(full_shape[1:], dtype=tensor.dtype)
            buffer[rest] = tensor
            count += 1
            if count < int(np.prod(full_shape[1:len(slot)])):
                self.staged[(target, layer)] = (buffer, count)
                return
            tensor = buffer
        try:
            array = _leaf(self.params, target)
        except KeyError:
            array = _zeros_on(full_shape, tensor.dtype, sharding)
        array = _set_layer(array, _to_devices(tensor, _layer_sharding(sharding)), layer)
        array.block_until_ready()  # bound the host memory held by in-flight updates
        _set_leaf(self.params, target, array)

    def finish(self) -> dict:
        if self.staged:  # unreachable after the key check; a guard against a partial expert block
            raise CheckpointError(f"incomplete expert tensors for {sorted(self.staged)[:3]}")
        return self.params


def load_safetensors_params(model_dir: Path, config: TransformerConfig, dtype: Any = None,
                            shardings: Any = None) -> dict:
    """Stream every shard into the parameter tree; every key consumed, every leaf produced.

    Without `shardings` the leaves are numpy arrays. With `shardings` (a tree of
    `jax.sharding.Sharding` shaped like the params, e.g. `ports.sharding.param_shardings`) each
    leaf is built directly on its devices (see `_DeviceSink`): peak host memory stays near one
    copy of the parameters however they are placed.
    """
    expected = abstract_params(config)
    sink = _NumpySink() if shardings is None else _DeviceSink(shardings)
    for target, slot, full_shape, tensor in _stream_tensors(model_dir, config, dtype, expected):
        sink.put(target, slot, full_shape, tensor)
    return sink.finish()


# --- orbax: converted parameters -------------------------------------------------------------

def is_converted_dir(model_dir: Path) -> bool:
    return (model_dir / TIMEROME_META).is_file()


def save_converted(out_dir: Path, params: Any, raw_config: dict, meta: dict,
                   tokenizer_source: Path | None = None) -> None:
    """Write config.json, timerome.json, the orbax params and tokenizer files into `out_dir`
    (which the caller creates atomically).

    The arrays are written in the StandardCheckpointer format (so `load_converted` restores them
    onto any mesh), but with device-to-host copies and in-flight writes limited to one leaf at a
    time and storage chunks of 16 MiB: by default orbax holds a host copy of every array while
    writing, a second full copy of the params.
    """
    import orbax.checkpoint as ocp

    (out_dir / "config.json").write_text(json.dumps(raw_config, indent=2, sort_keys=True) + "\n")
    (out_dir / TIMEROME_META).write_text(json.dumps({"format": TIMEROME_FORMAT, "version": 1, **meta},
                                                    indent=2, sort_keys=True) + "\n")
    params = jax.tree.map(jnp.asarray, params)
    largest = max(int(x.nbytes) for x in jax.tree.leaves(params))
    limit_gb = (largest + 2 ** 20) / 1e9  # orbax refuses an array as large as the limit
    handler = ocp.PyTreeCheckpointHandler(save_device_host_concurrent_gb=limit_gb,
                                          save_concurrent_gb=limit_gb)
    checkpointer = ocp.Checkpointer(handler)
    # storage chunks of <= 16 MiB: tensorstore then buffers a chunk, not a whole leaf, per write
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=SAVE_CHUNK_BYTES), params)
    checkpointer.save((out_dir / "params").absolute(),  # synchronous
                      args=ocp.args.PyTreeSave(params, save_args=save_args))
    if tokenizer_source is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_source / name).is_file():
                (out_dir / name).write_bytes((tokenizer_source / name).read_bytes())


def load_converted(model_dir: Path, config: TransformerConfig, dtype: Any = None,
                   shardings: Any = None) -> tuple[Any, dict]:
    """Restore `timerome convert` output. With `shardings` (a tree shaped like the params) orbax
    restores every leaf straight onto its devices, whatever mesh the params were saved from."""
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
    if shardings is not None:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              target, shardings)
    try:
        params = ocp.StandardCheckpointer().restore((model_dir / "params").absolute(), target)
    except Exception as e:  # orbax raises many types for a damaged or mismatched tree
        raise CheckpointError(f"cannot restore converted params from {model_dir / 'params'}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return params, meta
