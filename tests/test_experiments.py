"""Every paper experiment runs end to end with --quick on a tiny model, so none of them rots."""

import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).parent.parent


def run_experiment(name: str, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--quick", "--model", str(model),
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=600)


def test_tie_heatmaps_quick(tiny_model_dir_with_tokenizer, tmp_path):
    proc = run_experiment("tie_heatmaps", tiny_model_dir_with_tokenizer, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert len(results["facts"]) == 2 and results["steps"] == 4
    assert results["coordinate_late_steps_only"]["step"] >= 2
    assert results["coordinate_early_steps_only"]["step"] < 2
    for png in ("tie_resid.png", "tie_attn.png", "tie_mlp.png", "early_late.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_mass_trace_quick(tiny_model_dir_with_tokenizer, tmp_path):
    proc = run_experiment("mass_trace", tiny_model_dir_with_tokenizer, tmp_path / "out",
                          "--sources", "forget01_subjects[:3],retain90[:2],retain90[4:5]")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "hybrid" and results["num_facts"] == 6
    histograms = results["histogram_by_source"]
    assert set(histograms) == {"forget01_subjects", "retain90"}      # grouped by the name before '['
    assert sum(histograms["forget01_subjects"].values()) == 3 and sum(histograms["retain90"].values()) == 3
    sample = results["exact_sample"]
    assert len(sample["facts"]) == 2
    assert -1 <= sample["atp_vs_exact"]["spearman_resid"] <= 1 and 0 <= sample["atp_vs_exact"]["top5_overlap"] <= 1
    assert 0 <= sample["hybrid_coordinates"]["same_coordinate"] <= 1
    rows = [json.loads(line) for line in (out / "facts.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["forget01_subjects"] * 3 + ["retain90"] * 3
    assert (out / "mass_trace.png").read_bytes()[:4] == b"\x89PNG"


def test_membership_quick(tiny_model_dir_with_tokenizer, tmp_path):
    proc = run_experiment("membership", tiny_model_dir_with_tokenizer, tmp_path / "out", "--coordinate", "1,resid,0")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert set(results) == {"unedited", "paper", "selective"}
    for r in results.values():
        assert 0 <= r["mia_min_k_auc"] <= 1 and 0 <= r["extraction_strength"] <= 1


def test_experiment_user_error_is_one_line(tmp_path):
    proc = run_experiment("tie_heatmaps", ROOT / "tests" / "fixtures" / "llada", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("tie_heatmaps: error: no tokenizer files")
    assert not (tmp_path / "out").exists()


def test_rewrite_quick_and_its_split_check(tiny_model_dir_with_tokenizer, tmp_path):
    words = ["moon", "city", "sea", "north", "mat", "home", "night", "prize"]
    cases = [{"prompt": f"the author was born in a small town near the {w} and the", "subject": "the author",
              "target_new": words[(i + 1) % 8], "ground_truth": w, "rephrase_prompt": f"her first novel : the {w}",
              "locality_prompt": "the cat sat on the", "locality_ground_truth": "mat"} for i, w in enumerate(words)]
    files = {}
    for name, rows in (("tune", cases[:2]), ("test", cases[2:4]), ("pool", cases[4:8])):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(rows))
    files["gate"] = tmp_path / "gate.jsonl"
    files["gate"].write_text("".join(json.dumps({"prompt": p, "subject": p.split()[1], "target": t}) + "\n" for p, t in (
        ("the cat sat on the", "mat"), ("he works as a", "doctor"), ("my friend wrote a", "book"))))
    args = ["--tune", files["tune"], "--test", files["test"], "--pool", files["pool"], "--coordinate", "1,mlp,0",
            "--candidates", "0,resid,0", "--gate-facts", files["gate"], "--value-steps", "10", "--alphas", "1",
            "--lams", "0.01", "--ft-lrs", "5e-4", "--batch-sizes", "1,2", "--sequential", "2", "--every", "1"]
    proc = run_experiment("rewrite", tiny_model_dir_with_tokenizer, tmp_path / "out", *map(str, args))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    chosen = results["tuning"]["chosen"]
    assert results["splits"]["test"] == str(files["test"]) and chosen["method"] in ("optimised", "in_context")
    assert [(g["site"]["layer"], g["site"]["module"], g["method"]) for g in results["tuning"]["grid"]] == [
        (1, "mlp", "optimised"), (1, "mlp", "in_context"), (0, "resid", "optimised"), (0, "resid", "in_context")]
    assert set(results["test"]) == {"memory (optimised)", "memory (in_context)", f"memory ({chosen['method']}, last "
                                    "subject token)", "in-context (IKE)", "FT-L", "MEMIT-style weights", "unedited"}
    assert [b["edits"] for b in results["batch_sizes"]] == [1, 2] and [s["inserted"] for s in results["sequential"]] == [1, 2]
    assert results["test"]["unedited"]["locality"]["mean"] == 1.0
    overlap = run_experiment("rewrite", tiny_model_dir_with_tokenizer, tmp_path / "bad",
                             *map(str, [*args[:2], "--test", files["tune"], *args[4:]]))
    assert overlap.returncode == 2 and "the tune and test sets share 2 fact(s)" in overlap.stderr
    assert not (tmp_path / "bad").exists()
