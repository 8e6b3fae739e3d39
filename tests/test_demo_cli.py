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


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_demo(model_dir: Path, tmp_path: Path, *extra: str) -> tuple[int, Path, Path]:
    """`timerome demo` on FORGET / RETAIN with the smallest settings -> (exit code, out dir, retain file)."""
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    retain = write_jsonl(tmp_path / "retain.jsonl", RETAIN)
    out = tmp_path / "demo"
    code = cli.main(["demo", "--model", str(model_dir), "--trace-facts", str(forget), "--forget", str(forget),
                     "--retain", str(retain), "--steps", "2", "--noise-samples", "2", "--mc-samples", "2",
                     "--show", "1", "--out", str(out), *[a.replace("RETAIN", str(retain)) for a in extra]])
    return code, out, retain


def test_demo_traces_edits_scores_and_writes(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    code, out, _ = run_demo(tiny_model_dir_with_tokenizer, tmp_path)
    printed = capsys.readouterr().out
    assert code == 0
    summary = json.loads((out / "demo.json").read_text())
    # random fixture weights: where the corruption does not lower the answers, no "finding" is claimed
    claim = "the facts live at layer" if summary["total_effect_at_step"] > 1e-3 else "is not a finding"
    assert claim in printed and "forget drop" in printed and "before:" in printed
    assert bool(summary["warnings"]) == (summary["total_effect_at_step"] <= 1e-3)
    assert set(summary["forget_lp"]) == {"no edit", "TimeROME"} and summary["facts_in_memory"] == 2
    record = mem.load(out / "memory")
    assert record.coordinate.as_dict() == summary["coordinate"] and record.memory.size == 2
    assert (out / "trace" / "summary.json").is_file()


def test_demo_bad_selection_is_one_error(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    code = cli.main(["demo", "--model", str(tiny_model_dir_with_tokenizer), "--trace-facts", "nosuchsplit[:2]",
                     "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2 and "nosuchsplit" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d").exists()


def test_demo_gated_memory_is_saved_with_its_gate(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    code, out, _ = run_demo(tiny_model_dir_with_tokenizer, tmp_path, "--gate-rate", "0.2", "--gate-facts", "RETAIN",
                            "--capture-steps", "all")
    printed = capsys.readouterr().out
    assert code == 0 and "gated at cosine" in printed and "keys of the last tokens at steps 0,1 of the trace: 4 entries" in printed
    record = mem.load(out / "memory")
    assert record.memory.gate is not None and record.capture_steps == (0, 1) and record.memory.size == 4
    code = cli.main(["demo", "--model", str(tiny_model_dir_with_tokenizer), "--steps", "2", "--capture-steps", "0,2",
                     "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert code == 2 and "capture steps must be distinct steps in 0..1" in err and not (tmp_path / "y").exists()
    code = cli.main(["demo", "--model", str(tiny_model_dir_with_tokenizer), "--gate-rate", "0", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--gate-rate must be a fraction in (0, 1)" in err and not (tmp_path / "x").exists()


def test_demo_selective_preset_builds_the_selective_memory(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    code, out, _ = run_demo(tiny_model_dir_with_tokenizer, tmp_path, "--selective", "--gate-facts", "RETAIN",
                            "--alpha", "4")
    printed = capsys.readouterr().out
    assert code == 0 and "built the selective memory of 2 facts (α=4" in printed and "gated at cosine" in printed
    record = mem.load(out / "memory")
    assert record.key_positions == "subject" and record.capture_steps == (0, 1) and record.memory.gate is not None
    assert float(record.memory.alpha) == 4.0 and record.memory.size > 4     # explicit --alpha wins over the preset
    # and the preset's entries along the greedy sampler of the demo's generation schedule
    assert record.sampler_capture == mem.SamplerCapture.evenly(8, gen_length=96, steps=48, block_length=32)
    assert "and at 8 steps of the greedy sampler's own trajectory" in printed
    code = cli.main(["demo", "--model", str(tiny_model_dir_with_tokenizer), "--sampler-steps", "0",
                     "--out", str(tmp_path / "z")])
    err = capsys.readouterr().err
    assert code == 2 and "number of sampler steps to capture must lie in 1..48" in err and not (tmp_path / "z").exists()
