"""What a family is: a config whitelist and a declarative key table.

A family module turns a raw `config.json` dict into a `TransformerConfig` (refusing fields and
values it does not implement) and lists `KeyRule`s mapping Flax parameter paths to checkpoint keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from ports.config import TransformerConfig
from ports.errors import CheckpointError, ConfigError

Transform = Callable[[np.ndarray, TransformerConfig], np.ndarray]

# Fields every HF config may carry that do not change the forward pass at inference.
INFORMATIONAL_FIELDS = frozenset({
    "_name_or_path", "architectures", "auto_map", "model_type", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "initializer_range", "bos_token_id", "tokenizer_class",
    "attention_dropout", "output_router_logits", "router_aux_loss_coef", "return_dict",
    "output_hidden_states", "output_attentions", "pretraining_tp", "max_window_layers",
})


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """Flax leaf `target` <- checkpoint tensor `source` through `transform`.

    `source` may hold '{layer}' (the target then has a leading [L] axis, filled slice by slice) and
    '{expert}' (a further [E] axis after [L]).
    """

    target: tuple[str, ...]
    source: str
    transform: Transform

    @property
    def stacked_axes(self) -> tuple[str, ...]:
        return tuple(a for a in ("layer", "expert") if "{" + a + "}" in self.source)


# --- transforms from torch layouts ([out, in] linear weights) to the einsum layouts ------------

def identity(w: np.ndarray, c: TransformerConfig) -> np.ndarray:
    return w


def transpose(w: np.ndarray, c: TransformerConfig) -> np.ndarray:
    """torch Linear [out, in] -> kernel [in, out]."""
    return w.T


def _check_head_axis(w: np.ndarray, axis: int, n_heads_field: str, c: TransformerConfig) -> int:
    """The number of heads the config promises must tile the tensor's head axis exactly.

    Checked here, before the reshape, because a head-count mismatch (e.g. num_key_value_heads
    edited in config.json) otherwise surfaces as numpy's bare "cannot reshape array".
    """
    n = getattr(c, n_heads_field)
    if w.ndim == 0 or w.shape[axis] != n * c.head_dim:
        raise CheckpointError(
            f"a checkpoint tensor of shape {list(w.shape)} does not split into {n_heads_field}={n} "
            f"heads of head_dim {c.head_dim} (expected {n * c.head_dim} along that axis): the "
            "config's head counts do not match the checkpoint")
    return n


def split_heads_in(n_heads_field: str) -> Transform:
    """q/k/v weight [heads*H, D] -> kernel [D, heads, H]."""
    def fn(w: np.ndarray, c: TransformerConfig) -> np.ndarray:
        n = _check_head_axis(w, 0, n_heads_field, c)
        return w.reshape(n, c.head_dim, w.shape[-1]).transpose(2, 0, 1)
    return fn


def split_heads_bias(n_heads_field: str) -> Transform:
    def fn(b: np.ndarray, c: TransformerConfig) -> np.ndarray:
        return b.reshape(_check_head_axis(b, 0, n_heads_field, c), c.head_dim)
    return fn


def split_heads_out(w: np.ndarray, c: TransformerConfig) -> np.ndarray:
    """o_proj weight [D, N*H] -> kernel [N, H, D]."""
    n = _check_head_axis(w, -1, "n_heads", c)
    return w.reshape(w.shape[0], n, c.head_dim).transpose(1, 2, 0)


# --- config whitelisting -----------------------------------------------------------------------

class ConfigReader:
    """Reads fields of a raw config dict, remembering which were read, so leftovers are errors."""

    def __init__(self, raw: Mapping[str, Any], family: str):
        self.raw = dict(raw)
        self.family = family
        self.seen: set[str] = set(INFORMATIONAL_FIELDS)

    def get(self, name: str, default: Any = dataclasses.MISSING) -> Any:
        self.seen.add(name)
        if name in self.raw:
            return self.raw[name]
        if default is dataclasses.MISSING:
            raise ConfigError(f"{self.family} config.json lacks the required field {name!r}")
        return default

    def integer(self, name: str, default: Any = dataclasses.MISSING) -> Any:
        value = self.get(name, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{self.family} config field {name!r} must be an integer, got {value!r}")
        return value

    def number(self, name: str, default: Any = dataclasses.MISSING) -> float:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.family} config field {name!r} must be a number, got {value!r}")
        return float(value)

    def require(self, name: str, allowed: tuple, default: Any = dataclasses.MISSING) -> Any:
        """A field this port supports only with the listed values."""
        value = self.get(name, default)
        if value not in allowed:
            shown = " or ".join(repr(a) for a in allowed)
            raise ConfigError(f"unsupported {self.family} config: {name}={value!r} "
                              f"(this port implements {shown})")
        return value

    def ignore(self, *names: str) -> None:
        """Fields that do not affect inference (dropouts, init schemes, training precision)."""
        self.seen.update(names)

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            raise ConfigError(f"unknown {self.family} config field(s) {', '.join(unknown)}: "
                              "this port does not know what they change, so it refuses to guess")


def token_id(value: Any) -> int | None:
    """HF token ids may be a list (several eos ids); the first one is the pad/eos used here."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)
