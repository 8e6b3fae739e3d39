"""experiments/pareto.py (Fig. 4) and experiments/ablations.py run end to end with --quick on the
tiny fixture model; their selection logic (frontier, operating points, baseline placement) is
checked against loop references."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import pareto  # noqa: E402


def run_experiment(name: str, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--quick", "--model", str(model),
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=600)


def summary(per_seed):
    return {"mean": float(np.mean(per_seed)), "ci_low": float(min(per_seed)), "ci_high": float(max(per_seed)),
            "per_seed": list(per_seed)}


BASELINE_ROWS = [
    {"method": "no edit", "forget_lp": summary([-50.0, -52.0]), "retain_lp": summary([-40.0, -41.0])},
    {"method": "GradAscent", "forget_lp": summary([-80.0, -90.0]), "retain_lp": summary([-45.0, -44.0])},
    {"method": "steer", "forget_lp": {"mean": -60.0, "ci_low": -63.0, "ci_high": -58.0},
     "retain_lp": {"mean": -42.0, "ci_low": None, "ci_high": None}},
]


@pytest.fixture(scope="module")
def pareto_run(tiny_model_dir_with_tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pareto")
    (tmp / "table.json").write_text(json.dumps({"rows": BASELINE_ROWS}))
    proc = run_experiment("pareto", tiny_model_dir_with_tokenizer, tmp / "out", "--baselines", str(tmp / "table.json"))
    assert proc.returncode == 0, proc.stderr
    return tmp / "out", json.loads((tmp / "out" / "results.json").read_text())


@pytest.fixture(scope="module")
def ablations_abd(tiny_model_dir_with_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablations") / "abd"
    proc = run_experiment("ablations", tiny_model_dir_with_tokenizer, out, "--only", "a,b,d")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def ablations_ce(tiny_model_dir_with_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablations") / "ce"
    proc = run_experiment("ablations", tiny_model_dir_with_tokenizer, out, "--only", "c,e")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads((out / "results.json").read_text())


def nondominated_by_loop(xs, ys):
    keep = []
    for i in range(len(xs)):
        if not any(xs[j] >= xs[i] and ys[j] >= ys[i] and (xs[j] > xs[i] or ys[j] > ys[i]) for j in range(len(xs))):
            keep.append(i)
    return sorted(keep, key=lambda i: xs[i])


# --- pareto.py -----------------------------------------------------------------------------------

def test_pareto_quick_sweep_frontier_and_operating_points(pareto_run):
    out, r = pareto_run
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "| α | q |" in (out / "results.md").read_text()
    assert r["settings"]["alphas"] == [0.0, 1.0, 2.0] and r["settings"]["q_values"] == [3, 1]   # n = 3: n, n//2
    points = r["points"]
    assert [(p["alpha"], p["q"]) for p in points] == [(a, q) for q in (3, 1) for a in (0.0, 1.0, 2.0)]
    for p in points:
        assert len(p["forget_drop"]["per_seed"]) == 2
        if p["alpha"] == 0:   # the unedited model
            assert p["forget_drop"]["mean"] == 0 and p["retain_change"]["mean"] == 0
        else:
            assert p["forget_drop"]["mean"] != 0
            # drop = no edit − edit, per seed (paired masks)
            np.testing.assert_allclose(p["forget_drop"]["per_seed"],
                                       np.array(r["no_edit"]["forget"]["per_seed"]) -
                                       np.array(p["forget_lp"]["per_seed"]), atol=1e-9)
    # α = 1, q = n differs from α = 1, q = 1: the sweep re-weights the same memory
    assert points[1]["forget_drop"]["mean"] != points[4]["forget_drop"]["mean"]
    xs = [p["forget_drop"]["mean"] for p in points]
    ys = [p["retain_change"]["mean"] for p in points]
    assert r["frontier"] == nondominated_by_loop(xs, ys)
    ops = r["operating_points"]
    assert ops["max_forget"]["point_index"] == int(np.argmax(xs))
    safe = [i for i in range(len(points)) if abs(ys[i]) <= 1.0]
    assert ops["utility_safe"]["point_index"] == max(safe, key=lambda i: xs[i])
    for op in ops.values():
        assert set(op) >= {"alpha", "q", "lam", "coordinate"} and op["coordinate"] == r["coordinate"]["coordinate"]


def test_pareto_places_baselines_relative_to_their_own_no_edit_row(pareto_run):
    _, r = pareto_run
    assert r["baselines_note"] is None
    by_method = {b["method"]: b for b in r["baselines"]}
    assert set(by_method) == {"GradAscent", "steer"}
    ga = by_method["GradAscent"]   # paired per seed: drops 30, 38; retain changes -5, -3
    assert ga["forget_drop"]["paired"] and ga["forget_drop"]["per_seed"] == [30.0, 38.0]
    assert ga["forget_drop"]["mean"] == pytest.approx(34.0) and ga["retain_change"]["mean"] == pytest.approx(-4.0)
    steer = by_method["steer"]     # no per-seed values: the CI shifted by the no-edit mean (-51)
    assert not steer["forget_drop"]["paired"]
    assert (steer["forget_drop"]["mean"], steer["forget_drop"]["ci_low"], steer["forget_drop"]["ci_high"]) == \
        pytest.approx((9.0, 7.0, 12.0))
    assert steer["retain_change"]["mean"] == pytest.approx(-1.5) and steer["retain_change"]["ci_low"] is None


def test_missing_or_unusable_baselines_give_a_note_and_no_points(tmp_path):
    points, note = pareto.read_baselines(str(tmp_path / "nope.json"))
    assert points == [] and "not found" in note
    (tmp_path / "bad.json").write_text("{broken")
    points, note = pareto.read_baselines(str(tmp_path / "bad.json"))
    assert points == [] and "unreadable" in note
    (tmp_path / "no_base.json").write_text(json.dumps({"rows": BASELINE_ROWS[1:]}))
    points, note = pareto.read_baselines(str(tmp_path / "no_base.json"))
    assert points == [] and "no 'no edit' row" in note
    assert pareto.read_baselines(None) == ([], "no --baselines file given")
    unscored = {"method": "rmu", "forget_lp": {"mean": None, "ci_low": None, "ci_high": None, "per_seed": None},
                "retain_lp": summary([-41.0, -42.0])}
    (tmp_path / "partial.json").write_text(json.dumps({"rows": BASELINE_ROWS + [unscored]}))
    points, note = pareto.read_baselines(str(tmp_path / "partial.json"))
    assert [p["method"] for p in points] == ["GradAscent", "steer"] and note.endswith("left out: rmu")


def test_pareto_front_equals_loop_reference():
    rng = np.random.default_rng(0)
    for _ in range(20):
        xs, ys = rng.integers(0, 6, 12).astype(float), rng.integers(0, 6, 12).astype(float)   # many ties
        assert pareto.pareto_front(xs, ys).tolist() == nondominated_by_loop(list(xs), list(ys))




# --- ablations.py --------------------------------------------------------------------------------

def rows_of(r, ablation):
    return [row for row in r["rows"] if row["ablation"] == ablation]


def test_ablations_random_per_fact_and_q_sweep(ablations_abd):
    out, r = ablations_abd
    assert (out / "ablations.png").read_bytes()[:4] == b"\x89PNG"
    assert "| ablation | variant |" in (out / "results.md").read_text()
    assert set(r["ablations"]) == {"a", "b", "d"}
    traced = r["coordinate"]["coordinate"]
    a = rows_of(r, "a")
    draws = [row for row in a if row.get("per_draw")]
    assert len(draws) == 2 and all(d["coordinate"]["layer"] != traced["layer"] for d in draws)
    assert all(d["coordinate"]["step"] == traced["step"] for d in draws)
    mean_row = a[-1]
    assert mean_row["variant"] == "random coordinate (mean of 2 draws)"
    for metric in ("forget_drop", "retain_change"):   # linear: the mean of the draws' scores
        assert mean_row[metric]["mean"] == pytest.approx(np.mean([d[metric]["mean"] for d in draws]), abs=1e-9)
        assert mean_row["spread"][metric]["std"] == pytest.approx(np.std([d[metric]["mean"] for d in draws]))
    b = r["details"]["b"]
    assert len(b["per_fact_coordinates"]) == 3 == sum(m["facts"] for m in b["memories"])
    assert len({(m["layer"], m["module"]) for m in b["memories"]}) == len(b["memories"])
    for m in b["memories"]:
        for fact in m["fact_ids"]:
            where = next(c for c in b["per_fact_coordinates"] if c["fact_id"] == fact)
            assert (where["layer"], where["module"]) == (m["layer"], m["module"]) and where["step"] in m["steps"]
    assert rows_of(r, "b")[-1]["variant"] == f"per-fact coordinates ({len(b['memories'])} memories)"
    d = rows_of(r, "d")
    assert [row["q"] for row in d] == [1, 3]
    # the same memory is scored once and shared: q = n is the traced memory, in a as in b
    reference = a[0]
    assert reference["variant"] == "traced coordinate"
    for row in (d[1], rows_of(r, "b")[0]):
        assert row["forget_drop"] == reference["forget_drop"] and row["retain_change"] == reference["retain_change"]
    assert d[0]["forget_drop"]["mean"] != reference["forget_drop"]["mean"]


def test_ablations_covariance_and_propagated_tie(ablations_ce, ablations_abd):
    out, r = ablations_ce
    assert (out / "ablations.png").read_bytes()[:4] == b"\x89PNG"
    ridge, covariance = rows_of(r, "c")
    assert covariance["forget_drop"]["mean"] != ridge["forget_drop"]["mean"]
    assert r["details"]["c"]["tokens"] > 0 and r["details"]["c"]["retain_facts"] == 6
    e = r["details"]["e"]
    # the teacher-forced trace of the same facts and seed is the trace that chose the coordinate
    assert e["teacher"]["coordinate"] == r["coordinate"]["coordinate"]
    assert -1 <= e["tie_map_correlation"]["pearson"] <= 1
    assert [row["coordinate"] for row in rows_of(r, "e")] == [e["teacher"]["coordinate"], e["propagated"]["coordinate"]]
    # same seed, same settings: the traced memory scores identically in another run
    assert ridge["forget_drop"] == rows_of(ablations_abd[1], "a")[0]["forget_drop"]


def test_pareto_and_ablations_agree_on_the_traced_memory(pareto_run, ablations_abd):
    _, p = pareto_run
    point = next(x for x in p["points"] if x["alpha"] == 1.0 and x["q"] == 3)
    traced = rows_of(ablations_abd[1], "a")[0]
    assert point["forget_drop"] == traced["forget_drop"] and point["retain_change"] == traced["retain_change"]


@pytest.mark.parametrize("script, extra, message", [
    ("pareto", ("--alphas", "1,x"), "--alphas must be comma-separated numbers, got '1,x'"),
    ("pareto", ("--q", "2"), "pareto sweeps α and q: give --alphas and --q-values, not --alpha or --q"),
    ("ablations", ("--only", "a,z"), "--only takes a comma-separated subset of a,b,c,d,e, got 'a,z'"),
    ("ablations", ("--covariance-facts", "retain90[:5]"), "--covariance-facts must be disjoint from --retain"),
])
def test_user_errors_are_one_line(script, tmp_path, extra, message):
    proc = run_experiment(script, tmp_path, tmp_path / "out", *extra)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"{script}: error: {message}")
    assert not (tmp_path / "out").exists()
