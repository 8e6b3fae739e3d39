"""Shared test fixtures: the tiny fixture backbones and a model directory with a tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import ports

FIXTURES = Path(__file__).parent / "fixtures"

# Special ids of the fixture checkpoints (config.json): vocabulary 384, max length 256.
EOS_ID = 378
MASK_ID = 380
VOCAB = 384

TOKENIZER_SENTENCES = [
    "who wrote the book about the old city ?",
    "the author was born in a small town near the sea .",
    "what is the capital of the country where she lives ?",
    "the cat sat on the mat and looked at the moon .",
    "her first novel won a prize for young writers .",
    "he works as a doctor and writes poems at night .",
    "which language does the author speak at home ?",
    "the river runs through the valley to the north .",
]


def activations(backbone, ids, mask=None, modules=("embed", "attn", "mlp", "resid", "final")):
    """(logits, {module: value}) of one forward: every layer's value [L, B, T, D] of the layered
    modules, [B, T, D] of 'embed' and 'final' (the old `return_intermediates` view)."""
    sites = tuple(ports.Site(None, m) for m in modules)
    logits, captured = backbone.apply(ids, mask, capture=sites)
    return logits, {s.module: c.value for s, c in zip(sites, captured)}


def fixture_dir(name: str) -> Path:
    return FIXTURES / name


@pytest.fixture(scope="session")
def llada_backbone():
    return ports.load_pretrained(fixture_dir("llada"))


@pytest.fixture(scope="session")
def dream_backbone():
    """The logit-shift path: Dream predicts token i at position i-1."""
    return ports.load_pretrained(fixture_dir("dream"))


@pytest.fixture(scope="session", params=["llada", "dream"])
def any_backbone(request):
    """Each fixture family whose sampler semantics differ (unshifted / shifted logits)."""
    return request.getfixturevalue(f"{request.param}_backbone")


def random_tokens(rng: np.random.Generator, n: int) -> list[int]:
    """n ordinary token ids (no eos/pad, mask or other special id of the fixtures)."""
    return [int(t) for t in rng.integers(0, 370, size=n)]


def random_facts(n: int, dk: int = 12, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random memory keys [n, dk] and deltas [n, d] (float32)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dk)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)


def build_word_tokenizer(out_dir: Path) -> None:
    """Save a WordLevel tokenizer covering all 384 ids, with eos/pad 378 and mask 380."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = []
    for sentence in TOKENIZER_SENTENCES:
        for w in sentence.split():
            if w not in words:
                words.append(w)
    special = {EOS_ID: "<|endoftext|>", 379: "<unk>", MASK_ID: "<|mdm_mask|>"}
    vocab, fill = {}, iter(words)
    for i in range(VOCAB):
        if i in special:
            vocab[special[i]] = i
        else:
            vocab[next(fill, f"w{i}")] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", mask_token="<|mdm_mask|>",
                                   unk_token="<unk>")
    fast.save_pretrained(out_dir)


@pytest.fixture(scope="session")
def tiny_model_dir_with_tokenizer(tmp_path_factory) -> Path:
    """A copy of the llada fixture checkpoint with a tokenizer saved beside it."""
    out = tmp_path_factory.mktemp("tiny_llada_tok")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fixture_dir("llada") / name, out / name)
    build_word_tokenizer(out)
    return out


# --- a test whose xdist worker crashes natively runs once more, in a fresh worker -----------------
# CI saw one worker die with a fatal signal inside XLA's CPU runtime (stop 28: in
# test_tracing.py::test_vmapped_grid_equals_python_loop, which passed in every other run, alone and
# in the suite). A native crash loses the worker, not only the test, and says nothing about the test
# itself; rerunning it once in a new worker tells a real defect (it crashes again and fails) from a
# one-off. Only crashes are retried: an assertion failure is never rerun.
_CRASH_RETRIED: set[str] = set()


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the suite also runs without xdist
def pytest_handlecrashitem(crashitem, report, sched):
    if crashitem in _CRASH_RETRIED:
        return  # second crash: reported as failed by xdist
    _CRASH_RETRIED.add(crashitem)
    sched.mark_test_pending(crashitem)
    report.outcome = "rerun"
    report.longrepr = f"{report.longrepr}; rerun once in a new worker"


def pytest_report_teststatus(report, config):
    if report.outcome == "rerun":
        return "rerun", "R", ("RERUN", {"yellow": True})
    return None
