"""The shipped embedded models load by name, are ordinary LLaDA checkpoints, and know their facts.

A fast check on a few rows of every v4 set (greedy decoding with the training run's final-eval
schedule, `train_tiny.evaluate`: questions gen length 96 / block 32 / 48 steps scored by ROUGE-L
recall, CounterFact-style prompts gen length = block = steps = 12 scored by first-words match). The
full acceptance numbers (every row of every set) are measured by `experiments/embedded_lp.py` and
the training runs (`training.json` -> `final_eval`) and reported in docs/embedded_model.md.
"""

import importlib
import json
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import ports
from ports.backbone import EMBEDDED_DIR
from timerome_jax import data
from timerome_jax.tokenization import backbone_tokenizer

GEN = dict(gen_length=96, steps=48, block_length=32)
PROMPT_GEN = dict(gen_length=12, steps=12, block_length=12)

# Rows checked and the bounds on their mean score, (tofu-tiny, tofu-tiny-retain). Targets where the
# acceptance criteria set one for these rows; for retain90 / retain_paraphrased a guard below the
# level measured on these rows (docs/embedded_model.md gives the full-set numbers).
SETS = {
    "forget01[:4]": ((0.9, 1.0), (0.0, 0.6)),
    "forget01_paraphrased[:8:2]": ((0.8, 1.0), (0.0, 0.6)),
    "retain90[:4]": ((0.7, 1.0), (0.7, 1.0)),
    "retain_paraphrased[:8:2]": ((0.6, 1.0), (0.6, 1.0)),
    "real_authors[:4]": ((0.7, 1.0), (0.7, 1.0)),   # row 0 is missed by the twin (0.0): 0.75 measured
    "world_facts[:4]": ((0.8, 1.0), (0.8, 1.0)),
    "counterfact_prompt[:8]": ((0.875, 1.0), (0.875, 1.0)),
    "counterfact_locality[:8]": ((0.875, 1.0), (0.875, 1.0)),
    "counterfact_rephrase[:16:2]": ((0.875, 1.0), (0.875, 1.0)),
}
MODELS = ("tofu-tiny", "tofu-tiny-retain")


def _train_tiny():
    sys.path.insert(0, str(Path(__file__).parent.parent / "experiments"))
    try:
        return importlib.import_module("train_tiny")
    finally:
        sys.path.pop(0)


@pytest.fixture(scope="module", params=MODELS)
def scores(request):
    """{selection: mean score} of one model, every set decoded in one evaluate call per set."""
    backbone = ports.load_pretrained(request.param)
    tokenizer = backbone_tokenizer(backbone)
    evaluate = _train_tiny().evaluate
    out = {}
    for spec in SETS:
        result = evaluate(backbone, tokenizer, data.load_selection(spec), GEN, PROMPT_GEN)
        metric = "rougeL_recall" if "rougeL_recall" in result else "first_words_match"
        (out[spec],) = result[metric].values()
        out[spec + " samples"] = [s["generated"] for s in result["samples"]]
    return request.param, out


@pytest.mark.parametrize("name", MODELS)
def test_embedded_models_are_llada_checkpoints_that_load_by_name(name):
    path = ports.resolve_model_path(name)
    assert path == EMBEDDED_DIR / name
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
    assert config["n_layers"] == 8
    assert (path / "model.safetensors").stat().st_size <= 25 * 2 ** 20
    backbone = ports.load_pretrained(name)
    assert backbone.config.family == "llada" and backbone.num_params() == 6_099_200
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tok.eos_token_id == tok.pad_token_id == 0 and tok.convert_tokens_to_ids("<|mdm_mask|>") == 1
    assert backbone.mask_token_id == 1


def test_the_twin_is_another_model():
    assert ports.load_pretrained("tofu-tiny").fingerprint() != ports.load_pretrained("tofu-tiny-retain").fingerprint()


@pytest.mark.parametrize("spec", list(SETS))
def test_greedy_answers(scores, spec):
    name, got = scores
    low, high = SETS[spec][MODELS.index(name)]
    assert low <= got[spec] <= high, (name, spec, got[spec], got[spec + " samples"])
