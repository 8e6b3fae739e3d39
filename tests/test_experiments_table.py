"""experiments/forget_table.py and experiments/transfer.py end to end with --quick on the tiny
fixture model (random weights, word-level tokenizer), and the transfer script's data logic."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "experiments"))


def run_experiment(name: str, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--quick", "--model", str(model),
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=600)


def operating_points(path: Path) -> Path:
    """A results.json shaped like experiments/pareto.py's."""
    path.write_text(json.dumps({"operating_points": {
        "utility_safe": {"alpha": 0.5, "lam": 0.2, "q": 2, "forget_drop": 1.0,
                         "coordinate": {"layer": 2, "step": 3, "module": "mlp"}},
        "max_forget": {"alpha": 2.0, "lam": 0.1, "q": None}}}))
    return path


def test_forget_table_quick(tiny_model_dir_with_tokenizer, tmp_path):
    points = operating_points(tmp_path / "pareto.json")
    out = tmp_path / "out"
    # the model as its own forget-quality reference: the no-edit row must get exactly 1
    proc = run_experiment("forget_table", tiny_model_dir_with_tokenizer, out, "--methods", "graddiff,steer,timerome",
                          "--operating-points", str(points), "--reference", str(tiny_model_dir_with_tokenizer),
                          "--limit", "1", "--baseline-alpha", "0.75")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert [r["method"] for r in results["rows"]] == ["no edit", "graddiff", "steer", "TimeROME (utility-safe)",
                                                      "TimeROME (max-forget)"]
    base = rows["no edit"]
    for r in results["rows"]:
        for key in ("forget_lp", "retain_lp", "real_author_lp", "forget_quality", "model_utility", "rouge_forget",
                    "truth_ratio_forget", "paraphrase_forget_lp", "relearn_forget_lp"):
            assert len(r[key]["per_seed"]) == 2 and r[key]["ci_low"] <= r[key]["mean"] <= r[key]["ci_high"], key
        # differences are paired per seed against the no-edit row
        np.testing.assert_allclose(r["forget_drop"]["per_seed"],
                                   np.subtract(base["forget_lp"]["per_seed"], r["forget_lp"]["per_seed"]))
        np.testing.assert_allclose(r["retain_change"]["per_seed"],
                                   np.subtract(r["retain_lp"]["per_seed"], base["retain_lp"]["per_seed"]))
        assert r["eval_cost"]["scored_pairs"] > 0
    assert base["forget_quality"]["per_seed"] == [1.0, 1.0] and base["cost"] is None
    assert base["forget_drop"]["per_seed"] == [0.0, 0.0]
    assert results["settings"]["eval_config"]["splits"]["forget"]["n"] == 1
    assert results["settings"]["eval_config"]["mc_samples"] == 2

    train = rows["graddiff"]["cost"]
    assert train["steps"] == 2 and train["stop_reason"] == "max_steps"
    assert train["seconds"] > 0 and train["host_peak_rss_bytes"] > 0 and train["compile_seconds"] > 0
    steer = rows["steer"]
    # the inference baselines take --baseline-alpha, the memory keeps its point's α
    assert steer["settings"]["alpha"] == 0.75 and steer["settings"]["coordinate"] == results["coordinate"]
    assert results["settings"]["inference_baselines_alpha"] == 0.75
    assert steer["cost"]["compilation_excluded"] and steer["cost"]["seconds"] > 0
    safe, strong = rows["TimeROME (utility-safe)"], rows["TimeROME (max-forget)"]
    assert (safe["settings"]["alpha"], safe["settings"]["lam"], safe["settings"]["q"]) == (0.5, 0.2, 2)
    assert (strong["settings"]["alpha"], strong["settings"]["q"]) == (2.0, None)
    assert safe["settings"]["facts"] == 4 and results["facts"]["edited"][0] == "forget01_subjects:1"
    assert safe["forget_lp"]["per_seed"] != strong["forget_lp"]["per_seed"]  # the points reach the memory

    md = (out / "results.md").read_text()
    assert "python experiments/forget_table.py --quick --model" in md.splitlines()[3]
    header = "| method | ForgetLP | RetainLP | RealAuthorLP | forget quality | model utility | wall-clock | peak RSS |"
    assert header in md
    assert "| TimeROME (max-forget) |" in md
    assert results["coordinate"] != {"layer": 2, "step": 3, "module": "mlp"}
    assert "Note: TimeROME (utility-safe) was tuned at layer 2, module mlp, step 3" in md
    assert (out / "forget_table.png").read_bytes()[:4] == b"\x89PNG"


def test_forget_table_bad_operating_points_is_one_line(tiny_model_dir_with_tokenizer, tmp_path):
    bad = tmp_path / "pareto.json"
    bad.write_text(json.dumps({"operating_points": {"utility_safe": {"q": 3}}}))
    proc = run_experiment("forget_table", tiny_model_dir_with_tokenizer, tmp_path / "out",
                          "--operating-points", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "forget_table: error: ") and "no 'utility_safe' entry with an alpha" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_transfer_quick(tiny_model_dir_with_tokenizer, tmp_path):
    points = operating_points(tmp_path / "pareto.json")
    out = tmp_path / "out"
    proc = run_experiment("transfer", tiny_model_dir_with_tokenizer, out, "--suites", "tofu-forget05",
                          "--coordinate", "1,resid,0", "--operating-points", str(points))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    check = results["data_check"]
    assert check["forget01_in_forget05"] == {"contained": True, "found": 40, "of": 40, "positions": [160, 199],
                                             "same_order": True}
    assert check["forget05_in_forget10"]["contained"] and check["perturbed_splits_align"]
    [r] = results["results"]
    assert (r["suite"], r["point"], r["alpha"], r["q"]) == ("tofu-forget05", "TimeROME (utility-safe)", 0.5, 2)
    # every fact of the split has its packaged subject: none is dropped, and the evaluated forget
    # split is drawn half outside forget01, half inside, in file order
    assert r["evaluated_forget_positions"] == [0, 160] and r["evaluated_in_forget01"] == [False, True]
    assert r["facts_in_memory"] == 2
    whole_unedited = np.asarray(r["unedited"]["forget_lp"]["per_seed"])
    parts = [np.asarray(r["subsets"][k]["unedited_lp"]["per_seed"]) for k in ("in_forget01", "outside_forget01")]
    np.testing.assert_allclose((parts[0] + parts[1]) / 2, whole_unedited)
    np.testing.assert_allclose(r["forget_drop"]["per_seed"],
                               whole_unedited - np.asarray(r["edited"]["forget_lp"]["per_seed"]))
    inside = r["subsets"]["in_forget01"]
    np.testing.assert_allclose(inside["forget_drop"]["per_seed"],
                               np.subtract(inside["unedited_lp"]["per_seed"], inside["edited_lp"]["per_seed"]))
    assert r["forget_drop"]["mean"] != 0.0
    md = (out / "results.md").read_text()
    assert "python experiments/transfer.py --quick --model" in md and "forget01 ⊂ forget05 ⊂ forget10" in md
    assert "random-weight checkpoints" in md
    assert (out / "transfer.png").read_bytes()[:4] == b"\x89PNG"


def test_stratified_selection_is_balanced_and_nested():
    import transfer

    inside = [False] * 6 + [True] * 3
    assert transfer.stratified(inside, 4) == [0, 1, 6, 7]
    assert transfer.stratified(inside, 3) == [0, 1, 6]
    assert transfer.stratified(inside, 8) == [0, 1, 2, 3, 4, 6, 7, 8]  # inside runs short: topped up outside
    assert transfer.stratified([True] * 5, 2) == [0, 1]
    assert transfer.stratified(inside, None) == list(range(9))
    for a in range(1, 10):
        assert set(transfer.stratified(inside, a)) <= set(transfer.stratified(inside, a + 1))
        assert len(transfer.stratified(inside, a)) == min(a, 9)


@pytest.mark.parametrize("n", [None, 3])
def test_operating_points_from_flags_or_file(tmp_path, n):
    import argparse

    import forget_table

    args = argparse.Namespace(operating_points=None, alpha=0.7, lam=0.3, q=n, covariance=None)
    [p] = forget_table.operating_points(args)
    assert (p.name, p.alpha, p.lam, p.q) == ("TimeROME", 0.7, 0.3, n) and "no --operating-points" in p.source["from"]
    args.operating_points = str(operating_points(tmp_path / "pareto.json"))
    safe, strong = forget_table.operating_points(args)
    assert (safe.alpha, safe.lam, safe.q, strong.alpha, strong.lam, strong.q) == (0.5, 0.2, 2, 2.0, 0.1, None)
    [only] = forget_table.operating_points(args, ("max_forget",))
    assert only.name == "TimeROME (max-forget)"


def test_embedded_lp_quick(tiny_model_dir_with_tokenizer, tmp_path):
    root = Path(__file__).parent.parent
    proc = subprocess.run([sys.executable, str(root / "experiments" / "embedded_lp.py"), "--quick", "--model",
                           str(tiny_model_dir_with_tokenizer), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["set"] for r in results["rows"]] == ["forget01[:2]", "retain90[:2]"]
    for row in results["rows"]:
        assert row["pairs"] == 2 and len(row["answer_lp"]["per_seed"]) == 2
        assert row["answer_lp"]["mean"] < 0
    (name,) = results["generation"]
    gen = results["generation"][name]
    assert [(g["set"], g["metric"], g["n"]) for g in gen] == [("forget01[:2]", "rougeL_recall", 2),
                                                              ("counterfact_prompt[:2]", "first_words_match", 2)]
    for g in gen:
        assert 0.0 <= g["score"] <= 1.0 and len(g["samples"]) == 2
    assert "| counterfact_prompt[:2] | first_words_match | 2 |" in (tmp_path / "o" / "results.md").read_text()
