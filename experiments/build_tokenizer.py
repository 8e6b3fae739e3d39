"""Train the byte-level BPE tokenizer of the embedded TOFU models (tofu-tiny, tofu-tiny-retain).

    .venv/bin/python experiments/build_tokenizer.py --out runs/tofu-tokenizer

Trained with `tokenizers` on the prompt and answer texts (`facts.Fact.texts`: TOFU questions in
`timerome_jax.data.format_prompt`, CounterFact prompts raw) of the data selection the models are
trained on (default: see `DEFAULT_SELECTION`), in file order, so the result is deterministic. Saved with `PreTrainedTokenizerFast.save_pretrained`, so
`transformers.AutoTokenizer.from_pretrained(dir)` loads it offline.

Special tokens (ids fixed by their order):
  0  <|endoftext|>  end of text; also the pad token (as in LLaDA, eos = pad). Answers are followed
                    by it during training, so fixed-length generation ends in a run of it.
  1  <|mdm_mask|>   the diffusion mask token (LLaDA's name for it).
There is no BOS and no separator token: the prompt format ends in "Answer:".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mdm_mask|>"
SPECIAL_TOKENS = (EOS_TOKEN, MASK_TOKEN)
# the union of what the retain twin and tofu-tiny (v4) are trained on: forget01 and the first 160
# QA of retain90 (8 whole authors), the even rows of both also paraphrased, real_authors[:50],
# world_facts[:59], and CounterFact cases 0-399 (prompt, locality prompt, even rephrase prompts)
DEFAULT_SELECTION = ("forget01,forget01_paraphrased[::2],retain90[:160],retain_paraphrased[:160:2],"
                     "real_authors[:50],world_facts[:59],counterfact_prompt,counterfact_locality,"
                     "counterfact_rephrase[::2]")
DEFAULT_VOCAB = 2048
MODEL_MAX_LENGTH = 512


def corpus(selection: str) -> list[str]:
    """Texts the BPE is trained on: each record's prompt and answer text as the model sees them
    (`Fact.texts`), in selection order."""
    from timerome_jax.data import load_selection
    from timerome_jax.facts import parse_fact

    texts = []
    for split, index, record in load_selection(selection):
        prompt, answer = parse_fact(record, f"{split}:{index + 1}").texts()
        texts += [prompt, answer.strip()]
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = DEFAULT_VOCAB):
    """A `PreTrainedTokenizerFast` trained on `texts` (byte-level BPE, prefix space added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, (token, tokenizer.token_to_id(token))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, mask_token=MASK_TOKEN,
        model_max_length=MODEL_MAX_LENGTH, padding_side="right", clean_up_tokenization_spaces=False)


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """`save_pretrained`, then name the class `PreTrainedTokenizerFast` in tokenizer_config.json:
    transformers 5 writes its new `TokenizersBackend`, which transformers 4.x cannot resolve, while
    both load `PreTrainedTokenizerFast` from tokenizer.json."""
    tokenizer.save_pretrained(str(out_dir))
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_SELECTION,
                        help=f"data selection to train on (default {DEFAULT_SELECTION!r})")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from ports.fileio import atomic_directory

    texts = corpus(args.data)
    tokenizer = build_tokenizer(texts, args.vocab_size)
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        save_tokenizer(tokenizer, tmp)
    n_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    print(f"wrote {args.out}: vocab {len(tokenizer)}, eos=pad {tokenizer.eos_token_id}, "
          f"mask {tokenizer.mask_token_id}; corpus {len(texts)} texts, {n_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
