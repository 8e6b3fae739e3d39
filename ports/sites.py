"""Sites, captures and edits: how code outside `ports` reads and changes a forward.

A *site* is one place of the network: a module of one layer. Every site has a **value** (what the
module writes into the network) and a **key** (what the projection that writes the value reads):

    module   value (width)                         key (width)
    embed    input embeddings [D]                  the embeddings themselves [D]
    attn     attention output [D]                  input of the output projection [N·H]
    mlp      MLP output [D]                        input of the down projection [F]
                                                   (mixture of experts: the mixture's input [D])
    resid    block output [D]                      the block output itself [D]
    final    output of the final norm [D]          the same [D]
    router   MoE router logits [E]                 the router's input [D]

`embed` and `final` have no layer. The method layer traces and edits `MODULES`; `final` and
`router` exist for parity checks.

A *capture* (`Backbone.apply(..., capture=sites)`) returns each site's key and value; `Site(None,
module)` captures every layer, stacked [L, B, T, ·]. An *edit* is a pytree with a `site` and a
pure `__call__(key_BTI, value_BTD) -> value_BTD`: `Backbone.apply(..., edits=...)` (or a backbone
carrying edits, `Backbone.with_edits`) calls it at its site in every forward. The key an edit sees
is the site's key before any edit of that site (so edits at one site compose by adding, not by
reading each other); the value is threaded through the site's edits in order. The layer of an
edit's site is data (an int32 scalar, -1 for "nowhere"; None for every layer), so a new edit of
the same structure never recompiles and edits vmap over layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from ports.config import TransformerConfig
from ports.errors import ConfigError

Array = jax.Array

MODULES = ("resid", "attn", "mlp")                      # what a tracer patches and a memory edits
SITES = ("embed", *MODULES, "final", "router")
LAYERLESS = ("embed", "final")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Site:
    """`module` (static) of layer `layer` (data: an int32 scalar; None = every layer)."""

    layer: Any
    module: str = dataclasses.field(metadata=dict(static=True), default="resid")

    def __post_init__(self):
        if self.module not in SITES:
            raise ConfigError(f"unknown site module {self.module!r}; choose from {', '.join(SITES)}")

    def key_width(self, config: TransformerConfig) -> int:
        if self.module == "attn":
            return config.n_heads * config.head_dim
        if self.module == "mlp" and not config.is_moe:
            return config.mlp_hidden
        return config.d_model

    def value_width(self, config: TransformerConfig) -> int:
        return config.num_experts if self.module == "router" else config.d_model


class Edit(Protocol):
    """What `Backbone.apply(edits=...)` accepts: a pytree with a site and a pure function."""

    site: Site

    def __call__(self, key_BTI: Array, value_BTD: Array) -> Array: ...


class Captured(NamedTuple):
    """A site's key [B, T, I] and value [B, T, D] (with a leading [L] for `Site(None, ...)`)."""

    key: Array
    value: Array


def check_edit(edit: Any, config: TransformerConfig) -> None:
    """One clear error for something that cannot act on this architecture."""
    site = getattr(edit, "site", None)
    if not isinstance(site, Site) or not callable(edit):
        raise ConfigError(f"an edit needs a `site` (ports.Site) and a __call__(key, value); got "
                          f"{type(edit).__name__}")
    if site.module == "router" and not config.is_moe:
        raise ConfigError("this backbone has no router (it is not a mixture of experts)")
    if site.layer is not None and not isinstance(site.layer, jax.core.Tracer) and site.module not in LAYERLESS:
        layer = int(site.layer)
        if not 0 <= layer < config.n_layers:
            raise ConfigError(f"an edit at layer {layer} is outside 0..{config.n_layers - 1}")


# The submodule whose call is intercepted for each site (its input is the key, its output the
# value), and whether the key is the output instead (sites that are a stream, not a projection).
_INTERCEPTED = {"embed": "embed", "attn": "o_proj", "resid": "resid", "final": "final_norm", "router": "router"}
_KEY_IS_VALUE = ("embed", "resid", "final")


def _site_of(submodule: str, config: TransformerConfig) -> str | None:
    if submodule == "down_proj":
        return None if config.is_moe else "mlp"
    if submodule == "mlp":
        return "mlp" if config.is_moe else None
    return next((site for site, name in _INTERCEPTED.items() if name == submodule), None)


def interceptor(config: TransformerConfig, edits: tuple, capture: frozenset[str]):
    """The `flax.linen.intercept_methods` interceptor that applies `edits` and sows the keys and
    values of the `capture` modules (enter it inside the traced function)."""
    by_module: dict[str, list] = {}
    for edit in edits:
        by_module.setdefault(edit.site.module, []).append(edit)

    def intercept(next_fun, args, kwargs, context):
        site = _site_of(context.module.name, config) if context.method_name == "__call__" else None
        if site is None or (site not in by_module and site not in capture):
            return next_fun(*args, **kwargs)
        value = next_fun(*args, **kwargs)
        key = value if site in _KEY_IS_VALUE else args[0]
        key = key.reshape(key.shape[:2] + (-1,))          # o_proj's input [B,T,N,H] -> [B,T,N·H]
        layer = kwargs.get("layer_index")
        for edit in by_module.get(site, ()):
            def apply(k, v, edit=edit):
                return edit(k, v).astype(v.dtype)
            if layer is None or edit.site.layer is None:
                value = apply(key, value)
            else:   # a real branch: layers other than the edit's pay nothing (a select under vmap)
                value = jax.lax.cond(layer == edit.site.layer, apply, lambda k, v: v, key, value)
        if site in capture:
            context.module.sow("intermediates", f"{site}:key", key)
            context.module.sow("intermediates", f"{site}:value", value)
        return value

    return intercept


def read_captures(intermediates: dict, sites: tuple[Site, ...]) -> tuple[Captured, ...]:
    """The sown keys and values of `sites` (stacked over layers by the scan), one `Captured` each."""
    found: dict[str, Array] = {}

    def visit(tree):
        for name, value in tree.items():
            if ":" in name:
                found[name] = value[0]
            elif isinstance(value, dict):
                visit(value)

    visit(intermediates)
    out = []
    for site in sites:
        key, value = found[f"{site.module}:key"], found[f"{site.module}:value"]
        if site.module not in LAYERLESS and site.layer is not None:
            index = jnp.asarray(site.layer, jnp.int32)
            key, value = (jax.lax.dynamic_index_in_dim(x, index, keepdims=False) for x in (key, value))
        out.append(Captured(key, value))
    return tuple(out)


# the projection whose kernel maps a site's key to its value, by module (value = key @ kernel)
_WRITING_KERNEL = {"mlp": ("mlp", "down_proj"), "attn": ("attn", "o_proj")}


def site_kernel(params: dict, config: TransformerConfig, site: Site) -> Array:
    """The kernel [I, D] that writes the site's value from its key (value = key @ kernel + bias):
    the down projection for `mlp`, the output projection (heads flattened) for `attn`."""
    if site.module not in _WRITING_KERNEL or config.is_moe and site.module == "mlp":
        raise ConfigError(f"no single projection writes the {site.module!r} site's value from its key"
                          + (" (a mixture of experts)" if site.module == "mlp" else "")
                          + "; weight edits need an 'mlp' or 'attn' site")
    group, name = _WRITING_KERNEL[site.module]
    kernel = params["blocks"][group][name]["kernel"][int(site.layer)]
    return kernel.reshape(-1, kernel.shape[-1])


def add_to_site_kernel(params: dict, config: TransformerConfig, site: Site, delta_ID: Array) -> dict:
    """A copy of `params` whose site kernel (`site_kernel`) is kernel + delta_ID: afterwards the
    site's value is key @ (kernel + delta), i.e. the old value + key @ delta, at every token."""
    kernel = site_kernel(params, config, site)
    if delta_ID.shape != kernel.shape:
        raise ConfigError(f"a weight edit of the {site.module!r} site must be {list(kernel.shape)}, got "
                          f"{list(delta_ID.shape)}")
    group, name = _WRITING_KERNEL[site.module]
    stacked = params["blocks"][group][name]["kernel"]
    layer = int(site.layer)
    new = (kernel + delta_ID.astype(kernel.dtype)).reshape(stacked.shape[1:])
    out = jax.tree.map(lambda x: x, params)                           # a new tree; leaves shared
    out["blocks"][group][name] = {**params["blocks"][group][name], "kernel": stacked.at[layer].set(new)}
    return out


__all__ = ["Captured", "Edit", "LAYERLESS", "MODULES", "SITES", "Site", "add_to_site_kernel", "check_edit",
           "interceptor", "read_captures", "site_kernel"]
