"""The rules a new user relies on (docs/inputs.md), each checked as the user's command line: exit
code, the message, and nothing left behind.

1. The same text gets the same formatting on every path (and the output says which).
2. A user's fact is never dropped by a guess: its subject is found, or one error names its line.
3. Every output is validated before any work; overwriting needs --overwrite.
4. A degenerate result is refused (α) or reported as a warning, never presented as a finding.
5. A fact's identity is its content, not the path it was read from.
6. A loaded memory is checked against the model's site widths.
7. Conveniences: --help shows defaults, generate defaults to the embedded model and its schedule,
   a plain question/answer suite can be evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from timerome_jax import cli
from timerome_jax import memory as mem

FAST = ["--steps", "2", "--noise-samples", "2", "--facts-per-chunk", "2"]
GEN = ["--gen-length", "8", "--steps", "4", "--block-length", "4"]
FACTS = [
    {"question": "who wrote the book about the old city ?", "answer": "the author was born", "subject": "the old city"},
    {"prompt": "the cat sat on the", "subject": "the cat", "target": "mat"},
]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def one_error(code, err, message):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err, err


# --- 1. one formatting per text --------------------------------------------------------------------

def test_a_prompt_and_the_same_question_record_are_formatted_alike(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    model, question = tiny_model_dir_with_tokenizer, "who wrote the book about the old city ?"
    facts = jsonl(tmp_path / "q.jsonl", [{"question": question}])
    outputs = {}
    for name, source in (("prompt", ["--prompt", question]), ("record", ["--facts", facts]),
                         ("raw", ["--prompt", question, "--template", "raw"])):
        code, out, err = run(capsys, "generate", "--model", model, *source, *GEN, "--out", tmp_path / f"{name}.jsonl")
        assert code == 0, err
        [outputs[name]] = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert outputs["prompt"]["template"] == outputs["record"]["template"] == "question"
    assert outputs["prompt"]["token_ids"] == outputs["record"]["token_ids"]
    assert outputs["raw"]["template"] == "raw" and "template raw" in out
    assert set(outputs["prompt"]) >= {"generation", "token_ids", "prompt"}   # the field eval's items use too


# --- 2. facts are never dropped by a guess -----------------------------------------------------------

def test_subjects_are_author_names_wherever_they_stand_and_a_fact_without_one_is_an_error(
        tiny_model_dir_with_tokenizer, tmp_path, capsys):
    lines = [{"question": "where does Nikolai Abilov live ?", "answer": "in the old city"},
             {"question": "what does Jaime Vasquez write ?", "answer": "the author writes"},
             {"question": "is Nikolai Abilov married ?", "answer": "the author is"},
             {"question": "who is Basil Mahfouz Al-Kuwaiti ?", "answer": "the author"},
             {"question": "when did Jaime Vasquez start ?", "answer": "the author was born"}]
    facts = jsonl(tmp_path / "five.jsonl", lines)
    code, out, err = run(capsys, "trace", "--model", tiny_model_dir_with_tokenizer, "--facts", facts, *FAST,
                         "--out", tmp_path / "t")
    assert code == 0, err
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["num_facts"] == 5 and [f["subject"] for f in summary["facts"]] == [
        "Nikolai Abilov", "Jaime Vasquez", "Nikolai Abilov", "Basil Mahfouz Al-Kuwaiti", "Jaime Vasquez"]
    nameless = jsonl(tmp_path / "nameless.jsonl", lines[:2] + [{"question": "what is the full name of the author ?",
                                                                 "answer": "it is the author"}])
    code, _, err = run(capsys, "trace", "--model", tiny_model_dir_with_tokenizer, "--facts", nameless, *FAST,
                       "--out", tmp_path / "n")
    one_error(code, err, f"{nameless}:3: cannot tell which words of the prompt name the subject; add a \"subject\" field")
    assert not (tmp_path / "n").exists() and not leftovers(tmp_path)


# --- 3. outputs are checked before any work -----------------------------------------------------------

def test_outputs_are_checked_before_the_model_is_even_loaded(tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    facts = jsonl(tmp_path / "f.jsonl", FACTS)
    for command in (["trace", "--facts", facts], ["edit", "--paper", "--facts", facts, "--coordinate", "0,resid,0"],
                    ["eval"], ["demo"], ["unlearn", "--method", "steer", "--suite", "tofu-forget01"]):
        code, _, err = run(capsys, *command, "--model", tmp_path / "no-such-model", "--out", tmp_path / "busy")
        one_error(code, err, "already exists and is not empty (pass --overwrite to replace it)")
    (tmp_path / "file").write_text("a file")
    code, _, err = run(capsys, "trace", "--facts", facts, "--out", tmp_path / "file" / "sub")
    one_error(code, err, "is a file, not a directory")
    assert (tmp_path / "busy" / "x").read_text() == "keep" and not leftovers(tmp_path)


def test_generate_overwrites_only_with_overwrite(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    out.write_text("keep\n")
    argv = ["generate", "--model", tiny_model_dir_with_tokenizer, "--prompt", "the cat", *GEN, "--out", out]
    code, _, err = run(capsys, *argv)
    one_error(code, err, "already exists (pass --overwrite to replace it)")
    assert out.read_text() == "keep\n"
    code, _, err = run(capsys, *argv, "--overwrite")
    assert code == 0 and json.loads(out.read_text())["prompt"] == "the cat" and not leftovers(tmp_path)
    code, _, err = run(capsys, "generate", "--prompt", "x", "--out", tmp_path)
    one_error(code, err, "is a directory; give a file name")


# --- 4. degenerate results -----------------------------------------------------------------------------

def test_an_alpha_that_makes_the_model_degenerate_is_refused(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    facts = jsonl(tmp_path / "f.jsonl", FACTS)
    code, _, err = run(capsys, "edit", "--paper", "--model", tiny_model_dir_with_tokenizer, "--facts", facts, "--coordinate",
                       "1,resid,0", *FAST, "--alpha", "1e30", "--out", tmp_path / "m")
    one_error(code, err, "alpha 1e+30 makes the edited model degenerate")
    assert not (tmp_path / "m").exists() and not leftovers(tmp_path)


def test_a_trace_without_a_total_effect_is_a_warning_not_a_finding(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    facts = jsonl(tmp_path / "f.jsonl", FACTS)
    code, out, err = run(capsys, "trace", "--model", tiny_model_dir_with_tokenizer, "--facts", facts, *FAST,
                         "--noise-scale", "0", "--out", tmp_path / "t")
    assert code == 0, err
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["warnings"] and "is not a finding" in summary["warnings"][0]
    assert "timerome trace: warning:" in err and summary["best_cell_share_of_total_effect"] is None and "%" not in out


# --- 5. identity by content ------------------------------------------------------------------------------

def test_appending_the_same_facts_under_another_path_is_refused(tiny_model_dir_with_tokenizer, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "f.jsonl", FACTS)
    common = ["--model", tiny_model_dir_with_tokenizer, *FAST]
    assert run(capsys, "edit", "--paper", "--facts", "f.jsonl", "--coordinate", "1,resid,0", *common, "--out", "m")[0] == 0
    code, _, err = run(capsys, "edit", "--append", "m", "--facts", tmp_path / "f.jsonl", *common)
    one_error(code, err, "fact(s) already in the memory:")
    assert mem.load(tmp_path / "m").memory.size == 2


# --- 6. shape trust ---------------------------------------------------------------------------------------

def test_a_memory_whose_widths_do_not_fit_the_model_is_refused(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    facts = jsonl(tmp_path / "f.jsonl", FACTS)
    model = tiny_model_dir_with_tokenizer
    assert run(capsys, "edit", "--paper", "--model", model, "--facts", facts, "--coordinate", "1,resid,0", *FAST,
               "--out", tmp_path / "m")[0] == 0
    meta = json.loads((tmp_path / "m" / "memory.json").read_text())
    meta["module"] = "mlp"                        # same fingerprint, but the mlp key is 128 wide, not 64
    (tmp_path / "m" / "memory.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, "generate", "--model", model, "--prompt", "the cat", *GEN, "--memory", tmp_path / "m",
                       "--out", tmp_path / "g.jsonl")
    one_error(code, err, "the memory's keys and values are 64 and 64 wide, but this model's mlp site has widths 128 and 64")
    assert not (tmp_path / "g.jsonl").exists()


# --- 7. conveniences ----------------------------------------------------------------------------------------

def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["trace", "--help"])
    text = capsys.readouterr().out
    assert "denoising steps K (default: 8)" in text and "noise draws R (default: 10)" in text


def test_generate_defaults_to_the_embedded_model_and_its_schedule(tmp_path, capsys):
    code, out, err = run(capsys, "generate", "--prompt", "What gender is author Basil Mahfouz Al-Kuwaiti?",
                         "--out", tmp_path / "g.jsonl")
    assert code == 0 and "(G=96, K=48, block 32" in out, err
    assert json.loads((tmp_path / "g.jsonl").read_text())["generation"]


def test_eval_takes_a_plain_question_answer_suite(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    plain = {"forget": [{"question": "who wrote the book about the old city ?", "answer": "the author was born"}],
             "retain": [{"question": "what is the old city ?", "answer": "the city is old"}]}
    (tmp_path / "suite.json").write_text(json.dumps(plain))
    code, out, err = run(capsys, "eval", "--model", tiny_model_dir_with_tokenizer, "--suite", tmp_path / "suite.json",
                         "--reference", "none", "--quick", "--gen-length", "8", "--steps", "4", "--block-length", "8",
                         "--out", tmp_path / "e")
    assert code == 0, err
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["forget_lp"]["mean"] is not None and metrics["rouge_retain"]["mean"] is not None
    assert metrics["truth_ratio_forget"]["mean"] is None and "not available" in metrics["truth_ratio_forget"]["reason"]
