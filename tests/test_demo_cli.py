"""`timerome demo` (the README's main job) end to end on the tiny fixture with fact files."""

import json
from pathlib import Path

from timerome_jax import cli
from timerome_jax import memory as mem

FORGET = [
    {"question": "who wrote the book about the old city ?", "answer": "the author was born", "subject": "the old city"},
    {"question": "which language does the author speak at home ?", "answer": "the author speaks", "subject": "the author"},
]
RETAIN = [{"question": "what is the old city ?", "answer": "the city is old"}]
OTHER = [{"question": "where was the author born ?", "answer": "in the old city", "subject": "the author"}]
GATE = [{"question": "what did the cat see ?", "answer": "the cat saw the city"}]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_demo(model_dir: Path, tmp_path: Path, *extra: str) -> tuple[int, Path, Path]:
    """`timerome demo` on FORGET / RETAIN with the smallest settings -> (exit code, out dir, retain file)."""
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    retain = write_jsonl(tmp_path / "retain.jsonl", RETAIN)
    other = write_jsonl(tmp_path / "other.jsonl", OTHER)
    gate = write_jsonl(tmp_path / "gate.jsonl", GATE)
    out = tmp_path / "demo"
    code = cli.main(["demo", "--model", str(model_dir), "--trace-facts", str(forget), "--forget", str(forget),
                     "--other", str(other), "--retain", str(retain), "--gate-facts", str(gate), "--steps", "2",
                     "--noise-samples", "2", "--mc-samples", "2", "--sampler-steps", "1", "--show", "1",
                     "--out", str(out), *[a.replace("RETAIN", str(retain)) for a in extra]])
    return code, out, retain


def test_demo_traces_edits_scores_and_writes(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    code, out, _ = run_demo(tiny_model_dir_with_tokenizer, tmp_path)
    printed = capsys.readouterr().out
    assert code == 0
    summary = json.loads((out / "demo.json").read_text())
    # random fixture weights: where the corruption does not lower the answers, no "finding" is claimed
    claim = "the facts live at layer" if summary["total_effect_at_step"] > 1e-3 else "is not a finding"
    assert claim in printed and "forget drop" in printed and "no edit:" in printed and "recommended:" in printed
    assert bool(summary["warnings"]) == (summary["total_effect_at_step"] <= 1e-3)
    assert set(summary["lp"]) == {"no edit", "recommended", "paper"} and summary["facts_in_memory"] == 2
    assert set(summary["lp"]["paper"]) == {"forget", "other", "retain"}
    assert "recommended: forget drop" in printed and "paper: forget drop" in printed and "other author" in printed
    # the recommended memory: every step, every subject token, the sampler, a gate; the paper's: one key per fact
    record, paper = mem.load(out / "memory"), mem.load(out / "paper_memory")
    assert record.coordinate.as_dict() == summary["coordinate"] == paper.coordinate.as_dict()
    assert record.key_positions == "subject" and record.capture_steps == (0, 1) and record.memory.gate is not None
    assert record.memory.size > 4 and float(record.memory.alpha) == mem.MemorySpec.selective().alpha
    assert paper.memory.size == 2 and paper.memory.gate is None and float(paper.memory.alpha) == 1.0
    assert (out / "trace" / "summary.json").is_file()


def test_demo_bad_selection_is_one_error(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    code = cli.main(["demo", "--model", str(tiny_model_dir_with_tokenizer), "--trace-facts", "nosuchsplit[:2]",
                     "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2 and "nosuchsplit" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d").exists()


def test_demo_flags_shape_the_recommended_memory(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    code, out, _ = run_demo(tiny_model_dir_with_tokenizer, tmp_path, "--gate-rate", "0.2", "--capture-steps", "1",
                            "--key-positions", "last", "--alpha", "4")
    printed = capsys.readouterr().out
    assert code == 0 and "built the recommended memory of 2 facts" in printed and "(α=4" in printed and "gated at cosine" in printed
    record = mem.load(out / "memory")
    assert record.memory.gate is not None and record.capture_steps == (1,) and record.key_positions == "last"
    assert float(record.memory.alpha) == 4.0     # explicit flags win over the preset
    assert record.sampler_capture == mem.SamplerCapture.evenly(1, gen_length=96, steps=48, block_length=32)
    code = cli.main(["demo", "--model", str(tiny_model_dir_with_tokenizer), "--steps", "2", "--capture-steps", "0,2",
                     "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert code == 2 and "capture steps must be distinct steps in 0..1" in err and not (tmp_path / "y").exists()
    code = cli.main(["demo", "--model", str(tiny_model_dir_with_tokenizer), "--gate-rate", "0", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--gate-rate must be a fraction in (0, 1)" in err and not (tmp_path / "x").exists()


def test_demo_refuses_sets_that_share_a_fact(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    code = cli.main(["demo", "--model", str(tiny_model_dir_with_tokenizer), "--forget", "forget01_subjects[:3]",
                     "--other", "forget01_subjects[2:5]", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2 and "the forget and other sets share 1 fact(s)" in err and not (tmp_path / "d").exists()
