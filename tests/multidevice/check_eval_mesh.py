"""Data-parallel evaluation on 8 CPU devices: `likelihood.score_pairs(mesh=)` and `timerome eval
--mesh` (with a reference model, with an edit memory) equal the single-device evaluation; bad
--mesh specs fail as they do for `timerome trace`.

Run, like check_multidevice.py, by `tests/test_sharding.py` in a fresh 8-device process:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m pytest tests/multidevice -o python_files='check_*.py' -q
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import ports
from ports import sharding
from timerome_jax import cli, data, distributed, evaluate, likelihood, metrics, suites
from timerome_jax import memory as mem
from timerome_jax.tokenization import backbone_tokenizer, pad_token_id

if jax.device_count() != 8:  # fail loudly: these checks mean nothing on one device
    raise RuntimeError(f"tests/multidevice needs 8 devices, found {jax.device_count()}: run it with "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_sharding.py does)")

PROFILE = "dp8"  # QA rows over 8 data shards, parameters replicated
TOL = dict(rtol=1e-5, atol=1e-5)


# tests/test_eval_cli.py's suite: 2 forget, 1 retain, 1 real-author, 2 world-fact records
SUITE = json.loads((Path(__file__).parent.parent / "fixtures" / "tiny_suite.json").read_text())
FACTS = [{"question": "who wrote the book about the old city ?", "answer": "the author was born",
          "subject": "the old city"},
         {"prompt": "the cat sat on the", "subject": "the cat", "target": "mat"}]
SEEDS = (0, 1)
GEN = evaluate.GenerationConfig(gen_length=8, steps=4, block_length=8, batch_size=16)
# 1 pair per data shard: 8 rows per call, so the suite's rows take several calls and the last call
# of a length bucket is padded
PAIRS_PER_SHARD = 1
KW = dict(mc_samples=4, generation=GEN, batch_size=16)
CLI = ["--quick", "--seeds", str(len(SEEDS)), "--gen-length", "8", "--steps", "4", "--block-length", "8",
       "--batch-size", "16"]


@pytest.fixture(scope="module")
def models(tiny_model_dir_with_tokenizer):
    """(model dir, unsharded backbone, the same model on the dp8 mesh, mesh, tokenizer)."""
    model = tiny_model_dir_with_tokenizer
    mesh = sharding.make_mesh(PROFILE)
    single = ports.load_pretrained(model)
    sharded = ports.load_pretrained(model, mesh=mesh, rules=sharding.rules_for(PROFILE))
    return model, single, sharded, mesh, backbone_tokenizer(single)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_mesh")
    (root / "suite.json").write_text(json.dumps(SUITE))
    (root / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return root


def test_score_pairs_on_a_data_parallel_mesh_equals_single_device(models, monkeypatch):
    _, single, sharded, mesh, tok = models
    sharded_calls = []
    scorer = distributed.map_chunks
    monkeypatch.setattr(distributed, "map_chunks",
                        lambda *a, **k: (k.get("mesh") is not None and sharded_calls.append(k["mesh"])) or scorer(*a, **k))
    questions = [r["question"] for s in ("forget", "retain", "world_facts") for r in SUITE[s]]
    answers = [r["answer"] for s in ("forget", "retain", "world_facts") for r in SUITE[s]]
    pairs = [likelihood.Pair(f"p/{i}/answer", data.encode_prompt(tok, q), data.encode_answer(tok, a))
             for i, (q, a) in enumerate(zip(questions, answers))]
    pad = pad_token_id(tok, single)
    one = likelihood.score_pairs(single, pairs, SEEDS, pad_id=pad, mc_samples=4, pairs_per_call=4, batch_size=16)
    calls = []
    eight = likelihood.score_pairs(sharded, pairs, SEEDS, pad_id=pad, mc_samples=4, pairs_per_call=1,
                                batch_size=16, mesh=mesh, progress=lambda c: calls.append(len(c)) or c)
    assert eight.shape == one.shape == (len(SEEDS), len(pairs))
    np.testing.assert_allclose(eight, one, **TOL)
    assert calls[0] >= 2  # 10 rows in calls of 8 rows (1 per shard): padding was exercised
    assert len(sharded_calls) == calls[0] and all(m is mesh for m in sharded_calls)
    assert np.abs(one[0] - one[1]).max() > 1e-3  # seeds draw different masks: the keys matter


def _single_device_eval(backbone, tok, reference=None):
    return evaluate.evaluate_suite(backbone, tok, suites.suite_from_records(SUITE, name="suite.json"),
                                  seeds=SEEDS, reference=reference, reference_name="itself",
                                  limit=4, pairs_per_call=4, **KW)


def _assert_same_evaluation(out_dir, expected):
    doc = json.loads((out_dir / "metrics.json").read_text())
    items = [json.loads(line) for line in (out_dir / "items.jsonl").read_text().splitlines()]
    assert doc["config"]["mesh"] == PROFILE and doc["config"]["seeds"] == list(SEEDS)
    assert len(items) == len(expected["items"])
    for got, want in zip(items, expected["items"]):
        assert got["split"] == want["split"] and got.get("generation") == want.get("generation")  # replicated
        for attack, score in want.get("mia_scores", {}).items():     # forget and holdout: the privacy stage
            np.testing.assert_allclose(got["mia_scores"][attack], score, **TOL, err_msg=attack)
        for key in ("lp_per_seed", "truth_ratio_per_seed", "paraphrase_lp_per_seed", "relearn_lp_per_seed",
                    "reference_truth_ratio_per_seed"):
            if key in want:
                np.testing.assert_allclose(got[key], want[key], **TOL, err_msg=key)
    for name in metrics.METRICS:
        if expected[name]["mean"] is None:
            assert doc[name]["mean"] is None, name
        else:
            np.testing.assert_allclose(doc[name]["per_seed"], expected[name]["per_seed"], rtol=1e-4,
                                       atol=1e-6, err_msg=name)
    return doc


def test_cli_eval_with_mesh_equals_single_device(models, files):
    """Model and reference (here the model itself) both on the mesh, --quick limits."""
    model, single, _, _, tok = models
    out = files / "eval"
    assert cli.main(["eval", "--model", str(model), "--suite", str(files / "suite.json"), "--reference",
                     str(model), *CLI, "--pairs-per-call", str(PAIRS_PER_SHARD), "--mesh", PROFILE,
                     "--out", str(out)]) == 0
    doc = _assert_same_evaluation(out, _single_device_eval(single, tok, reference=single))
    assert doc["forget_quality"]["mean"] is not None


def test_cli_eval_with_memory_on_mesh_equals_single_device(models, files):
    """An EditedBackbone (--memory, built on one device) evaluated on the mesh."""
    model, single, _, _, tok = models
    memdir = files / "memory"
    assert cli.main(["edit", "--model", str(model), "--facts", str(files / "facts.jsonl"), "--coordinate",
                     "1,mlp,1", "--steps", "2", "--noise-samples", "2", "--out", str(memdir)]) == 0
    edited = single.with_edits(mem.load(memdir, single).memory)
    out = files / "eval_memory"
    assert cli.main(["eval", "--model", str(model), "--memory", str(memdir), "--suite",
                     str(files / "suite.json"), "--reference", "none", *CLI, "--pairs-per-call",
                     str(PAIRS_PER_SHARD), "--mesh", PROFILE, "--out", str(out)]) == 0
    expected = _single_device_eval(edited, tok)
    _assert_same_evaluation(out, expected)
    base = _single_device_eval(single, tok)
    assert np.abs(np.subtract(expected["forget_lp"]["per_seed"], base["forget_lp"]["per_seed"])).max() > 1e-4


@pytest.mark.parametrize("spec", ["dp3", "pp8", "dptp"])  # does not fit; unknown; no count
def test_eval_refuses_bad_mesh_specs_like_trace(models, files, spec, capsys):
    model = str(models[0])
    code = cli.main(["eval", "--model", model, "--suite", str(files / "suite.json"), "--mesh", spec,
                     "--out", str(files / f"bad_{spec}")])
    eval_err = capsys.readouterr().err
    assert cli.main(["trace", "--model", model, "--facts", str(files / "facts.jsonl"), "--mesh", spec,
                     "--out", str(files / f"bad_trace_{spec}")]) == code == 2
    trace_err = capsys.readouterr().err
    assert eval_err.count("\n") == 1 and eval_err.startswith("timerome eval: error: ")
    assert "mesh profile" in eval_err
    assert eval_err.removeprefix("timerome eval") == trace_err.removeprefix("timerome trace")
    assert not (files / f"bad_{spec}").exists()
