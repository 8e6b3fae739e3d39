"""Where every parameter lives on a device mesh: logical axes, rules, and profiles.

Three layers, as in maxtext / flax's logical partitioning:

1. `LOGICAL_AXES`: each parameter path of `ports.transformer.Transformer` -> the names of its axes
   ('vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'experts', 'layers'). This table
   knows the architecture and nothing about hardware.
2. Rules: an ordered sequence of (logical name, mesh axis or None). Rules are read in order; a
   dimension takes the first rule that names it whose mesh axis is still unused by that parameter
   and whose size divides the dimension (otherwise the dimension stays replicated: e.g. the 4
   heads of a tiny fixture on an 8-way 'model' axis). Apart from that divisibility fallback this is
   `flax.linen.logical_to_mesh_axes`. 'layers' is never sharded: layers are `nn.scan`-ned and the
   loader writes them one at a time.
3. Profiles: a mesh shape over the two axes ('data', 'model') plus the rules for it, named by a
   short string (`parse_profile`):

       'dp' / 'dp8'    every device holds all parameters; facts are split over 'data'
                       (e.g. 8 GPUs, each with the whole bf16 8B model: 16 GB of 80)
       'tp' / 'tp8'    parameters split over 'model' along heads, kv_heads, MLP width, vocabulary
                       and experts (e.g. a TPU v5e-8, 16 GB per chip: 2 GB of the 8B model each)
       'dp2tp4', ...   both: facts over 'data', each data replica tensor-parallel over 'model'

   A number-less name takes every device (`jax.device_count()`).

Meshes use `AxisType.Auto` (jax >= 0.10 `make_mesh` defaults to explicit axes, under which
ordinary jitted code with sharded parameters would have to annotate every op).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ports.config import TransformerConfig
from ports.errors import ConfigError

MESH_AXES = ("data", "model")
LOGICAL_NAMES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "experts", "layers")

Rules = tuple[tuple[str, "str | tuple[str, ...] | None"], ...]

# Parameter path ('/'-joined keys of the params tree) -> logical axis names, one per dimension.
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embed/embedding": ("vocab", "embed"),
    "blocks/attn_norm/scale": ("layers", "embed"),
    "blocks/mlp_norm/scale": ("layers", "embed"),
    "blocks/attn/q_proj/kernel": ("layers", "embed", "heads", "head_dim"),
    "blocks/attn/k_proj/kernel": ("layers", "embed", "kv_heads", "head_dim"),
    "blocks/attn/v_proj/kernel": ("layers", "embed", "kv_heads", "head_dim"),
    "blocks/attn/q_proj/bias": ("layers", "heads", "head_dim"),
    "blocks/attn/k_proj/bias": ("layers", "kv_heads", "head_dim"),
    "blocks/attn/v_proj/bias": ("layers", "kv_heads", "head_dim"),
    "blocks/attn/q_norm/scale": ("layers", "head_dim"),
    "blocks/attn/k_norm/scale": ("layers", "head_dim"),
    "blocks/attn/o_proj/kernel": ("layers", "heads", "head_dim", "embed"),
    # dense SwiGLU
    "blocks/mlp/gate_proj/kernel": ("layers", "embed", "mlp"),
    "blocks/mlp/up_proj/kernel": ("layers", "embed", "mlp"),
    "blocks/mlp/down_proj/kernel": ("layers", "mlp", "embed"),
    # mixture of experts
    "blocks/mlp/router/kernel": ("layers", "embed", "experts"),
    "blocks/mlp/gate_proj": ("layers", "experts", "embed", "mlp"),
    "blocks/mlp/up_proj": ("layers", "experts", "embed", "mlp"),
    "blocks/mlp/down_proj": ("layers", "experts", "mlp", "embed"),
    "final_norm/scale": ("embed",),
    "lm_head/kernel": ("embed", "vocab"),
}

# Tensor parallelism, Megatron style: attention split by heads, the MLP by its hidden width, the
# vocabulary of embedding and head, mixtures by expert (expert parallelism; an expert's own MLP
# width then stays whole, because 'model' is already taken by 'experts' in that parameter).
TENSOR_PARALLEL_RULES: Rules = (
    ("experts", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
)
REPLICATED_RULES: Rules = ()


@dataclasses.dataclass(frozen=True)
class MeshProfile:
    """A named mesh shape over ('data', 'model') and the rules that place parameters on it."""

    name: str
    data: int
    model: int
    rules: Rules

    @property
    def num_devices(self) -> int:
        return self.data * self.model


_PROFILE_RE = re.compile(r"(dp(\d*))?(?:(?<=.)[-x_])?(tp(\d*))?")


def parse_profile(text: str, device_count: int | None = None) -> MeshProfile:
    """'dp', 'tp', 'dp8', 'tp8', 'dp2tp4' (also 'dp2-tp4', 'dp2xtp4') -> MeshProfile.

    A missing count takes every device left: 'dp' = all devices on 'data', 'dp2tp' = 2 data
    replicas of (devices / 2)-way tensor parallelism. The product must equal the device count.
    """
    n = jax.device_count() if device_count is None else device_count
    name = text.strip().lower()
    match = _PROFILE_RE.fullmatch(name)
    if not name or not match or not (match.group(1) or match.group(3)):
        raise ConfigError(f"unknown mesh profile {text!r}: use 'dp', 'tp', 'dpN', 'tpN' or 'dpNtpM' "
                          "(data-parallel N ways, tensor-parallel M ways)")
    counts = []
    for given, digits in ((match.group(1), match.group(2)), (match.group(3), match.group(4))):
        counts.append(1 if given is None else int(digits) if digits else None)
    if counts == [None, None]:
        raise ConfigError(f"mesh profile {text!r}: give a count for at least one of dp / tp")
    data, model = counts
    if data is None:
        data = n // model if model and n % model == 0 else 0
    if model is None:
        model = n // data if data and n % data == 0 else 0
    if data < 1 or model < 1 or data * model != n:
        raise ConfigError(f"mesh profile {text!r} does not fit the {n} device(s) present "
                          f"({jax.default_backend()}): it needs data x model = {n}")
    rules = TENSOR_PARALLEL_RULES if model > 1 else REPLICATED_RULES
    return MeshProfile(name=name, data=data, model=model, rules=rules)


def make_mesh(profile: str | MeshProfile, devices: Sequence[Any] | None = None) -> Mesh:
    """The ('data', 'model') mesh of a profile over `devices` (default: all), axes `Auto`."""
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(profile, str):
        profile = parse_profile(profile, len(devices))
    if profile.num_devices != len(devices):
        raise ConfigError(f"mesh profile {profile.name!r} needs {profile.num_devices} devices, "
                          f"{len(devices)} given")
    return jax.make_mesh((profile.data, profile.model), MESH_AXES,
                         axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def rules_for(profile: str | MeshProfile, device_count: int | None = None) -> Rules:
    if isinstance(profile, str):
        profile = parse_profile(profile, device_count)
    return profile.rules


def data_axis_size(mesh: Mesh) -> int:
    return int(mesh.shape["data"]) if "data" in mesh.shape else 1


# --- logical axes -> partition specs -------------------------------------------------------------

def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def logical_axes_of(path: str, ndim: int) -> tuple[str, ...]:
    """Logical axes of the parameter at `path` ('blocks/attn/q_proj/kernel')."""
    try:
        axes = LOGICAL_AXES[path]
    except KeyError:
        raise ConfigError(f"no logical axes for parameter {path!r}: add it to "
                          "ports.sharding.LOGICAL_AXES") from None
    if len(axes) != ndim:
        raise ConfigError(f"parameter {path!r} has {ndim} dimensions but its logical axes are {axes}")
    return axes


def logical_axes(config: TransformerConfig) -> Any:
    """Tree (same structure as the params) of logical-axis tuples, computed without memory."""
    from ports.checkpoint import abstract_params

    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: logical_axes_of(_path_name(path), leaf.ndim), abstract_params(config))


def _check_rules(rules: Rules, mesh: Mesh) -> list[tuple[str, tuple[str, ...]]]:
    checked = []
    for entry in rules:
        if len(entry) != 2:
            raise ConfigError(f"a sharding rule is (logical name, mesh axis), got {entry!r}")
        logical, target = entry
        if logical not in LOGICAL_NAMES:
            raise ConfigError(f"unknown logical axis {logical!r} in sharding rules; known: "
                              f"{', '.join(LOGICAL_NAMES)}")
        if logical == "layers" and target is not None:
            raise ConfigError("the 'layers' axis cannot be sharded: layers are scanned and loaded "
                              "one at a time")
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        unknown = [a for a in axes if a not in mesh.shape]
        if unknown:
            raise ConfigError(f"sharding rule {entry!r} names mesh axis {unknown[0]!r}, which the "
                              f"mesh {dict(mesh.shape)} does not have")
        checked.append((logical, axes))
    return checked


def logical_to_spec(axes: Sequence[str], shape: Sequence[int], rules: Rules, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of one parameter (see the module docstring for the resolution order)."""
    spec: list[Any] = [None] * len(axes)
    used: set[str] = set()
    for logical, mesh_axes in _check_rules(rules, mesh):
        if not mesh_axes or logical not in axes:
            continue
        pos = list(axes).index(logical)
        size = math.prod(int(mesh.shape[a]) for a in mesh_axes)
        if spec[pos] is None and not used.intersection(mesh_axes) and shape[pos] % size == 0:
            spec[pos] = mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
            used.update(mesh_axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def param_specs(config: TransformerConfig, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Tree of PartitionSpecs for the config's parameters (rules None: replicate everything)."""
    from ports.checkpoint import abstract_params

    rules = REPLICATED_RULES if rules is None else tuple(rules)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: logical_to_spec(logical_axes_of(_path_name(path), leaf.ndim), leaf.shape,
                                           rules, mesh),
        abstract_params(config))


def param_shardings(config: TransformerConfig, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Tree of NamedShardings for the config's parameters."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(config, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_params(params: Any, config: TransformerConfig, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Place an existing parameter tree onto the mesh (device_put leaf by leaf)."""
    shardings = param_shardings(config, mesh, rules)
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def describe(params: Any) -> dict[str, str]:
    """'path' -> 'shape spec' for every leaf (for logs and `timerome info`)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        spec = getattr(getattr(leaf, "sharding", None), "spec", None)
        out[_path_name(path)] = f"{tuple(np.shape(leaf))} {spec if spec is not None else 'unsharded'}"
    return out
