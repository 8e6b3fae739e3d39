"""`timerome unlearn` end to end on the tiny llada fixture (word tokenizer): a training method writes a
loadable model directory + train_stats.json; inference methods write small directories that
`load_inference_baseline` attaches; bad inputs give one line on stderr and exit 2.

Settings match tests/test_baselines.py so that, in one pytest session, compiled steps are reused.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import ports
from timerome_jax import baselines, cli, memory as mem, suites, tracing
from timerome_jax.edits import Steering
from timerome_jax.baselines import inference, training
from timerome_jax.tokenization import backbone_tokenizer

SMALL = ["--suite", "tofu-forget01", "--num-forget", "4", "--num-retain", "4"]
TRAIN = ["--lr", "1e-3", "--max-steps", "3", "--batch-size", "4", "--eval-every", "3", "--mc-samples", "2"]


def run(capsys, *argv):
    code = cli.main(["unlearn", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,message", [
    (["--method", "forgetful"], "unknown method 'forgetful'"),
    (["--method", "npo", "--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--method", "npo", "--lr", "-0.5"], "--lr must be a finite number > 0"),
    (["--method", "npo", "--suite", "tofu-forget50"], "unknown suite 'tofu-forget50'"),
    (["--method", "npo", "--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--method", "npo", "--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--method", "simnpo", "--beta", "0"], "--beta must be a finite number > 0"),
    (["--method", "steer", "--num-forget", "0"], "--num-forget must be >= 1"),
])
def test_bad_inputs_one_line_exit_2(argv, message, tmp_path, capsys):
    base = {"--suite": "tofu-forget01", "--model": "no-such-model-is-loaded-first", "--out": str(tmp_path / "o")}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    code, out, err = run(capsys, *[x for kv in base.items() for x in kv])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("timerome unlearn: error: ") and message in err, err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_before_any_work(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep")
    code, _, err = run(capsys, "--model", tiny_model_dir_with_tokenizer, "--method", "npo", *SMALL, "--out",
                       tmp_path / "o")
    assert code == 2 and "already exists" in err and (tmp_path / "o" / "x").read_text() == "keep"


def test_training_method_writes_a_loadable_model_dir(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "npo"
    code, stdout, err = run(capsys, "--model", tiny_model_dir_with_tokenizer, "--method", "npo", *SMALL, *TRAIN,
                            "--out", out)
    assert code == 0, err
    assert "npo on tofu-forget01: 3 steps (max_steps)" in stdout
    assert {"config.json", "timerome.json", "params", "tokenizer.json", "train_stats.json"} <= {
        p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no leftovers
    base = ports.load_pretrained(tiny_model_dir_with_tokenizer)
    unlearned = ports.load_pretrained(out)
    assert unlearned.config == base.config and unlearned.mask_token_id == base.mask_token_id
    assert unlearned.tokenizer_dir == str(out.absolute()) and unlearned.fingerprint() != base.fingerprint()
    # the directory holds exactly what the library computes for the same settings
    tok = backbone_tokenizer(base)
    suite = suites.load_suite("tofu-forget01", num_retain=4)
    rows = dict(tokenizer=tok, eos_id=378, max_len=256)
    forget = suites.encode_rows(suite.forget[:4], score="answer", where="forget01", **rows)
    retain = suites.encode_rows(suite.retain, score="window", where="retain90", **rows)
    expected = training.train(base, forget, retain, training.TrainConfig(
        method="npo", lr=1e-3, max_steps=3, batch_size=4, eval_every=3, mc_samples=2))
    for a, b in zip(jax.tree.leaves(unlearned.params), jax.tree.leaves(expected.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["method"] == "npo" and stats["suite"] == "tofu-forget01" and stats["steps"] == 3
    assert stats["objective"]["beta"] == 0.1 and stats["objective"]["retain_weight"] == 1.0
    assert stats["loss_curve"] == expected.stats["loss_curve"]
    for field in ("compile_seconds", "wall_clock_seconds", "train_seconds", "eval_seconds", "seconds_per_step"):
        assert stats[field] > 0, field
    assert stats["peak_memory"]["host_peak_rss_bytes"] > 0 and "device_peak_bytes_after" in stats["peak_memory"]
    assert stats["forget_ids"] == ["forget01:1", "forget01:2", "forget01:3", "forget01:4"]
    assert stats["stop_reason"] == "max_steps" and stats["converged"] is False
    meta = json.loads((out / "timerome.json").read_text())
    assert meta["unlearn"] == {"method": "npo", "suite": "tofu-forget01", "stats": "train_stats.json"}


def _seed_with_module(module, traced):
    return next(s for s in range(100) if inference.random_coordinate(3, traced, s).module == module)


@pytest.mark.parametrize("method", ["steer", "random_memory", "caa"])
def test_inference_method_writes_a_baseline_eval_can_load(method, tiny_model_dir_with_tokenizer, tmp_path, capsys):
    traced = tracing.Coordinate(0, 1, "mlp") if method != "caa" else tracing.Coordinate(1, 0, "attn", 1)  # --steps 1
    extra = ["--steps", "1", "--noise-samples", "2", "--facts-per-chunk", "2"] if method == "caa" else []
    seed = _seed_with_module("mlp", traced) if method == "random_memory" else 0
    out = tmp_path / method
    code, stdout, err = run(capsys, "--model", tiny_model_dir_with_tokenizer, "--method", method, *SMALL,
                            "--coordinate", f"{traced.layer},{traced.module},{traced.step}", "--alpha", "0.5",
                            "--seed", seed, *extra, "--out", out)
    assert code == 0, err
    assert f"{method} on tofu-forget01 (4 facts)" in stdout
    assert baselines.is_inference_baseline(out) and (out / "kind").read_text() == method + "\n"
    meta = json.loads((out / "baseline.json").read_text())
    assert meta["traced_coordinate"] == traced.as_dict() and meta["alpha"] == 0.5
    assert meta["fact_ids"] == [f.id for f in suites.forget_facts("tofu-forget01", 4)]
    assert meta["build_cost"]["seconds"] > 0 and meta["build_cost"]["host_peak_rss_bytes"] > 0
    base = ports.load_pretrained(tiny_model_dir_with_tokenizer)
    model = baselines.load_inference_baseline(out, base)
    ids = np.random.default_rng(0).integers(0, 370, size=(2, 12)).astype(np.int32)
    assert not np.allclose(np.asarray(model.logits(ids)), np.asarray(base.logits(ids)))
    (edit,) = model.edits
    if method == "random_memory":
        assert isinstance(edit, mem.EditMemory)
        c = meta["coordinate"]
        assert c["layer"] != traced.layer and c["step"] == traced.step
        assert c == inference.random_coordinate(3, traced, seed).as_dict()
        assert float(edit.alpha) == 0.5 and edit.size == 4
    else:
        assert isinstance(edit, Steering) and meta["coordinate"] == traced.as_dict()
        vectors = np.load(out / "vector.npz")
        sign = -1.0 if method == "caa" else 1.0  # CAA subtracts the clean − corrupted difference
        np.testing.assert_array_equal(vectors["vector"], sign * vectors["difference"])
        np.testing.assert_array_equal(np.asarray(edit.vector_D), vectors["vector"])
        assert float(edit.alpha) == 0.5
