"""Writing a `Backbone` back to a Hugging Face checkpoint: original key names, original layouts.

The family's key table (`ports.families.key_table`) maps every Flax leaf to a checkpoint key
through a transform; exporting applies the *inverse* transforms and writes one
`model.safetensors` (metadata `{"format": "pt"}`, as `save_pretrained` writes it) plus
`config.json`, atomically. The result loads with `ports.load_pretrained` and, for LLaDA, with the
original PyTorch `LLaDAModelLM` (its key names and `[out, in]` linear layouts).

Every exported tensor is checked: the forward transform of the inverse must give back the Flax
leaf bit for bit, so a wrong inverse can never write a silently scrambled checkpoint.

One file, all tensors in host memory at once: meant for small models (the embedded ones), not 8B.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from ports import checkpoint, families
from ports.backbone import Backbone
from ports.config import TransformerConfig
from ports.errors import ConfigError
from ports.families import base
from ports.families.base import KeyRule

Inverse = Callable[[np.ndarray, TransformerConfig], np.ndarray]


def _join_heads_in(n_heads_field: str) -> Inverse:
    """kernel [D, heads, H] -> torch weight [heads*H, D] (inverse of `split_heads_in`)."""
    def fn(kernel: np.ndarray, c: TransformerConfig) -> np.ndarray:
        n = getattr(c, n_heads_field)
        return kernel.transpose(1, 2, 0).reshape(n * c.head_dim, kernel.shape[0])
    return fn


def _join_heads_bias(n_heads_field: str) -> Inverse:
    """bias [heads, H] -> [heads*H] (inverse of `split_heads_bias`)."""
    def fn(bias: np.ndarray, c: TransformerConfig) -> np.ndarray:
        return bias.reshape(getattr(c, n_heads_field) * c.head_dim)
    return fn


def _join_heads_out(kernel: np.ndarray, c: TransformerConfig) -> np.ndarray:
    """kernel [N, H, D] -> torch weight [D, N*H] (inverse of `split_heads_out`)."""
    return kernel.transpose(2, 0, 1).reshape(kernel.shape[2], c.n_heads * c.head_dim)


# `split_heads_in(field)` / `split_heads_bias(field)` return closures; all closures of one factory
# share its code object, which identifies them, and the closure cell holds `field`.
_FACTORY_INVERSES: dict[Any, Callable[[str], Inverse]] = {
    base.split_heads_in("n_heads").__code__: _join_heads_in,
    base.split_heads_bias("n_heads").__code__: _join_heads_bias,
}
_PLAIN_INVERSES: dict[Any, Inverse] = {
    base.identity: lambda w, c: w,
    base.transpose: lambda w, c: w.T,
    base.split_heads_out: _join_heads_out,
}


def inverse_transform(rule: KeyRule) -> Inverse:
    """The inverse of `rule.transform` (Flax layout -> checkpoint layout).

    Raises `ConfigError` for a transform that has no inverse here.
    """
    t = rule.transform
    if t in _PLAIN_INVERSES:
        return _PLAIN_INVERSES[t]
    code = getattr(t, "__code__", None)
    if code in _FACTORY_INVERSES:
        cells = dict(zip(code.co_freevars, (cell.cell_contents for cell in t.__closure__ or ())))
        return _FACTORY_INVERSES[code](cells["n_heads_field"])
    name = getattr(t, "__qualname__", repr(t))
    raise ConfigError(f"cannot export {rule.source}: its key-table transform {name} has no inverse "
                      "in ports.export (add one to _PLAIN_INVERSES or _FACTORY_INVERSES)")


def _leaf(tree: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def checkpoint_tensors(backbone: Backbone) -> Iterator[tuple[str, np.ndarray]]:
    """(checkpoint key, tensor in the checkpoint's layout) for every key the family's table
    lists, in table order (layer by layer for stacked leaves)."""
    config = backbone.config
    params = jax.device_get(backbone.params)
    ranges = {"layer": range(config.n_layers), "expert": range(max(config.num_experts, 1))}
    for rule in families.key_table(config):
        inverse = inverse_transform(rule)
        leaf = np.asarray(_leaf(params, rule.target))
        slots: list[tuple[int, ...]] = [()]
        for axis in rule.stacked_axes:
            slots = [s + (i,) for s in slots for i in ranges[axis]]
        for slot in slots:
            value = leaf[slot] if slot else leaf
            tensor = np.ascontiguousarray(inverse(value, config))
            back = rule.transform(tensor, config)
            if back.shape != value.shape or not np.array_equal(back, value):
                raise ConfigError(f"inverse transform for {rule.source} does not round-trip "
                                  f"({'/'.join(rule.target)}): refusing to write a scrambled tensor")
            yield rule.source.format(**dict(zip(rule.stacked_axes, slot))), tensor


def _config_mismatch(raw_config: Mapping[str, Any], config: TransformerConfig) -> list[str]:
    parsed = families.parse_config(raw_config)
    if parsed.mask_token_id is None:
        parsed = parsed.replace(mask_token_id=config.mask_token_id)
    a, b = dataclasses.asdict(parsed), dataclasses.asdict(config)
    return [f"{k}: config.json gives {a[k]!r}, the backbone has {b[k]!r}" for k in a if a[k] != b[k]]


def save_safetensors(backbone: Backbone, out_dir: str | os.PathLike, raw_config: Mapping[str, Any],
                     *, tokenizer_source: str | os.PathLike | None = None,
                     extra_files: Mapping[str, str | bytes] | None = None,
                     overwrite: bool = False) -> Path:
    """Write `config.json` + `model.safetensors` (original key names) into `out_dir`, atomically.

    Args:
      backbone: the model; its parameters are written in their own dtype.
      out_dir: the checkpoint directory (must be absent or empty unless `overwrite`).
      raw_config: the `config.json` contents. It must describe `backbone.config` exactly (it is
        parsed back and compared field by field; a config without `mask_token_id` inherits the
        backbone's), so the written checkpoint always reloads as the same model.
      tokenizer_source: a directory whose tokenizer files (`ports.checkpoint.TOKENIZER_FILES`) are
        copied alongside.
      extra_files: more files to write, name -> text or bytes (a README, a provenance note).
      overwrite: replace an existing non-empty `out_dir`.

    Returns the output path.
    """
    from safetensors.numpy import save_file

    from ports.fileio import atomic_directory

    mismatch = _config_mismatch(raw_config, backbone.config)
    if mismatch:
        raise ConfigError("config.json does not describe this backbone: " + "; ".join(mismatch))
    tensors = dict(checkpoint_tensors(backbone))
    reserved = {"config.json", "model.safetensors", checkpoint.TIMEROME_META}
    for name in extra_files or {}:
        if name in reserved or "/" in name or name.startswith("."):
            raise ConfigError(f"extra file name {name!r} is reserved or not a plain file name")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(dict(raw_config), indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_source is not None:
            source = Path(tokenizer_source)
            for name in checkpoint.TOKENIZER_FILES:
                if (source / name).is_file():
                    (tmp / name).write_bytes((source / name).read_bytes())
        for name, content in (extra_files or {}).items():
            data = content.encode() if isinstance(content, str) else bytes(content)
            (tmp / name).write_bytes(data)
    return Path(out_dir)


# The complete field set of a LLaDA `config.json` (LLaDA-8B-Base's, as the original
# `LLaDAConfig.save_pretrained` writes it; see tests/fixtures/llada/config.json) except `auto_map`.
# Values here are the ones every LLaDA shares; `llada_config` fills in the architecture.
# `auto_map` names Python files (configuration_llada.py, modeling_llada.py) that a checkpoint of
# ours does not ship; with it, transformers 5 asks interactively whether to run that "custom code"
# even when only `AutoTokenizer.from_pretrained(dir)` is called. Pass `auto_map=LLADA_AUTO_MAP`
# to `llada_config` for a directory that does ship those files.
LLADA_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModel": "modeling_llada.LLaDAModelLM",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
}
_LLADA_CONSTANT_FIELDS: dict[str, Any] = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "bos_token_id": None,
    "embedding_dropout": 0.0,
    "flash_attention": False,
    "include_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "precision": "fp32",
    "residual_dropout": 0.0,
    "rope": True,
    "rope_full_precision": True,
    "torch_dtype": "float32",
    "transformers_version": "4.46.2",
    "use_cache": False,
}


def llada_config(config: TransformerConfig, **overrides: Any) -> dict[str, Any]:
    """A complete LLaDA `config.json` dict for `config` (family 'llada'); `overrides` win."""
    if config.family != "llada":
        raise ConfigError(f"llada_config needs a 'llada' config, got family {config.family!r}")
    if config.head_dim * config.n_heads != config.d_model:
        raise ConfigError(f"LLaDA needs head_dim * n_heads == d_model ({config.head_dim} * "
                          f"{config.n_heads} != {config.d_model})")
    raw = dict(_LLADA_CONSTANT_FIELDS)
    raw.update({
        "d_model": config.d_model,
        "embedding_size": config.vocab_size,
        "vocab_size": config.vocab_size,
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "mlp_hidden_size": config.mlp_hidden,
        "max_sequence_length": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.norm_eps,
        "include_qkv_bias": config.qkv_bias,
        "weight_tying": config.tie_embeddings,
        "scale_logits": config.scale_logits,
        "mask_token_id": config.mask_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    })
    raw.update(overrides)
    return raw


__all__ = ["LLADA_AUTO_MAP", "checkpoint_tensors", "inverse_transform", "llada_config", "save_safetensors"]
