"""`timerome trace` and `timerome edit` end to end on a tiny checkpoint with a tokenizer."""

import json
from pathlib import Path

import numpy as np
import pytest

from timerome_jax import cli
from timerome_jax import memory as mem
from timerome_jax import tracing
from timerome_jax.errors import InputError
from timerome_jax.facts import read_facts

FACTS = [
    {"question": "who wrote the book about the old city ?", "answer": "the author was born", "subject": "the old city"},
    {"prompt": "the cat sat on the", "subject": "the cat", "target": "mat"},
    {"question": "which language does the author speak at home ?", "answer": "the author speaks", "subject": "the author"},
]
FAST = ["--steps", "2", "--noise-samples", "2", "--facts-per-chunk", "2"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def traced(tiny_model_dir_with_tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trace")
    facts = write_jsonl(tmp / "facts.jsonl", FACTS)
    out = tmp / "trace"
    assert cli.main(["trace", "--model", str(tiny_model_dir_with_tokenizer), "--facts", str(facts), *FAST,
                     "--out", str(out)]) == 0
    return facts, out


def test_trace_writes_arrays_summary_and_heatmaps(traced):
    _, out = traced
    arrays = np.load(out / "tie.npz")
    assert arrays["tie"].shape == (3, 2, 3, 3)
    assert arrays["clean_lp"].shape == arrays["corrupted_lp"].shape == (3, 2)
    assert list(arrays["modules"]) == ["resid", "attn", "mlp"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["coordinate"]) == {"layer", "step", "module", "steps"} and summary["coordinate"]["steps"] == 2
    assert summary["num_facts"] == 3 and summary["shape"] == [3, 2, 3, 3] and summary["seconds"] > 0
    assert [f["subject"] for f in summary["facts"]] == ["the old city", "the cat", "the author"]
    assert sorted(p.name for p in out.glob("*.png")) == ["tie_attn.png", "tie_mlp.png", "tie_resid.png"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_trace_hybrid_records_estimates_and_confirmed_cells(traced, tiny_model_dir_with_tokenizer, tmp_path):
    facts, exact_out = traced
    out = tmp_path / "hybrid"
    assert cli.main(["trace", "--model", str(tiny_model_dir_with_tokenizer), "--facts", str(facts), *FAST,
                     "--method", "hybrid", "--confirm-top", "2", "--out", str(out)]) == 0
    arrays, exact = np.load(out / "tie.npz"), np.load(exact_out / "tie.npz")
    confirmed = arrays["confirmed"]
    assert confirmed.shape == arrays["estimated_tie"].shape == (3, 2, 3, 3)
    assert (confirmed.sum(axis=(1, 2, 3)) == 2 * 2).all()                 # 2 columns x K = 2 steps
    np.testing.assert_allclose(arrays["tie"][confirmed], exact["tie"][confirmed], atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "hybrid" and summary["settings"]["confirm_top"] == 2
    assert summary["confirmed_cells_per_fact"] == 4
    assert {"estimated_tie", "confirmed_facts"} <= set(summary["coordinate"])
    for f, c in enumerate(summary["per_fact_coordinates"]):
        assert c["confirmed"] and {"tie", "estimated_tie"} <= set(c)
        cell = (f, c["step"], c["layer"], ["resid", "attn", "mlp"].index(c["module"]))
        assert c["tie"] == pytest.approx(float(exact["tie"][cell]), abs=1e-5)


def test_edit_append_remove_and_generate_with_memory(traced, tiny_model_dir_with_tokenizer, tmp_path, capsys):
    facts, trace_dir = traced
    model = tiny_model_dir_with_tokenizer
    memdir = tmp_path / "mem"
    first = write_jsonl(tmp_path / "first.jsonl", FACTS[:2])
    code, out, err = run(capsys, "edit", "--paper", "--model", model, "--facts", first, "--trace", trace_dir, *FAST,
                         "--alpha", "2", "--lam", "0.1", "--out", memdir)
    assert code == 0, err
    record = mem.load(memdir)
    ids = [f.id for f in read_facts(first)] + [f.id for f in read_facts(write_jsonl(tmp_path / "x.jsonl", FACTS[2:]))]
    assert record.memory.size == 2 and record.fact_ids == tuple(ids[:2])
    assert f"fact ids, for --remove --fact-ids: {ids[0]} ({first}:1), {ids[1]} ({first}:2)" in out
    summary = json.loads((trace_dir / "summary.json").read_text())
    assert record.coordinate.as_dict() == summary["coordinate"]

    more = write_jsonl(tmp_path / "more.jsonl", FACTS[2:])
    code, _, err = run(capsys, "edit", "--model", model, "--append", memdir, "--facts", more, *FAST)
    assert code == 0, err
    assert mem.load(memdir).memory.size == 3

    gen_plain, gen_edit = tmp_path / "plain.jsonl", tmp_path / "edit.jsonl"
    common = ["generate", "--model", model, "--facts", facts, "--gen-length", "4", "--steps", "4", "--block-length", "4"]
    assert run(capsys, *common, "--out", gen_plain)[0] == 0
    assert run(capsys, *common, "--memory", memdir, "--out", gen_edit)[0] == 0
    assert len(gen_edit.read_text().splitlines()) == 3

    code, out, err = run(capsys, "edit", "--remove", memdir, "--fact-ids", ids[1])
    assert code == 0, err
    assert mem.load(memdir).fact_ids == (ids[0], ids[2])


def test_edit_with_explicit_coordinate(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    facts = write_jsonl(tmp_path / "f.jsonl", FACTS)
    code, out, err = run(capsys, "edit", "--paper", "--model", tiny_model_dir_with_tokenizer, "--facts", facts,
                         "--coordinate", "1,attn,0", "--q", "2", *FAST, "--out", tmp_path / "m")
    assert code == 0, err
    record = mem.load(tmp_path / "m")
    assert record.coordinate.as_dict() == {"layer": 1, "step": 0, "module": "attn", "steps": 2}
    assert int(record.memory.q) == 2


def test_edit_gated_multi_step_memory_builds_appends_and_removes(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    facts = write_jsonl(tmp_path / "f.jsonl", FACTS[:2])
    more = write_jsonl(tmp_path / "g.jsonl", FACTS[2:])
    retain = write_jsonl(tmp_path / "r.jsonl", [{"question": "what is the old city ?", "answer": "the city is old"},
                                                 {"prompt": "the author sat on the", "target": "cat"}])
    code, out, err = run(capsys, "edit", "--paper", "--model", tiny_model_dir_with_tokenizer, "--facts", facts,
                         "--coordinate", "1,resid,0", *FAST, "--capture-steps", "all", "--gate-rate", "0.25",
                         "--gate-facts", retain, "--out", tmp_path / "m")
    assert code == 0 and "gated: cosine >=" in out and "(4 entries: steps 0,1, last tokens)" in out, err
    record = mem.load(tmp_path / "m")
    assert record.capture_steps == (0, 1) and record.memory.size == 4 and record.memory.gate is not None
    assert record.fact_ids[0] == record.fact_ids[1] != record.fact_ids[2]
    code, out, err = run(capsys, "edit", "--model", tiny_model_dir_with_tokenizer, "--append", tmp_path / "m",
                         "--facts", more, *FAST)
    assert code == 0 and "now holds 3" in out, err
    appended = mem.load(tmp_path / "m")
    assert appended.memory.size == 6 and float(appended.memory.gate) == float(record.memory.gate)
    code, out, err = run(capsys, "edit", "--remove", tmp_path / "m", "--fact-ids", record.fact_ids[0])
    assert code == 0 and "2 remain" in out, err
    assert mem.load(tmp_path / "m").memory.size == 4


def test_edit_subject_positions_build_and_append_like_a_batch_build(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    facts = write_jsonl(tmp_path / "f.jsonl", FACTS[:2])
    more = write_jsonl(tmp_path / "g.jsonl", FACTS[2:])
    everything = write_jsonl(tmp_path / "all.jsonl", FACTS)
    common = ["--model", tiny_model_dir_with_tokenizer, "--coordinate", "1,resid,0", *FAST, "--key-positions", "subject"]
    code, out, err = run(capsys, "edit", "--paper", "--facts", facts, *common, "--out", tmp_path / "m")
    assert code == 0 and "subject tokens)" in out, err
    record = mem.load(tmp_path / "m")
    assert record.key_positions == "subject" and record.memory.size > 2 and len(set(record.fact_ids)) == 2
    code, out, err = run(capsys, "edit", "--model", tiny_model_dir_with_tokenizer, "--append", tmp_path / "m",
                         "--facts", more, *FAST)
    assert code == 0 and "now holds 3" in out, err
    code, out, err = run(capsys, "edit", "--paper", "--facts", everything, *common, "--out", tmp_path / "batch")
    assert code == 0, err
    appended, batch = mem.load(tmp_path / "m"), mem.load(tmp_path / "batch")
    # fact ids come from content: the appended memory's entries are the batch build's, fact by fact
    assert appended.fact_ids == batch.fact_ids
    np.testing.assert_allclose(np.asarray(appended.memory.keys)[: batch.memory.size],
                               np.asarray(batch.memory.keys)[: batch.memory.size], rtol=1e-5, atol=1e-5)
    code, _, err = run(capsys, "edit", "--paper", "--facts", facts, *common, "--q", "100", "--out", tmp_path / "q")
    assert code == 2 and f"q must lie in 1..n = 1..{record.memory.size} (number of memory entries)" in err, err
    assert not (tmp_path / "q").exists()


def test_edit_sampler_capture_builds_and_append_follows_it(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    facts = write_jsonl(tmp_path / "f.jsonl", FACTS[:2])
    more = write_jsonl(tmp_path / "g.jsonl", FACTS[2:])
    everything = write_jsonl(tmp_path / "all.jsonl", FACTS)
    common = ["--model", tiny_model_dir_with_tokenizer, "--coordinate", "1,resid,0", *FAST, "--sampler-steps", "2",
              "--gen-length", "8", "--gen-steps", "4", "--block-length", "4"]
    code, out, err = run(capsys, "edit", "--paper", "--facts", facts, *common, "--out", tmp_path / "m")
    assert code == 0 and "and sampler steps 0,2 of G=8" in out, err
    record = mem.load(tmp_path / "m")
    assert record.sampler_capture == mem.SamplerCapture(8, 4, 4, (0, 2)) and record.memory.size == 6
    code, out, err = run(capsys, "edit", "--model", tiny_model_dir_with_tokenizer, "--append", tmp_path / "m",
                         "--facts", more, *FAST)
    assert code == 0 and "now holds 3" in out, err
    assert run(capsys, "edit", "--paper", "--facts", everything, *common, "--out", tmp_path / "batch")[0] == 0
    appended, batch = mem.load(tmp_path / "m"), mem.load(tmp_path / "batch")
    assert appended.memory.size == batch.memory.size == 9
    # the same entries (keys: the appended fact's noise index differs, so its deltas do)
    np.testing.assert_allclose(np.asarray(appended.memory.keys)[:9], np.asarray(batch.memory.keys)[:9],
                               rtol=1e-5, atol=1e-5)


def test_edit_covariance_regularised_builds_appends_and_differs(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    facts = write_jsonl(tmp_path / "f.jsonl", FACTS[:2])
    more = write_jsonl(tmp_path / "g.jsonl", FACTS[2:])
    retain = write_jsonl(tmp_path / "r.jsonl", [{"question": "what is the old city ?", "answer": "the city is old"},
                                                 {"prompt": "the author sat on the", "target": "cat"}])
    base = ["edit", "--paper", "--model", tiny_model_dir_with_tokenizer, "--coordinate", "1,mlp,0", *FAST]
    code, out, err = run(capsys, *base, "--facts", facts, "--covariance", retain, "--out", tmp_path / "cov")
    assert code == 0 and "C from" in out, err
    assert run(capsys, *base, "--facts", facts, "--out", tmp_path / "plain")[0] == 0
    cov, plain = mem.load(tmp_path / "cov"), mem.load(tmp_path / "plain")
    assert cov.memory.whitening is not None and plain.memory.whitening is None
    np.testing.assert_array_equal(cov.memory.deltas, plain.memory.deltas)  # same captures, other regulariser
    assert np.abs(np.asarray(cov.memory.primal_weight()) - np.asarray(plain.memory.primal_weight())).max() > 1e-6
    code, _, err = run(capsys, "edit", "--model", tiny_model_dir_with_tokenizer, "--append", tmp_path / "cov",
                       "--facts", more, *FAST)
    assert code == 0, err
    appended = mem.load(tmp_path / "cov")
    assert appended.memory.size == 3 and appended.memory.whitening is not None
    code, _, err = run(capsys, *base, "--facts", facts, "--covariance", retain, "--shrinkage", "0",
                       "--out", tmp_path / "bad")
    assert code == 2 and "--shrinkage must be a finite number > 0" in err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("rows, extra, message", [
    ([{"question": "who wrote the book ?", "answer": "x", "subject": "the poem"}], [], "f.jsonl:1: subject 'the poem' does not occur"),
    ([], [], "is empty: expected one JSON object per line"),
    ([FACTS[0], "{not json"], [], "f.jsonl:2"),
    ([FACTS[0]], ["--modules", "resid,ffn"], "unknown module name(s) ffn"),
    ([FACTS[0]], ["--steps", "0"], "steps must be an integer >= 1"),
    ([FACTS[0]], ["--method", "hybrid", "--confirm-top", "0"], "confirm-top must be an integer >= 1"),
    ([FACTS[0]], ["--method", "atp", "--mode", "propagated"], "needs the teacher-forced mode"),
])
def test_trace_bad_inputs_one_line_and_no_output(rows, extra, message, tiny_model_dir_with_tokenizer, tmp_path, capsys):
    facts = write_jsonl(tmp_path / "f.jsonl", rows) if rows else (tmp_path / "f.jsonl")
    if not rows:
        facts.write_text("")
    out = tmp_path / "out"
    code, _, err = run(capsys, "trace", "--model", tiny_model_dir_with_tokenizer, "--facts", facts,
                       "--noise-samples", "1", *extra, "--out", out)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("extra, message", [
    (["--alpha", "-1"], "alpha must be"), (["--lam", "0"], "lambda (ridge) must be"),
    (["--q", "5"], "q must lie in 1..n = 1..3"), (["--coordinate", "9,mlp,0"], "layer 9 is outside"),
    (["--coordinate", "1,ffn,0"], "unknown module 'ffn'"),
    (["--coordinate", "1,mlp,2"], "step 2 is outside 0..1"),
    (["--capture-steps", "0,5"], "capture steps must be distinct steps in 0..1"),
    (["--capture-steps", "a"], "--capture-steps must be comma-separated integers"),
    (["--gate-rate", "1.5", "--gate-facts", "retain90[:2]"], "--gate-rate must be a fraction in (0, 1)"),
    (["--q", "7", "--capture-steps", "all"], "q must lie in 1..n = 1..6"),
    (["--q", "7", "--sampler-steps", "1", "--gen-length", "8", "--gen-steps", "4", "--block-length", "4"],
     "q must lie in 1..n = 1..6"),
    (["--sampler-steps", "5", "--gen-length", "8", "--gen-steps", "4", "--block-length", "4"],
     "number of sampler steps to capture must lie in 1..4"),
    (["--sampler-steps", "2", "--gen-length", "10", "--block-length", "4"], "gen length 10 is not divisible by block length 4"),
])
def test_edit_bad_inputs(extra, message, tiny_model_dir_with_tokenizer, tmp_path, capsys):
    facts = write_jsonl(tmp_path / "f.jsonl", FACTS)
    args = ["edit", "--paper", "--model", tiny_model_dir_with_tokenizer, "--facts", facts, *FAST, "--out", tmp_path / "m"]
    if not any(a == "--coordinate" for a in extra):
        args += ["--coordinate", "1,mlp,0"]
    code, _, err = run(capsys, *args, *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m").exists()


def test_append_to_a_memory_of_another_model_is_refused(traced, tmp_path, capsys):
    facts, _ = traced
    record = mem.MemoryRecord(*mem.build(np.ones((1, 128)), np.ones((1, 64)), layer=0, module="mlp", alpha=1.0, lam=0.1)[:1],
                              coordinate=tracing.Coordinate(0, 0, "mlp"), lam=0.1, key_scale=128.0,
                              fact_ids=("x",), fingerprint="ffffffffffffffff")
    mem.save(record, tmp_path / "m")
    code, _, err = run(capsys, "edit", "--model", Path(__file__).parent / "fixtures" / "llada", "--append",
                       tmp_path / "m", "--facts", facts)
    assert code == 2 and "built for model ffffffffffffffff" in err


def test_edit_builds_the_recommended_memory_by_default_and_the_papers_with_paper(tiny_model_dir_with_tokenizer,
                                                                                  tmp_path, capsys):
    from timerome_jax import splits

    facts = write_jsonl(tmp_path / "f.jsonl", FACTS[:2])
    common = ["--model", tiny_model_dir_with_tokenizer, "--facts", facts, "--coordinate", "1,resid,0", *FAST]
    code, out, err = run(capsys, "edit", *common, "--out", tmp_path / "rec")
    assert code == 0, err
    recommended, preset = mem.load(tmp_path / "rec"), mem.MemorySpec.selective()
    # every step of the 2-step trajectory, every subject token, the preset's sampler steps, gated on retain_gate
    assert recommended.capture_steps == (0, 1) and recommended.key_positions == "subject"
    assert recommended.sampler_capture == preset.sampler and recommended.memory.gate is not None
    assert float(recommended.memory.alpha) == preset.alpha
    n_gate = len(mem_facts(splits.selection("retain_gate")))
    assert f"of {n_gate} retain facts" in out and "subject tokens)" in out
    code, out, err = run(capsys, "edit", "--paper", *common, "--out", tmp_path / "paper")
    assert code == 0, err
    paper = mem.load(tmp_path / "paper")
    assert paper.capture_steps == (0,) and paper.key_positions == "last" and paper.sampler_capture is None
    assert paper.memory.gate is None and float(paper.memory.alpha) == 1.0 and paper.memory.size == 2
    # explicit flags override either preset
    code, _, err = run(capsys, "edit", *common, "--alpha", "3", "--gate-rate", "0.2", "--sampler-steps", "1",
                       "--gen-length", "8", "--gen-steps", "4", "--block-length", "4", "--out", tmp_path / "own")
    assert code == 0, err
    own = mem.load(tmp_path / "own")
    assert float(own.memory.alpha) == 3.0 and own.sampler_capture.gen_length == 8


@pytest.mark.parametrize("extra, message", [
    (["--paper", "--gate-facts", "retain90[:2]"], "--gate-facts calibrates a gate: add --gate-rate"),
    (["--paper", "--rewrite"], "--paper and --rewrite"),
    (["--gate-facts", "retain90[:3]"], "the facts and gate_facts sets share 1 fact(s)"),
])
def test_edit_refuses_a_gate_without_a_rate_and_gate_facts_that_hold_an_edited_fact(extra, message, tmp_path, capsys,
                                                                                     tiny_model_dir_with_tokenizer):
    from timerome_jax import data

    shared = data.load_split("retain90")[2]      # the same fact as retain90[2:3], with a subject of its own
    shared = {"question": shared["question"], "answer": shared["answer"], "subject": "Jaime"}
    facts = write_jsonl(tmp_path / "f.jsonl", [FACTS[0], shared])
    code, _, err = run(capsys, "edit", "--model", tiny_model_dir_with_tokenizer, "--facts", facts, "--coordinate",
                       "1,resid,0", *FAST, "--out", tmp_path / "m", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m").exists()


def mem_facts(selection: str):
    from timerome_jax.facts import load_facts

    return load_facts(selection)


def test_edit_and_its_defaults_follow_the_models_edit_config(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    import shutil
    from types import SimpleNamespace

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir_with_tokenizer, model)
    (model / mem.EDIT_CONFIG_FILE).write_text(json.dumps(
        {"alpha": 5.0, "gate_rate": 0.25, "coordinate": {"layer": 2, "module": "mlp", "step": 1, "steps": 2},
         "note": "chosen on the tuning split"}))
    facts = write_jsonl(tmp_path / "f.jsonl", FACTS[:2])
    code, out, err = run(capsys, "edit", "--model", model, "--facts", facts, *FAST, "--sampler-steps", "1",
                         "--out", tmp_path / "m")
    assert code == 0 and "(the model's edit config)" in out, err
    record = mem.load(tmp_path / "m")
    assert record.coordinate.as_dict() == {"layer": 2, "module": "mlp", "step": 1, "steps": 2}
    assert float(record.memory.alpha) == 5.0 and record.key_positions == "subject"
    # explicit flags win; --paper ignores the config (the traced coordinate, α = 1)
    code, out, err = run(capsys, "edit", "--model", model, "--facts", facts, *FAST, "--sampler-steps", "1",
                         "--coordinate", "0,resid,0", "--alpha", "2", "--out", tmp_path / "own")
    assert code == 0, err
    own = mem.load(tmp_path / "own")
    assert own.coordinate.layer == 0 and float(own.memory.alpha) == 2.0
    code, out, err = run(capsys, "edit", "--paper", "--model", model, "--facts", facts, *FAST, "--coordinate",
                         "1,resid,0", "--out", tmp_path / "paper")
    assert code == 0 and float(mem.load(tmp_path / "paper").memory.alpha) == 1.0, err
    # a bad config is one error naming the file
    fake = SimpleNamespace(source=str(model), config=SimpleNamespace(n_layers=3))
    for bad, message in (('{"alpha": -1}', "alpha must be a finite number >= 0"),
                         ('{"coordinate": {"layer": 9, "module": "mlp", "step": 0}}', "outside this model's 3 layers"),
                         ("[1, 2", "is not a valid edit config")):
        (model / mem.EDIT_CONFIG_FILE).write_text(bad)
        with pytest.raises(InputError, match=message) as info:
            mem.recommended(fake)
        assert str(model / mem.EDIT_CONFIG_FILE) in str(info.value)
    assert mem.recommended(SimpleNamespace(source=None)).spec == mem.MemorySpec.selective()
