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
    """A supported backbone family.

    `default_mask_token_id` is the [MASK] id the released checkpoints were trained with, used by
    `ports.load_pretrained` only when neither the caller, config.json, a converted checkpoint nor
    the tokenizer files name one (see `default_mask_token_id()` below and docs/backbones.md).
    """

    name: str
    description: str
    parse: Callable[[Mapping[str, Any]], TransformerConfig]
    key_table: Callable[[TransformerConfig], list[KeyRule]]
    default_mask_token_id: int | None = None


FAMILIES: dict[str, Family] = {
    f.name: f for f in (
        # 126336: LLaDA's generate.py (mask_id=126336) and the released config.json
        Family("llada", "LLaDA-8B-Base / -Instruct (LLaDAModelLM)", llada.parse_llada, llada.key_table,
               default_mask_token_id=126336),
        # 126336: MMaDA keeps LLaDA's text mask (config.json; MMadaModelLM.t2i_generate default)
        Family("mmada", "MMaDA-8B text path (MMadaModelLM)", llada.parse_mmada, llada.key_table,
               default_mask_token_id=126336),
        # 151666 ('<|mask|>'): the DreamConfig default, so a config.json without the field still
        # gets it in the reference code too
        Family("dream", "Dream-v0-7B (DreamModel)", llama_like.parse_dream, llama_like.key_table,
               default_mask_token_id=151666),
        # 811: DiffuLLaMA's mask is the ordinary LLaMA-2 vocabulary piece 'ти' (special_tokens_map.json
        # of diffusionfamily/diffullama); its LLaMA-Factory loader and training script hard-code 811.
        # config.json has no mask field and the token is not an added token, so the tokenizer look-up
        # in load_pretrained cannot find it.
        Family("diffullama", "DiffuLLaMA-7B (LlamaForCausalLM, bidirectional)",
               llama_like.parse_diffullama, llama_like.key_table, default_mask_token_id=811),
        # 156895: inclusionAI's dInfer decodes LLaDA-MoE with mask_id=156895 (eos 156892)
        Family("llada_moe", "LLaDA-MoE-7B-A1B (LLaDAMoEModelLM)", llama_like.parse_llada_moe,
               llama_like.key_table, default_mask_token_id=156895),
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


def default_mask_token_id(config: TransformerConfig) -> int | None:
    """The family's released mask id, if it lies inside this checkpoint's vocabulary.

    A vocabulary too small to hold it (a tiny test model, a re-tokenised fine-tune) is not the
    released tokenizer, so no id is guessed for it.
    """
    default = FAMILIES[config.family].default_mask_token_id
    if default is None or not 0 <= default < config.vocab_size:
        return None
    return default


def key_table(config: TransformerConfig) -> list[KeyRule]:
    return FAMILIES[config.family].key_table(config)
