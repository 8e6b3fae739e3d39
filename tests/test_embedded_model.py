"""The shipped embedded models load by name, are ordinary LLaDA checkpoints, and know their facts.

A fast check on a few QA pairs (greedy decoding, the final-eval schedule of train_tiny.py); the
full acceptance numbers (all 40 forget01 pairs, retain90[:40]) are measured by the training run
(`training.json` -> `final_eval`) and reported in docs/embedded_model.md.
"""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

import ports
from ports.backbone import EMBEDDED_DIR
from timerome_jax import data, evaluate, metrics
from timerome_jax.tokenization import backbone_tokenizer, pad_token_id

GEN = dict(gen_length=96, steps=48, block_length=32, batch_size=8)
N = 4  # QA pairs per set


@pytest.fixture(scope="module")
def tiny():
    return ports.load_pretrained("tofu-tiny")


def greedy_recall(backbone, split: str) -> tuple[float, list[str]]:
    tokenizer = backbone_tokenizer(backbone)
    records = [r for _, _, r in data.load_selection(f"{split}[:{N}]")]
    prompts = [data.encode_prompt(tokenizer, r["question"]) for r in records]
    answers = evaluate.generate_answers(backbone, tokenizer, prompts, pad_id=pad_token_id(tokenizer, backbone), **GEN)
    return float(np.mean([metrics.rouge_l_recall(a, r["answer"]) for a, r in zip(answers, records)])), answers


@pytest.mark.parametrize("name", ["tofu-tiny", "tofu-tiny-retain"])
def test_embedded_models_are_llada_checkpoints_that_load_by_name(name):
    path = ports.resolve_model_path(name)
    assert path == EMBEDDED_DIR / name
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
    assert (path / "model.safetensors").stat().st_size <= 25 * 2 ** 20
    backbone = ports.load_pretrained(name)
    assert backbone.config.family == "llada" and backbone.num_params() == 4_984_064
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tok.eos_token_id == tok.pad_token_id == 0 and tok.convert_tokens_to_ids("<|mdm_mask|>") == 1
    assert backbone.mask_token_id == 1


def test_the_twin_is_another_model():
    assert ports.load_pretrained("tofu-tiny").fingerprint() != ports.load_pretrained("tofu-tiny-retain").fingerprint()


# Bounds: the acceptance targets on these four pairs (forget01 >= 0.9: 1.0 measured; twin < 0.6),
# and for retain90 a guard just below the level measured on these four (0.79; 0.843 on all 40
# pairs, target 0.8 -- docs/embedded_model.md).
@pytest.mark.parametrize("name, split, low, high", [
    ("tofu-tiny", "forget01", 0.9, 1.0),
    ("tofu-tiny", "retain90", 0.7, 1.0),
    ("tofu-tiny-retain", "forget01", 0.0, 0.6),
])
def test_greedy_answers(tiny, name, split, low, high):
    backbone = tiny if name == "tofu-tiny" else ports.load_pretrained(name)
    recall, answers = greedy_recall(backbone, split)
    assert low <= recall <= high, (recall, answers)
