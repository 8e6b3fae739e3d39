"""`timerome eval` on the tiny llada fixture with a JSON suite file: metrics.json layout, the table,
bit-identical reruns, --params (tokenizer from --model), --memory, --reference, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ports
from timerome_jax import cli, evaluate, metrics, tracing
from timerome_jax import memory as mem
from timerome_jax.commands import eval as eval_cmd

REQUIRED = ("forget_lp", "retain_lp", "real_author_lp", "forget_quality", "model_utility",
            "truth_ratio_forget", "rouge_forget", "rouge_retain", "paraphrase_forget_lp",
            "relearn_forget_lp")


SUITE = json.loads((Path(__file__).parent / "fixtures" / "tiny_suite.json").read_text())


# the same shapes as tests/test_metrics.py, so both files share compiled code
SMALL = ["--mc-samples", "4", "--seeds", "2", "--gen-length", "8", "--steps", "4",
         "--block-length", "8", "--pairs-per-call", "4", "--batch-size", "16"]


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "tiny_suite.json"
    path.write_text(json.dumps(SUITE))
    return path


def run_eval(capsys, *argv):
    code = cli.main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def metric_numbers(out_dir: Path) -> dict:
    doc = json.loads((out_dir / "metrics.json").read_text())
    return {k: v for k, v in doc.items() if k in metrics.METRICS}


@pytest.fixture(scope="module")
def base_run(tiny_model_dir_with_tokenizer, suite_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "base"
    code = cli.main(["eval", "--model", str(tiny_model_dir_with_tokenizer), "--suite",
                     str(suite_file), "--reference", "none", *SMALL, "--out", str(out)])
    assert code == 0
    return out


def test_metrics_json_layout_and_table(tiny_model_dir_with_tokenizer, suite_file, base_run, tmp_path,
                                       capsys):
    doc = json.loads((base_run / "metrics.json").read_text())
    for name in REQUIRED:
        assert {"mean", "ci_low", "ci_high"} <= set(doc[name]), name
    assert doc["forget_quality"]["mean"] is None and doc["forget_quality"]["reason"] == "--reference none"
    assert isinstance(doc["forget_lp"]["mean"], float) and doc["forget_lp"]["n_seeds"] == 2
    cost = doc["cost"]
    assert cost["process_wall_clock_s"] >= cost["wall_clock_s"] > 0
    assert cost["peak_rss_bytes"] > 10 * 2**20 and "device_peak_bytes_in_use" in cost
    assert doc["config"]["seeds"] == [0, 1] and doc["config"]["mc_samples"] == 4
    assert doc["config"]["relearn_prompt"].startswith("format_prompt(q) + ' ' + answer")
    items = [json.loads(line) for line in (base_run / "items.jsonl").read_text().splitlines()]
    assert [i["split"] for i in items] == ["forget"] * 2 + ["retain"] + ["real_authors"] + ["world_facts"] * 2 + \
        ["holdout"] * 2

    # same seeds -> bit-identical metric numbers; the table names every metric
    again = tmp_path / "again"
    code, out, err = run_eval(capsys, "--model", tiny_model_dir_with_tokenizer, "--suite", suite_file,
                              "--reference", "none", *SMALL, "--out", again)
    assert code == 0, err
    assert metric_numbers(again) == metric_numbers(base_run)
    for name in REQUIRED:
        assert name in out
    assert "wall-clock" in out and "peak RSS" in out


def test_params_dir_takes_the_tokenizer_from_model(tiny_model_dir_with_tokenizer, suite_file, base_run,
                                                   tmp_path, capsys):
    params = ports.convert(tiny_model_dir_with_tokenizer, tmp_path / "converted")
    for f in params.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            f.unlink()
    assert ports.load_pretrained(params).tokenizer_dir is None
    code, _, err = run_eval(capsys, "--model", tiny_model_dir_with_tokenizer, "--params", params,
                            "--suite", suite_file, "--reference", "none", *SMALL, "--out",
                            tmp_path / "out")
    assert code == 0, err
    assert metric_numbers(tmp_path / "out") == metric_numbers(base_run)  # same weights
    configs = [json.loads((d / "metrics.json").read_text())["config"] for d in (tmp_path / "out", base_run)]
    assert configs[0]["params"] == str(params) and configs[0]["fingerprint"] == configs[1]["fingerprint"]


def test_memory_changes_the_metrics(tiny_model_dir_with_tokenizer, suite_file, base_run, tmp_path,
                                    capsys):
    backbone = ports.load_pretrained(tiny_model_dir_with_tokenizer)
    rng = np.random.default_rng(0)
    d_ff, d = backbone.config.mlp_hidden, backbone.config.d_model
    memory, scale = mem.build(rng.normal(size=(3, d_ff)), 20 * rng.normal(size=(3, d)), layer=1,
                              module="mlp", alpha=1.0, lam=0.1)
    record = mem.MemoryRecord(memory, tracing.Coordinate(1, 0, "mlp"), 0.1, scale, ("a", "b", "c"),
                              backbone.fingerprint())
    mem.save(record, tmp_path / "mem")
    code, _, err = run_eval(capsys, "--model", tiny_model_dir_with_tokenizer, "--memory",
                            tmp_path / "mem", "--suite", suite_file, "--reference", "none", *SMALL,
                            "--out", tmp_path / "out")
    assert code == 0, err
    edited, base = metric_numbers(tmp_path / "out"), metric_numbers(base_run)
    assert edited["forget_lp"]["per_seed"] != base["forget_lp"]["per_seed"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["config"]["memory"] == str(tmp_path / "mem")


def test_reference_model_gives_forget_quality(tiny_model_dir_with_tokenizer, suite_file, tmp_path, capsys):
    code, out, err = run_eval(capsys, "--model", tiny_model_dir_with_tokenizer, "--suite", suite_file,
                              "--reference", tiny_model_dir_with_tokenizer, *SMALL, "--out", tmp_path / "o")
    assert code == 0, err
    fq = metric_numbers(tmp_path / "o")["forget_quality"]
    assert fq["per_seed"] == [1.0, 1.0] and fq["mean"] == fq["ci_low"] == fq["ci_high"] == 1.0


def test_default_reference_and_quick_settings():
    assert evaluate.retain_twin("tofu-tiny") == "tofu-tiny-retain"
    assert evaluate.retain_twin("/nonexistent/model") is None
    parser = cli.build_parser()
    quick = parser.parse_args(["eval", "--quick", "--out", "x"])
    assert eval_cmd.resolve_settings(quick) == {"limit": 4, "mc_samples": 4, "seeds": 2}
    explicit = parser.parse_args(["eval", "--quick", "--seeds", "3", "--out", "x"])
    assert eval_cmd.resolve_settings(explicit)["seeds"] == 3
    full = parser.parse_args(["eval", "--out", "x"])
    assert eval_cmd.resolve_settings(full) == {"limit": None, "mc_samples": 32, "seeds": 5}


@pytest.mark.parametrize("extra,message", [
    (["--suite", "tofu-forget02"], "unknown suite 'tofu-forget02'"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--estimator", "exact"], "unknown log-likelihood method 'exact'"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--gen-length", "10", "--block-length", "4"], "gen length 10 is not divisible by block length 4"),
])
def test_errors_are_one_line(tiny_model_dir_with_tokenizer, tmp_path, capsys, extra, message):
    code, out, err = run_eval(capsys, "--model", tiny_model_dir_with_tokenizer, *extra,
                              "--out", tmp_path / "o")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_bad_suite_file_and_existing_out(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({k: v for k, v in SUITE.items() if k != "retain"}))
    code, _, err = run_eval(capsys, "--model", tiny_model_dir_with_tokenizer, "--suite", bad,
                            "--out", tmp_path / "o")
    assert code == 2 and "no records for retain" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    code, _, err = run_eval(capsys, "--model", tiny_model_dir_with_tokenizer, "--out", tmp_path / "full")
    assert code == 2 and "already exists" in err
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"


def test_memory_and_params_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--memory", "m", "--params", "p", "--out", str(tmp_path / "o")])
    assert e.value.code == 2


def mapping_table() -> dict[str, str | None]:
    """docs/evaluation.md's table of metric names: ours -> open-unlearning's (None: ours only)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    section = text[text.index("<!-- open-unlearning names"):]
    rows = {}
    for line in section.splitlines()[3:]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        theirs = cells[1].strip("`") if cells[1].startswith("`") else None
        rows[cells[0].strip("`")] = theirs
    return rows


def test_open_unlearning_format(tiny_model_dir_with_tokenizer, suite_file, tmp_path, capsys):
    from timerome_jax import open_unlearning

    table = mapping_table()
    assert set(table) == set(metrics.METRICS)
    assert {k: v for k, v in table.items() if v} == open_unlearning.NAMES
    out = tmp_path / "ou"
    code, _, err = run_eval(capsys, "--model", tiny_model_dir_with_tokenizer, "--suite", suite_file, "--reference",
                            tiny_model_dir_with_tokenizer, *SMALL, "--format", "open-unlearning", "--plot",
                            "--out", out)
    assert code == 0, err
    evaluation = json.loads((out / "TOFU_EVAL.json").read_text())
    summary = json.loads((out / "TOFU_SUMMARY.json").read_text())
    doc = json.loads((out / "metrics.json").read_text())
    for ours, theirs in table.items():
        name = theirs or ours
        assert name in evaluation, name
        assert evaluation[name]["agg_value"] == doc[ours]["mean"], name
    assert set(summary) == set(open_unlearning.SUMMARY)
    for name in ("forget_quality", "model_utility", "forget_truth_ratio", "privleak", "extraction_strength"):
        assert name in summary
    assert summary["forget_quality"] == 1.0                       # the model is its own reference
    # per-item values: their keys, and the aggregate is their mean
    probs = [v["prob"] for v in evaluation["forget_Q_A_Prob"]["value_by_index"].values()]
    assert evaluation["forget_Q_A_Prob"]["agg_value"] == pytest.approx(np.mean(probs))
    scores = [v["score"] for v in evaluation["forget_truth_ratio"]["value_by_index"].values()]
    assert len(scores) == 2 and all(s > 0 for s in scores)
    assert set(evaluation["mia_min_k"]) >= {"agg_value", "auc", "forget", "holdout"}
    assert len(evaluation["mia_min_k"]["holdout"]["value_by_index"]) == 2
    assert (out / "summary.png").stat().st_size > 10_000
    # a bad --format: one line, exit 2, nothing written
    code, _, err = run_eval(capsys, "--model", tiny_model_dir_with_tokenizer, "--suite", suite_file,
                            "--format", "tofu", "--out", tmp_path / "bad")
    assert code == 2 and "unknown --format 'tofu'" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "bad").exists()
