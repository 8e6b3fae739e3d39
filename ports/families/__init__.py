"""Registry of supported families: which one a `config.json` belongs to, how to parse and map it."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from ports.config import TransformerConfig
from ports.errors import ConfigError
from ports.families import llada, llama_like
from ports.families.base import KeyRule


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    description: str
    parse: Callable[[Mapping[str, Any]], TransformerConfig]
    key_table: Callable[[TransformerConfig], list[KeyRule]]


FAMILIES: dict[str, Family] = {
    f.name: f for f in (
        Family("llada", "LLaDA-8B-Base / -Instruct (LLaDAModelLM)", llada.parse_llada, llada.key_table),
        Family("mmada", "MMaDA-8B text path (MMadaModelLM)", llada.parse_mmada, llada.key_table),
        Family("dream", "Dream-v0-7B (DreamModel)", llama_like.parse_dream, llama_like.key_table),
        Family("diffullama", "DiffuLLaMA-7B (LlamaForCausalLM, bidirectional)",
               llama_like.parse_diffullama, llama_like.key_table),
        Family("llada_moe", "LLaDA-MoE-7B-A1B (LLaDAMoEModelLM)", llama_like.parse_llada_moe,
               llama_like.key_table),
    )
}


def detect_family(raw: Mapping[str, Any]) -> Family:
    """Pick the family from `model_type` and `architectures` (LLaDA-MoE's hub config says 'llada')."""
    model_type = str(raw.get("model_type", "")).lower()
    architectures = raw.get("architectures") or []
    if model_type == "lladamoe" or (model_type == "llada" and "LLaDAMoEModelLM" in architectures):
        return FAMILIES["llada_moe"]
    by_type = {"llada": "llada", "mmada": "mmada", "dream": "dream", "llama": "diffullama"}
    if model_type in by_type:
        return FAMILIES[by_type[model_type]]
    shown = model_type or "(none)"
    raise ConfigError(f"unknown model_type {shown!r} (architectures {architectures}); supported: "
                      "llada, mmada, Dream, llama (DiffuLLaMA), llada/lladamoe (LLaDA-MoE)")


def parse_config(raw: Mapping[str, Any]) -> TransformerConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError("config.json must hold a JSON object")
    return detect_family(raw).parse(raw)


def key_table(config: TransformerConfig) -> list[KeyRule]:
    return FAMILIES[config.family].key_table(config)
