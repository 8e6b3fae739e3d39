"""Tokenizers from a model directory (offline), and text <-> padded id batches.

The tokenizer is read from the checkpoint directory only: `HF_HUB_OFFLINE` is set and every load
passes `local_files_only=True`; no remote code is ever run. A directory with `tokenizer.json` is
loaded as a `PreTrainedTokenizerFast`; otherwise `AutoTokenizer` (trust_remote_code=False) is tried.

Batches: prompts are left-padded (`ids_BP`, `mask_BP` 1 on real tokens), answers right-padded, as
`timerome_jax.sampler` and `timerome_jax.likelihood` expect. Prompts are encoded with the
tokenizer's own special tokens (a BOS if it adds one), answers without; prompt and answer are
tokenized separately, so the answer's tokens do not depend on the prompt.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ports import Backbone
from timerome_jax.errors import InputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers' "PyTorch was not found" advice would otherwise break the one-line error contract
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer saved in `model_dir` (never downloaded, never remote code)."""
    import transformers

    path = Path(model_dir)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        if (path / "tokenizer.json").is_file():
            return transformers.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                          trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load a tokenizer from {path}: {first}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def backbone_tokenizer(backbone: Backbone):
    """The tokenizer stored with a loaded backbone's checkpoint."""
    if backbone.tokenizer_dir is None:
        raise InputError(f"no tokenizer files (tokenizer.json, tokenizer_config.json, ...) in "
                         f"{backbone.source}")
    return load_tokenizer(backbone.tokenizer_dir)


def pad_token_id(tokenizer, backbone: Backbone) -> int:
    """The id written on padding positions (never attended, so only its range matters)."""
    for candidate in (tokenizer.pad_token_id, backbone.config.pad_token_id,
                      tokenizer.eos_token_id, backbone.config.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def stop_token_ids(tokenizer, backbone: Backbone) -> frozenset[int]:
    """End-of-text and padding ids of the tokenizer and the model config: generation stops there."""
    ids = (tokenizer.eos_token_id, tokenizer.pad_token_id, backbone.config.eos_token_id,
           backbone.config.pad_token_id)
    return frozenset(int(i) for i in ids if i is not None)


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Left-pad to `length` (default: the longest): (ids [B, L] int32, mask [B, L] int32)."""
    length = max(map(len, sequences)) if length is None else length
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, length - len(seq):] = seq
            mask[row, length - len(seq):] = 1
    return ids, mask


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Right-pad to `length` (default: the longest): (ids [B, L] int32, mask [B, L] int32)."""
    length = max(map(len, sequences)) if length is None else length
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    return ids, mask


def encode_texts(tokenizer, texts: Sequence[str], *, add_special_tokens: bool,
                 what: str = "prompt") -> list[list[int]]:
    """Token ids per text; an empty text or one that encodes to no token is an InputError."""
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"] if text else []
        if not ids:
            raise InputError(f"{what} {i} is empty" + (f" after tokenization: {text!r}" if text else ""))
        out.append([int(t) for t in ids])
    return out


def truncate_at_stop(token_ids: Sequence[int], stop_ids: frozenset[int]) -> list[int]:
    """The tokens before the first end-of-text/pad token."""
    kept = []
    for t in token_ids:
        if int(t) in stop_ids:
            break
        kept.append(int(t))
    return kept


__all__ = [
    "backbone_tokenizer", "encode_texts",
    "load_tokenizer", "pad_left", "pad_right", "pad_token_id", "stop_token_ids", "truncate_at_stop",
]
