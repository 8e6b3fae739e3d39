"""`Backbone`: a config, its parameters, its mask token and its edits, as one pytree; `load_pretrained`."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ports import checkpoint, families, sites
from ports.config import TransformerConfig
from ports.errors import CheckpointError, ConfigError
from ports.sites import Site
from ports.transformer import Transformer

# Models that ship inside the package (see ports/embedded/README.md); `--model NAME` finds them.
EMBEDDED_DIR = Path(__file__).parent / "embedded"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Backbone:
    """A loaded masked diffusion LM, optionally carrying edits.

    It is a pytree whose leaves are `params` and the arrays of `edits`, so it can be passed
    straight into `jax.jit`, `jax.vmap` or `jax.grad`; everything else is static metadata.

    Attributes:
      config: the architecture.
      params: the Flax parameter tree (block weights stacked over layers [L, ...]).
      mask_token_id: id of the [MASK] token the model was trained with.
      dtype: compute dtype (the logits are always float32).
      source: where it was loaded from (informational).
      edits: edits (`ports.sites.Edit`) applied in every forward (`apply`, `embed`, `layer`,
        `head`), inside whatever jit runs it; `with_edits` adds some. The sampler, likelihoods,
        tracer and metrics take an edited backbone wherever they take a backbone.
    """

    config: TransformerConfig = dataclasses.field(metadata=dict(static=True))
    params: Any
    mask_token_id: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    dtype: Any = dataclasses.field(default=jnp.float32, metadata=dict(static=True))
    source: str | None = dataclasses.field(default=None, metadata=dict(static=True))
    edits: tuple = ()

    @property
    def _module(self) -> Transformer:
        return Transformer(self.config, dtype=self.dtype, param_dtype=self.dtype)

    @property
    def tokenizer_dir(self) -> str | None:
        """The checkpoint directory, if it holds tokenizer files."""
        if self.source and any((Path(self.source) / f).is_file() for f in checkpoint.TOKENIZER_FILES):
            return self.source
        return None

    def with_edits(self, *edits) -> "Backbone":
        """This backbone with `edits` applied in every forward after its own (weights untouched)."""
        for edit in edits:
            sites.check_edit(edit, self.config)
        return dataclasses.replace(self, edits=self.edits + tuple(edits))

    def without_edits(self) -> "Backbone":
        return dataclasses.replace(self, edits=())

    def _intercepting(self, edits: Sequence, capture: Sequence[Site] = ()):
        edits = self.edits + tuple(edits)
        if not edits and not capture:
            return contextlib.nullcontext()
        return nn.intercept_methods(sites.interceptor(self.config, edits, frozenset(s.module for s in capture)))

    def apply(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array | None = None,
              positions_BT: jax.Array | None = None, *, capture: Sequence[Site] = (),
              edits: Sequence = (), params: Any = None, logit_rows_BA: jax.Array | None = None):
        """The pure forward (call it inside your own jit/vmap): float32 logits [B, T, V].

        `edits` act in this call after the backbone's own. With `capture` (sites), returns
        (logits, tuple of `Captured(key, value)`, one per site; see `ports.sites`). With
        `logit_rows_BA`, the head runs only at those rows and the logits are [B, A, V] (row a is
        the raw logit row `logit_rows_BA[:, a]`, unshifted): a read-out that needs a few
        positions skips the largest matmul at the others.
        """
        variables = {"params": self.params if params is None else params}
        capture = tuple(capture)
        with self._intercepting(edits, capture):
            if not capture:
                return self._module.apply(variables, input_ids_BT, attention_mask_BT, positions_BT, logit_rows_BA)
            logits, state = self._module.apply(variables, input_ids_BT, attention_mask_BT, positions_BT,
                                               logit_rows_BA, mutable=["intermediates"])
        return logits, sites.read_captures(state["intermediates"], capture)

    # --- the forward in pieces: embed -> layer(0) ... layer(L-1) -> head ----------------------
    # Composing them equals `apply` (tested); edits act at the same sites with the same layer
    # index, so a caller can start from a cached residual stream at any layer.

    def embed(self, input_ids_BT: jax.Array, *, edits: Sequence = ()) -> jax.Array:
        """Input embeddings [B, T, D] (the 'embed' site's value, edits applied)."""
        with self._intercepting(edits):
            return self._module.apply({"params": self.params}, input_ids_BT, method="embed_tokens")

    def layer(self, x_BTD: jax.Array, layer_index: jax.Array, attention_mask_BT: jax.Array | None = None,
              positions_BT: jax.Array | None = None, *, edits: Sequence = ()) -> jax.Array:
        """Block `layer_index` (a traced int is fine: its weights are sliced dynamically)."""
        from ports.transformer import Block, attention_allowed, default_positions

        B, T = x_BTD.shape[:2]
        if positions_BT is None:
            positions_BT = default_positions(attention_mask_BT, B, T, self.config.position_ids)
        allowed = attention_allowed(attention_mask_BT, self.config.padding)
        index = jnp.asarray(layer_index, jnp.int32)
        weights = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, index, keepdims=False),
                               self.params["blocks"])
        block = Block(self.config, dtype=self.dtype, param_dtype=self.dtype)
        with self._intercepting(edits):
            out, _ = block.apply({"params": weights}, x_BTD, allowed, positions_BT, index)
        return out

    def head(self, x_BTD: jax.Array, *, edits: Sequence = ()) -> jax.Array:
        """Final norm and output head: float32 logits [B, T, V]."""
        with self._intercepting(edits):
            return self._module.apply({"params": self.params}, x_BTD, method="unembed")

    def logits(self, input_ids_BT, attention_mask_BT=None) -> jax.Array:
        """float32 logits [B, T, V], exactly as the original model returns them (unshifted)."""
        ids = jnp.asarray(input_ids_BT, jnp.int32)
        mask = None if attention_mask_BT is None else jnp.asarray(attention_mask_BT, jnp.int32)
        return _jitted_logits(self, ids, mask)

    def embedding_table(self) -> jax.Array:
        """The input embedding matrix [V, D]."""
        return self.params["embed"]["embedding"]

    def writer_weights(self, module: str) -> tuple[int, ...]:
        """Positions in `jax.tree.leaves(params)` of the weights that write `module`'s value
        ('attn': the output projection; 'mlp': the down projection(s)), each stacked [L, ...]."""
        writer = {"attn": ("attn", "o_proj"), "mlp": ("mlp", "down_proj")}.get(module)
        if writer is None:
            raise ConfigError(f"no weights write the {module!r} site; choose attn or mlp")
        found = []
        for i, (path, _) in enumerate(jax.tree_util.tree_leaves_with_path(self.params)):
            names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
            if names[:1] == ["blocks"] and all(n in names for n in writer):
                found.append(i)
        return tuple(found)

    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

    def fingerprint(self) -> str:
        """A short digest of config and weights (not edits): two backbones with the same
        fingerprint compute the same function (used to refuse edits built for another model)."""
        h = hashlib.sha256(json.dumps(dataclasses.asdict(self.config), sort_keys=True).encode())
        for path, leaf in jax.tree_util.tree_leaves_with_path(self.params):
            h.update(jax.tree_util.keystr(path).encode())
            arr = np.asarray(jax.device_get(leaf))
            h.update(str((arr.shape, arr.dtype)).encode())
            # a strided sample keeps this cheap for 8B models while catching any real difference
            flat = arr.reshape(-1)
            h.update(np.ascontiguousarray(flat[:: max(1, flat.size // 4096)]).tobytes())
        return h.hexdigest()[:16]


@jax.jit
def _jitted_logits(backbone: Backbone, ids, mask):
    return backbone.apply(ids, mask)


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A directory path, or the name of an embedded model (e.g. 'tofu-tiny')."""
    path = Path(model)
    if path.exists():
        return path
    embedded = EMBEDDED_DIR / str(model)
    if str(model) and "/" not in str(model) and embedded.is_dir():
        return embedded
    names = sorted(p.name for p in EMBEDDED_DIR.iterdir() if p.is_dir()) if EMBEDDED_DIR.is_dir() else []
    known = f" (embedded models: {', '.join(names)})" if names else ""
    raise CheckpointError(f"model {str(model)!r} is neither a directory nor an embedded model{known}")


def _tokenizer_mask_id(model_dir: Path) -> int | None:
    """The id of the tokenizer's mask token, read from tokenizer.json without loading a tokenizer."""
    tok_cfg = model_dir / "tokenizer_config.json"
    tok_json = model_dir / "tokenizer.json"
    try:
        mask_token = json.loads(tok_cfg.read_text()).get("mask_token") if tok_cfg.is_file() else None
        if isinstance(mask_token, dict):
            mask_token = mask_token.get("content")
        if mask_token and tok_json.is_file():
            for added in json.loads(tok_json.read_text()).get("added_tokens", []):
                if added.get("content") == mask_token:
                    return int(added["id"])
    except (OSError, ValueError, TypeError):
        return None
    return None


def load_pretrained(path: str | os.PathLike, dtype: Any = None,
                    mask_token_id: int | None = None, mesh: Any = None, rules: Any = None) -> Backbone:
    """Load a checkpoint directory (HF safetensors, or `timerome convert` output) or embedded name.

    Args:
      path: directory or embedded model name.
      dtype: parameter and compute dtype; None keeps the checkpoint's (bf16 stays bf16).
      mask_token_id: overrides the mask id from config.json / the tokenizer / the family default
        (`ports.families.default_mask_token_id`).
      mesh: a `jax.sharding.Mesh` (see `ports.sharding.make_mesh`); every parameter is then
        created directly on its devices, never whole on one device or on the host.
      rules: logical-axis rules for `mesh` (`ports.sharding.rules_for(profile)`); None replicates
        every parameter (pure data parallelism).

    Parameters are streamed onto their devices leaf by leaf in every case, so the host's peak
    memory stays near one copy of the parameters.
    """
    model_dir = checkpoint.check_model_dir(resolve_model_path(path))
    raw = checkpoint.read_config_json(model_dir)
    config = families.parse_config(raw)
    if mesh is not None:
        from ports import sharding

        shardings = sharding.param_shardings(config, mesh, rules)
    else:
        if rules is not None:
            raise ConfigError("sharding rules need a mesh (load_pretrained(..., mesh=...))")
        device = jax.config.jax_default_device or jax.local_devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device),
                                 checkpoint.abstract_params(config))
    if checkpoint.is_converted_dir(model_dir):
        params, meta = checkpoint.load_converted(model_dir, config, dtype,
                                                 shardings if mesh is not None else None)
        stored_mask = meta.get("mask_token_id")
    else:
        params = checkpoint.load_safetensors_params(model_dir, config, dtype, shardings)
        stored_mask = None
    resolved_mask = next((m for m in (mask_token_id, config.mask_token_id, stored_mask,
                                      _tokenizer_mask_id(model_dir),
                                      families.default_mask_token_id(config)) if m is not None), None)
    if resolved_mask is not None:
        if not 0 <= int(resolved_mask) < config.vocab_size:
            raise ConfigError(f"mask token id {resolved_mask} lies outside the vocabulary "
                              f"({config.vocab_size})")
        config = config.replace(mask_token_id=int(resolved_mask))
    float_leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    compute_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(float_leaves[0].dtype)
    params = jax.tree.map(jnp.asarray, params)
    return Backbone(config=config, params=params, mask_token_id=config.mask_token_id,
                    dtype=compute_dtype.type, source=str(model_dir.absolute()))


def convert(model: str | os.PathLike, out_dir: str | os.PathLike, dtype: Any = None,
            overwrite: bool = False) -> Path:
    """HF checkpoint -> orbax params directory (atomic). Returns the output path."""
    from ports.fileio import atomic_directory

    backbone = load_pretrained(model, dtype=dtype)
    model_dir = Path(backbone.source)
    raw = checkpoint.read_config_json(model_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        checkpoint.save_converted(
            tmp, backbone.params, raw,
            {"family": backbone.config.family, "mask_token_id": backbone.mask_token_id,
             "dtype": jnp.dtype(backbone.dtype).name, "source": str(model_dir)},
            tokenizer_source=model_dir)
    return Path(out_dir)
