"""The memory experiments (sequential insertion, scaling, cost) run end to end with --quick on the
tiny fixture model, write what they claim, and their helpers compute what they say."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timerome_jax import memory as mem
from timerome_jax.errors import InputError

ROOT = Path(__file__).parent.parent
PNG = b"\x89PNG"


def run_experiment(name: str, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--quick", "--model", str(model),
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=600)


def script(name: str):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "experiments"))


def test_sequential_quick(tiny_model_dir_with_tokenizer, tmp_path):
    out = tmp_path / "out"
    proc = run_experiment("sequential", tiny_model_dir_with_tokenizer, out, "--alphas", "0,1")
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["num_facts"] == 3 and r["measured_after"] == [1, 2, 3] and r["alphas"] == [0.0, 1.0]
    assert r["settings"]["lp_seeds"] == 2 and r["settings"]["mc_samples"] == 2
    assert [s["inserted"] for s in r["steps"]] == [1, 2, 3]
    for step in r["steps"]:
        n = step["inserted"]
        zero, one = step["alphas"]["0.0"], step["alphas"]["1.0"]
        # the facts inserted so far and the others partition the forget set; the last step has no others
        assert (zero["forget_not_inserted"] is None) == (n == 3)
        # α = 0 adds nothing: every LP equals the unedited one on the same (paired) masks
        for name in ("forget", "retain", "real_authors"):
            assert abs(zero[name]["change"]["mean"]) < 1e-3
            assert len(one[name]["lp"]["per_seed"]) == 2
        assert one["forget"]["no_edit"] == zero["forget"]["no_edit"]
        assert abs(one["forget"]["change"]["mean"] - (one["forget"]["lp"]["mean"] - one["forget"]["no_edit"]["mean"])) < 1e-6
    # ForgetLP over the inserted facts: the no-edit level of all three facts is the no-edit forget summary
    assert r["steps"][-1]["alphas"]["1.0"]["forget"]["no_edit"]["mean"] == pytest.approx(r["no_edit"]["forget"]["mean"])
    # max |RetainLP change| is the largest over the measured steps
    changes = [abs(s["alphas"]["1.0"]["retain"]["change"]["mean"]) for s in r["steps"]]
    assert r["max_abs_retain_change"]["1.0"]["value"] == pytest.approx(max(changes))
    assert r["max_abs_retain_change"]["0.0"]["within_1_nat"] is True
    # the memory grown by insertions equals a batch build with the same ridge
    seq = r["sequential_vs_batch"]
    assert seq["readout_max_abs_diff"] <= 1e-4 * max(seq["readout_max_abs"], 1e-12)
    assert len(r["seconds"]["insert_per_fact"]) == 3 and r["seconds"]["per_scored_sequence_warm"] > 0
    assert (out / "sequential.png").read_bytes()[:4] == PNG
    assert "max \\|RetainLP change\\|" in (out / "results.md").read_text()


def test_sequential_quick_with_the_selective_memory(tiny_model_dir_with_tokenizer, tmp_path):
    """Keys at both steps of every subject token, gated: a fact's entries go in together, the gate is
    re-calibrated at each measurement, and the grown memory still equals a batch build."""
    out = tmp_path / "out"
    proc = run_experiment("sequential", tiny_model_dir_with_tokenizer, out, "--alphas", "1", "--capture-steps", "all",
                          "--key-positions", "subject", "--gate-rate", "0.2", "--gate-facts", "retain90[3:6]")
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    m = r["memory"]
    assert m["capture_steps"] == [0, 1] and m["key_positions"] == "subject" and m["entries"] > 2 * r["num_facts"]
    entries = [s["entries"] for s in r["steps"]]
    assert entries == sorted(entries) and entries[-1] == m["entries"] and all(e % 2 == 0 for e in entries)
    assert all(s["gate"]["rate"] == 0.2 and s["gate"]["tokens"] > 0 for s in r["steps"])
    seq = r["sequential_vs_batch"]
    assert seq["readout_max_abs_diff"] <= 1e-4 * max(seq["readout_max_abs"], 1e-12)
    assert "gated at rate 0.2" in (out / "results.md").read_text()
    bad = run_experiment("sequential", tiny_model_dir_with_tokenizer, tmp_path / "bad", "--gate-rate", "1")
    assert bad.returncode == 2 and "--gate-rate must be a fraction" in bad.stderr and not (tmp_path / "bad").exists()


def test_scaling_quick(tiny_model_dir_with_tokenizer, tmp_path):
    out = tmp_path / "out"
    proc = run_experiment("scaling", tiny_model_dir_with_tokenizer, out)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    known, unknown = r["facts"]["known"], r["facts"]["unknown"]
    assert known["encoded"] == 3 and unknown["encoded"] == 20    # every fact has a subject: none dropped
    sizes = r["sizes"]
    assert [s["n"] for s in sizes] == [2, 3, 6]  # '2,known,6' with 3 known facts
    for s in sizes:
        assert s["seconds"]["build"] == pytest.approx(s["seconds"]["capture"] + s["seconds"]["solve"])
        assert min(s["seconds"].values()) > 0 and s["capacity"] >= s["n"] and len(s["fact_ids"]) == s["n"]
    assert [s["quality"] is not None for s in sizes] == [True, True, False]
    assert sizes[2]["quality_note"].startswith("quality not measured: facts unknown to the model (3 of 6)")
    q = sizes[1]["quality"]
    assert q["forget_drop"]["mean"] == pytest.approx(q["forget_lp_no_edit"]["mean"] - q["forget_lp"]["mean"])
    assert len(q["retain_change"]["per_seed"]) == 2
    assert set(r["fit"]) == {"capture", "solve", "build"} and all(np.isfinite(v) for v in r["fit"].values())
    assert (out / "scaling.png").read_bytes()[:4] == PNG
    assert "quality not measured" in (out / "results.md").read_text()


def test_cost_quick(tiny_model_dir_with_tokenizer, tmp_path):
    out = tmp_path / "out"
    proc = run_experiment("cost", tiny_model_dir_with_tokenizer, out, "--baseline", "gradascent,npo", "--max-steps", "2",
                          "--real-authors=")
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    phases = r["memory"]["phases"]
    # the recommended memory (timerome edit's default): its gate calibration is a phase of its cost
    assert r["memory"]["kind"] == "recommended" and r["memory"]["gate"] is not None
    assert r["memory"]["entries"] > r["memory"]["facts"]   # every subject token, step and sampler state
    for name in ("trace", "capture", "solve", "gate"):
        for kind in ("cold", "warm"):
            m = phases[name][kind]
            assert m["seconds"] > 0 and m["host_peak_rss_bytes"] > 0
    assert r["memory"]["seconds_warm"] == pytest.approx(sum(phases[n]["warm"]["seconds"] for n in phases))
    assert set(r["training"]) == {"gradascent", "npo"}
    drops = {m: t["quality"]["forget"]["drop"]["mean"] for m, t in r["training"].items()}
    converged = [m for m, t in r["training"].items() if t["stats"]["converged"]]
    assert r["strongest"] == max(converged or drops, key=drops.get)
    for t in r["training"].values():
        assert t["stats"]["steps"] == 2 and t["call_seconds"] >= t["stats"]["wall_clock_seconds"]
        assert 0 < t["changed_parameters"]["bytes"] <= t["bytes_of_trained_tensors"] <= r["parameter_bytes"]
        assert t["bytes_of_trained_tensors"] == 4 * t["stats"]["trained_parameters"]  # float32 fixture
        assert t["quality"]["forget"]["drop"]["mean"] == pytest.approx(
            r["no_edit"]["forget"]["mean"] - t["quality"]["forget"]["lp"]["mean"])
    st = r["training"][r["strongest"]]["stats"]
    assert r["speedup"]["compile_excluded"] == pytest.approx(
        (st["setup_seconds"] + st["wall_clock_seconds"]) / r["memory"]["seconds_warm"])
    assert set(r["memory"]["quality"]) == {"forget", "retain"}  # --real-authors '' skips RealAuthorLP
    b = r["memory"]["bytes"]
    assert b["entries"] == r["memory"]["entries"] and 0 < b["used_by_facts"] < b["allocated"]
    assert (out / "cost.png").read_bytes()[:4] == PNG
    assert "Speed-up of the memory" in (out / "results.md").read_text()


@pytest.mark.parametrize("name, flags, message", [
    ("sequential", ["--alphas", "x"], "--alphas must be comma-separated numbers"),
    ("cost", ["--baseline", "sgd"], "--baseline must be 'best' or training methods"),
])
def test_user_errors_are_one_line(tiny_model_dir_with_tokenizer, tmp_path, name, flags, message):
    proc = run_experiment(name, tiny_model_dir_with_tokenizer, tmp_path / "out", *flags)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"{name}: error: {message}")
    assert not (tmp_path / "out").exists()


def test_measured_steps_and_alphas():
    sequential = script("sequential")
    assert sequential.measured_steps(40, 10) == [1, 10, 20, 30, 40]
    assert sequential.measured_steps(7, 3) == [1, 3, 6, 7]
    assert sequential.measured_steps(3, 1) == [1, 2, 3]



def test_list_options_parse_once_for_every_experiment():
    common = script("_common")
    assert common.parse_list("0.5, 1", float, "--alphas") == [0.5, 1.0]
    assert common.parse_list("4,1,4", float, "--alphas", unique=True) == [1.0, 4.0]
    assert common.parse_list("npo, rmu", str, "--methods") == ["npo", "rmu"]
    for text, kind, kwargs, message in (
            ("1,x", float, {}, "--o must be comma-separated numbers, got '1,x'"),
            ("2.5", int, {}, "--o must be comma-separated integers"),
            (" , ", float, {}, "--o is empty"),
            ("1,-1", float, dict(valid=common.positive, must="finite numbers > 0"), "--o must be finite numbers > 0"),
            ("nan", float, dict(valid=common.positive, must="finite numbers > 0"), "--o must be finite numbers > 0")):
        with pytest.raises(InputError, match=message):
            common.parse_list(text, kind, "--o", **kwargs)


def test_sizes_and_slope():
    scaling = script("scaling")
    assert scaling.parse_sizes("40,known,10,400", num_known=153, num_pool=513) == [10, 40, 153, 400]
    with pytest.raises(InputError, match="exceeds"):
        scaling.parse_sizes("10,600", num_known=153, num_pool=513)
    with pytest.raises(InputError):
        scaling.parse_sizes("0,10", num_known=153, num_pool=513)
    n = np.array([10, 20, 40, 80])
    assert scaling.loglog_slope(n, 3e-3 * n ** 0.7) == pytest.approx(0.7)
    assert scaling.loglog_slope([10], [1.0]) is None


def test_cost_helpers():
    cost = script("cost")
    assert cost.parse_baselines("best") == ["gradascent", "graddiff", "npo", "simnpo", "rmu"]
    assert cost.parse_baselines("npo,rmu,npo") == ["npo", "rmu"]
    before = {"a": jnp.zeros((2, 3), jnp.float32), "b": jnp.ones((4,), jnp.bfloat16)}
    after = {"a": before["a"].at[0, 1].set(1.0).at[1, 2].set(2.0), "b": before["b"].at[3].set(0.0)}
    assert cost.changed_parameters(before, after) == {"elements": 3, "bytes": 2 * 4 + 1 * 2}


def test_quick_keeps_typed_options():
    import argparse

    quick = script("_quick")
    p = argparse.ArgumentParser()
    p.add_argument("--mc-samples", type=int, default=8)
    p.add_argument("--lp-seeds", type=int, default=5)
    p.set_defaults(mc_samples=8)
    argv = ["--mc", "8"]  # typed, equal to the default, abbreviated
    args = p.parse_args(argv)
    quick.apply_quick(p, args, {"mc_samples": 2, "lp_seeds": 2}, argv)
    assert (args.mc_samples, args.lp_seeds) == (8, 2)


def test_trained_bytes(llada_backbone):
    from timerome_jax.baselines import training

    cost = script("cost")
    total = sum(x.size * 4 for x in jax.tree.leaves(llada_backbone.params))
    assert cost.trained_bytes(llada_backbone, training.TrainConfig("npo")) == total
    # RMU trains the MLP down-projections [L=3, 128, 64] of layers ℓ−2..ℓ with ℓ = L // 2 = 1: layers 0 and 1
    assert cost.trained_bytes(llada_backbone, training.TrainConfig("rmu")) == 2 * 128 * 64 * 4


def test_selectivity_quick(tiny_model_dir_with_tokenizer, tmp_path):
    out = tmp_path / "out"
    proc = run_experiment("selectivity", tiny_model_dir_with_tokenizer, out)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    variants = ("paper", "multistep", "gated", "multistep+gated", "covariance", "covariance+gated", "subject+gated",
                "multistep+subject+gated", "multistep+subject+sampler+gated")
    assert len(r["rows"]) == len(variants) * 2          # 9 variants x α in {1, 2} (extra coordinates: below)
    assert builds_covariance(r) == {"covariance": True, "covariance+gated": True}
    builds = {b["variant"]: b for b in r["builds"]}     # one coordinate: the traced one
    assert builds["paper"]["entries"] == 3 and builds["multistep"]["entries"] == 6   # K = 2 steps
    assert builds["multistep"]["capture_steps"] == [0, 1]
    subject = builds["subject+gated"]          # one entry per subject token (≥ 1 per fact)
    assert subject["key_positions"] == "subject" and subject["entries"] > 3
    assert builds["multistep+subject+gated"]["entries"] == 2 * subject["entries"]
    sampled = builds["multistep+subject+sampler+gated"]   # + 2 sampler steps (of G=32, 16 steps)
    assert sampled["sampler_capture"] == {"gen_length": 32, "steps": 16, "block_length": 32, "capture_steps": [0, 8],
                                          "mentions": False}
    assert sampled["entries"] >= 4 * subject["entries"]
    gate = builds["gated"]["gate"]
    assert gate["rate"] == 0.001 and -1.0 <= gate["gate"] <= 1.0 and gate["tokens"] > 0
    assert len(r["safe_points"]) == len(variants)
    for row in r["rows"]:
        assert len(row["forget_drop"]["per_seed"]) == 2
        tail = row["retain_tail"]        # per-fact tail of the 3 quick retain facts
        assert tail["num_facts"] == 3 and len(tail["worst"]) == 3
        assert tail["worst"][0]["fact"].startswith("retain90:")
        assert tail["share_losing_over_5"] <= tail["share_losing_over_1"]
        assert row["retain_change_over_facts"]["mean"] == pytest.approx(row["retain_change"]["mean"])
    assert (out / "selectivity.png").read_bytes()[:4] == PNG
    assert "| variant |" in (out / "results.md").read_text()
    bad = run_experiment("selectivity", tiny_model_dir_with_tokenizer, tmp_path / "bad", "--gate-rate", "2")
    assert bad.returncode == 2 and "--gate-rate must be a fraction" in bad.stderr and not (tmp_path / "bad").exists()


def builds_covariance(r: dict) -> dict:
    return {b["variant"]: b["covariance"] for b in r["builds"] if b["covariance"]}


def test_selectivity_build_seeds_average_memories_of_other_noise_draws(tiny_model_dir_with_tokenizer, tmp_path):
    out = tmp_path / "out"
    proc = run_experiment("selectivity", tiny_model_dir_with_tokenizer, out, "--variants", "paper", "--alphas", "4",
                          "--build-seeds", "2", "--coordinate", "1,mlp,0", "--extra-coordinates", "1,resid,0")
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["settings"]["build_seeds"] == 2 and [b["build_seed"] for b in r["builds"]] == [0, 1, 0, 1]
    assert [(b["coordinate"]["layer"], b["coordinate"]["module"]) for b in r["builds"]] == [(1, "mlp")] * 2 + [(1, "resid")] * 2
    assert [p["coordinate_label"] for p in r["safe_points"]] == ["L1 mlp k0", "L1 resid k0"]
    row = r["rows"][0]
    assert len(r["rows"]) == 2 and row["builds"] == 2 and row["retain_tail"]["num_facts"] == 3
    assert row["forget_drop_over_facts"]["mean"] == pytest.approx(row["forget_drop"]["mean"])
    bad = run_experiment("selectivity", tiny_model_dir_with_tokenizer, tmp_path / "bad", "--build-seeds", "0")
    assert bad.returncode == 2 and "--build-seeds must be >= 1" in bad.stderr


def test_selectivity_operating_points_feed_the_forget_table():
    sel, table = script("selectivity"), script("forget_table")
    import argparse
    args = argparse.Namespace(lam=0.1, retain_tolerance=1.0, gate_facts="retain90[40:160]", gate_rate=0.01,
                              capture_steps="all", sampler_steps=4, gen_length=64, gen_steps=32, block_length=32)
    def row(variant, alpha, drop, retain):
        return {"variant": variant, "alpha": alpha, "coordinate": {"layer": 1, "step": 0, "module": "resid", "steps": 8},
                "forget_drop": {"mean": drop}, "retain_change": {"mean": retain}}
    rows = [row("paper", 1.0, 50.0, -40.0), row("multistep+gated", 2.0, 9.0, -0.9), row("gated", 4.0, 30.0, -3.0)]
    points = sel.operating_points(rows, args)
    assert points["utility_safe"]["variant"] == "multistep+gated" and points["max_forget"]["variant"] == "paper"
    assert points["utility_safe"]["capture_steps"] == "all" and points["utility_safe"]["gate_rate"] == 0.01
    assert points["utility_safe"]["key_positions"] == "last"
    assert points["max_forget"]["gate_rate"] is None and points["max_forget"]["capture_steps"] is None
    none = sel.operating_points([row("paper", 1.0, 50.0, -40.0)], args)["utility_safe"]
    assert none["is_no_edit"] and none["alpha"] == 0.0
    import json, tempfile, pathlib
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "results.json"
        path.write_text(json.dumps({"operating_points": points}))
        ns = argparse.Namespace(operating_points=str(path), lam=0.1, covariance=None)
        safe, most = table.operating_points(ns)
    assert (safe.gate_rate, safe.gate_facts, safe.capture_steps, safe.alpha) == (0.01, "retain90[40:160]", "all", 2.0)
    assert most.gate_rate is None and most.capture_steps is None and "gated at rate 0.01" in safe.describe()
    assert safe.key_positions == most.key_positions == "last"
    subject = sel.operating_points([row("multistep+subject+gated", 8.0, 60.0, -0.7)], args)
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "results.json"
        path.write_text(json.dumps({"operating_points": subject}))
        safe, _ = table.operating_points(argparse.Namespace(operating_points=str(path), lam=0.1, covariance=None))
        assert safe.key_positions == "subject" and "every subject token" in safe.describe()
        assert safe.sampler_capture is None
        sampled = sel.operating_points([row("multistep+subject+sampler+gated", 8.0, 60.0, -0.7)], args)
        path.write_text(json.dumps({"operating_points": sampled}))
        safe, _ = table.operating_points(argparse.Namespace(operating_points=str(path), lam=0.1, covariance=None))
        assert safe.sampler_capture == mem.SamplerCapture(64, 32, 32, (0, 8, 16, 24))
        assert "sampler steps 0,8,16,24" in safe.describe()
        path.write_text(json.dumps({"operating_points": {k: {**v, "key_positions": "first"} for k, v in subject.items()}}))
        with pytest.raises(InputError, match="key positions must be one of"):
            table.operating_points(argparse.Namespace(operating_points=str(path), lam=0.1, covariance=None))


def test_heldout_quick_tunes_on_one_author_and_reports_the_controls_on_the_other(tiny_model_dir_with_tokenizer,
                                                                                  tmp_path):
    out = tmp_path / "out"
    proc = run_experiment("heldout", tiny_model_dir_with_tokenizer, out, "--directions", "ab", "--candidates",
                          "1,mlp,0", "--alphas", "0.25,0.5", "--retain-tolerance", "100", "--coordinate", "0,resid,0")
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    (d,) = r["directions"]
    assert (d["tune_author"], d["test_author"]) == ("forget_a", "forget_b")
    # the grid: 2 coordinates × 1 gate rate × 2 α, each scored on the tuning author and retain_tune
    assert len(d["tuning"]) == 4 and {t["coordinate_label"] for t in d["tuning"]} == {"L0 resid k0", "L1 mlp k0"}
    ok = [t for t in d["tuning"] if t["retain_change"]["mean"] >= -100 and t["retain_change"]["tail"]["share_losing_over_5"] == 0]
    best = max(ok, key=lambda t: t["forget_drop"]["mean"])
    assert d["chosen"] == {"coordinate": best["coordinate"], "alpha": best["alpha"], "gate_rate": best["gate_rate"]}
    results = d["results"]
    assert list(results) == ["recommended", "steering", "random_coordinate", "ungated", "paper"]
    for name, row in results.items():
        assert len(row["builds"]) == 2                                 # --quick's two build seeds
        assert len(row["retain_change"]["per_fact"]) == 3 and len(row["other_author_change"]["per_fact"]) == 3
        assert row["retain_change"]["ci_low"] <= row["retain_change"]["mean"] <= row["retain_change"]["ci_high"]
        assert row["falsifier"]["passes"] == all(row["falsifier"][k] for k in ("forget_drop", "retain_test", "other_author"))
    assert results["ungated"]["gate_rate"] is None and results["paper"]["alpha"] == 1.0
    assert results["random_coordinate"]["builds"][0]["coordinate"]["layer"] != best["coordinate"]["layer"]
    # the other author is the tuning author; retain_test is the third retain part
    assert results["recommended"]["other_author_change"]["tail"]["worst"][0]["fact"].startswith("forget01:")
    assert all(w["fact"].startswith("retain90:6") for w in results["recommended"]["retain_change"]["tail"]["worst"])
    config = json.loads((out / "edit_config.json").read_text())    # what a model directory takes
    assert {k: config[k] for k in ("alpha", "gate_rate", "coordinate")} == d["chosen"]
    text = (out / "results.md").read_text()
    assert "Tune on forget_a, report on forget_b" in text and "| retain_test | `retain90[60:160] (first 3)` |" in text


@pytest.mark.parametrize("flags, message", [
    (["--gate-rates", "1"], "--gate-rates must be fractions in (0, 1)"),
    (["--directions", "ac"], "--directions must be ab, ba or ab,ba"),
    (["--controls", "steering,oracle"], "--controls: unknown oracle"),
])
def test_heldout_refuses_bad_flags(tiny_model_dir_with_tokenizer, tmp_path, flags, message):
    proc = run_experiment("heldout", tiny_model_dir_with_tokenizer, tmp_path / "bad", *flags)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_the_mean_value_memory_adds_the_mean_delta_where_a_stored_key_matches():
    from timerome_jax.baselines import mean_value_memory

    rng = np.random.default_rng(0)
    keys, deltas = rng.normal(size=(3, 16)).astype(np.float32), rng.normal(size=(3, 8)).astype(np.float32)
    memory, _ = mem.build(keys, deltas, layer=0, module="resid", alpha=2.0, lam=1e-6)
    memory = mem.with_gate(memory, 0.9)
    steering = mean_value_memory(memory)
    # the same keys, read-out and gate; every stored value is the mean δ
    np.testing.assert_array_equal(steering.keys, memory.keys)
    np.testing.assert_array_equal(steering.readout, memory.readout)
    assert float(steering.gate) == float(memory.gate)
    for j in range(3):   # at a stored key c(x) ≈ e_j: the memory adds α δ_j, the control α mean δ
        np.testing.assert_allclose(memory.term(jnp.asarray(keys[j])), 2.0 * deltas[j], atol=1e-3)
        np.testing.assert_allclose(steering.term(jnp.asarray(keys[j])), 2.0 * deltas.mean(axis=0), atol=1e-3)
    far = -jnp.asarray(keys[0])   # below the gate: nothing is added
    np.testing.assert_array_equal(steering.term(far), np.zeros(8, np.float32))


def test_baseline_curves_quick_scores_early_stops_of_each_method_and_rate(tiny_model_dir_with_tokenizer, tmp_path):
    out = tmp_path / "out"
    proc = run_experiment("baseline_curves", tiny_model_dir_with_tokenizer, out, "--lrs", "1e-4,1e-3")
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    assert [(run["method"], run["lr"]) for run in r["runs"]] == [("gradascent", 1e-4), ("gradascent", 1e-3),
                                                               ("npo", 1e-4), ("npo", 1e-3)]
    for run in r["runs"]:
        steps = [c["step"] for c in run["checkpoints"]]
        # the scored checkpoints of --checkpoints 0,2, then the run's last model
        assert steps[:2] == [0, 2] and steps[-1] == run["steps"] and run["checkpoints"][-1]["final"]
        assert run["checkpoints"][0]["forget_drop"]["mean"] == 0.0      # step 0 is the unedited model
        assert len(run["checkpoints"][0]["retain_change"]["per_fact"]) == 3
    # the regulariser (retain_tune) is apart from every scored set
    assert r["settings"]["regulariser"] == "retain_tune = retain90[:30]" and "retain90[60:160]" in r["settings"]["retain"]
    assert (out / "curves.png").read_bytes()[:4] == PNG and "| gradascent | 0.001 |" in (out / "results.md").read_text()
    bad = run_experiment("baseline_curves", tiny_model_dir_with_tokenizer, tmp_path / "bad", "--regulariser-part", "retain_test")
    assert bad.returncode == 2 and "share" in bad.stderr and not (tmp_path / "bad").exists()
    # the sweep grows: a later run includes the earlier one's runs, checked to be scored the same way
    grown = tmp_path / "grown"
    proc = run_experiment("baseline_curves", tiny_model_dir_with_tokenizer, grown, "--methods", "npo", "--lrs", "3e-4",
                          "--include", str(out / "results.json"))
    assert proc.returncode == 0, proc.stderr
    g = json.loads((grown / "results.json").read_text())
    assert [(run["method"], run["lr"]) for run in g["runs"]] == [("npo", 3e-4)] + [(run["method"], run["lr"]) for run in r["runs"]]
    assert g["runs"][1]["checkpoints"] == r["runs"][0]["checkpoints"] and g["runs"][1]["train_settings"]["max_steps"] == 4
    again = run_experiment("baseline_curves", tiny_model_dir_with_tokenizer, tmp_path / "again", "--methods", "npo",
                           "--lrs", "1e-4", "--include", str(out / "results.json"))
    assert again.returncode == 2 and "npo at lr 0.0001 is already in the sweep" in again.stderr
    other = run_experiment("baseline_curves", tiny_model_dir_with_tokenizer, tmp_path / "other", "--methods", "npo",
                           "--lrs", "3e-4", "--mc-samples", "3", "--include", str(out / "results.json"))
    assert other.returncode == 2 and "mc_samples" in other.stderr and not (tmp_path / "other").exists()


def test_falsifier_cli_writes_one_author_as_facts_and_scores_the_other_in_its_own_suite(tmp_path):
    fc = script("falsifier_cli")
    args = fc.parse_args(["--out", str(tmp_path / "unused")])
    paths = fc.write_inputs(tmp_path, args)
    from timerome_jax import data, splits
    from timerome_jax.facts import load_facts

    facts = load_facts(str(paths["facts"]))
    author_b = [r for _, _, r in data.load_selection("forget01_subjects[20:40]")]
    assert [(f.prompt, f.answer) for f in facts] == [(r["question"], r["answer"]) for r in author_b]
    assert all(f.subject for f in facts)
    edited, other = (json.loads(paths[k].read_text()) for k in ("edited", "other"))
    assert [r["question"] for r in edited["forget"]] == [r["question"] for r in author_b]
    assert [r["question"] for r in other["forget"]] == [r["question"] for r in data.load_split("forget01")[:20]]
    assert len(edited["retain"]) == 160 and edited["retain"][0]["question"] == data.load_split("retain90")[0]["question"]
    assert all("perturbed_answer" in r and "paraphrased_question" in r for r in edited["forget"] + other["forget"])
    splits.check_disjoint(forget=str(paths["facts"]), other=splits.selection("forget_a"))


def test_falsifier_cli_summarises_drops_and_changes_with_their_signs_and_states_the_verdict():
    fc = script("falsifier_cli")
    base = np.zeros((2, 3))                         # [seeds, facts]
    edited = [np.full((2, 3), -50.0), np.full((2, 3), -46.0)]   # two builds: LP fell by 50 and 46
    drop = fc.summarise(base, edited, ["a", "b", "c"], -1.0)
    assert drop["mean"] == pytest.approx(48.0) and drop["builds"] == 2 and "tail" not in drop
    retain = fc.summarise(base, [np.array([[0.0, -6.0, -1.5]] * 2)], ["x", "y", "z"], 1.0)
    assert retain["mean"] == pytest.approx(-2.5)
    assert retain["tail"]["share_losing_over_5"] == pytest.approx(1 / 3)
    assert [w["fact"] for w in retain["tail"]["worst"]][:2] == ["y", "z"]
    rows = {"forget_drop": drop, "retain_change_all160": retain, "retain_change_retain_test": None,
            "other_author_change": {"mean": -5.5}}
    v = fc.verdict(rows, "retain_change_all160")
    assert v == {"passes": False, "forget_drop_ok": True, "retain_ok": True, "other_author_ok": False}
    assert fc.verdict(rows, "retain_change_retain_test") is None
    rows["other_author_change"]["mean"] = -4.0
    assert fc.verdict(rows, "retain_change_all160")["passes"]


def test_falsifier_cli_report_names_the_verdict_and_both_tails():
    fc = script("falsifier_cli")
    base = np.zeros((1, 3))
    drop = fc.summarise(base, [np.full((1, 3), -50.0)], ["f1", "f2", "f3"], -1.0)
    retain = fc.summarise(base, [np.array([[0.0, -6.0, -1.5]])], ["x", "y", "z"], 1.0)
    other = fc.summarise(base, [np.array([[-18.0, 0.0, 0.0]])], ["p", "q", "r"], 1.0)
    rows = {"forget_drop": drop, "retain_change_all160": retain, "retain_change_retain_test": None,
            "other_author_change": other}
    metric = {"model_utility": {"mean": 0.5}}
    r = {"model": "m", "command": "c", "forget_part": "forget_b", "forget_selection": "forget01[20:40]",
         "other_part": "forget_a", "build_seeds": 1, "eval_flags": ["--num-retain", "160"], "rows": rows,
         "falsifier": {"forget_drop_nats": 40.0, "max_loss_nats": 5.0,
                       "on_all160_retain": fc.verdict(rows, "retain_change_all160"), "on_retain_test": None},
         "suite_metrics": {"edited": {"no_edit": metric, "memory": [{"model_utility": {"mean": 0.25}}]}}}
    text = fc.report(r)
    assert "with all 160 retain facts **fails** (other_author not met); with retain_test not measured" in text
    assert "| model_utility | 0.500 | 0.250 |" in text and "| retain_test (retain90[60:160]) | not measured" not in text
    assert text.index("- -6.00: y") < text.index("- -1.50: z") < text.index("- -18.00: p")
