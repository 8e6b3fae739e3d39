"""`timerome generate`, fact files and tokenization, on the tiny llada fixture with a word tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import ports
from conftest import EOS_ID, fixture_dir
from timerome_jax import cli, data, facts, sampler, tokenization
from timerome_jax.errors import InputError

FACT_LINES = [
    {"question": "who wrote the book about the old city ?", "answer": "the author was born"},
    {"prompt": "the cat sat on the", "subject": "the cat", "target": "mat"},
    {"question": "which language does the author speak at home ?"},
]
SCHEDULE = ["--gen-length", "8", "--steps", "4", "--block-length", "4"]


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return path


def run_cli(capsys, *argv):
    code = cli.main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- fact files

def test_read_facts_both_shapes(tmp_path):
    got = facts.read_facts(write_lines(tmp_path / "f.jsonl", FACT_LINES[:2] + [""] + FACT_LINES[2:]))
    assert [f.prompt for f in got] == [FACT_LINES[0]["question"], FACT_LINES[1]["prompt"],
                                       FACT_LINES[2]["question"]]
    assert [f.answer for f in got] == ["the author was born", "mat", None]
    assert got[1].subject == "the cat" and got[0].subject is None
    assert [f.kind for f in got] == ["question", "prompt", "question"]
    assert got[2].where.endswith("f.jsonl:4")  # blank line 3 skipped, numbering kept


@pytest.mark.parametrize("lines,message", [
    ([FACT_LINES[0], '{"question": "broken'], r"f\.jsonl:2: malformed JSON"),
    ([], r"f\.jsonl is empty"),
    (["", "   "], r"f\.jsonl is empty"),
    (['["a list"]'], r"f\.jsonl:1: expected a JSON object"),
    ([{"text": "no prompt here"}], r"f\.jsonl:1: needs a 'question'"),
    ([{"question": "   "}], r"f\.jsonl:1: field 'question' is empty"),
    ([{"prompt": "p", "target": 3}], r"f\.jsonl:1: field 'target' must be a string"),
    ([{"prompt": "p", "question": "q"}], r"f\.jsonl:1: has both"),
])
def test_bad_fact_files(tmp_path, lines, message):
    with pytest.raises(InputError, match=message):
        facts.read_facts(write_lines(tmp_path / "f.jsonl", lines))


def test_missing_fact_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        facts.read_facts(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- tokenization

def test_tokenizer_loads_offline_and_pads(tiny_model_dir_with_tokenizer):
    tok = tokenization.load_tokenizer(tiny_model_dir_with_tokenizer)
    assert tok.eos_token_id == EOS_ID and tok.mask_token_id == 380
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    prompts = tokenization.encode_texts(tok, ["the cat sat", "who"], add_special_tokens=True)
    answers = tokenization.encode_texts(tok, ["on a mat", "the"], add_special_tokens=False, what="answer")
    prompt_ids, prompt_mask = tokenization.pad_left(prompts, EOS_ID)
    answer_ids, answer_mask = tokenization.pad_right(answers, EOS_ID)
    assert prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert answer_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert tok.decode(prompt_ids[0].tolist()) == "the cat sat"
    assert tok.decode(answer_ids[0].tolist()) == "on a mat"
    assert tokenization.truncate_at_stop([5, 6, EOS_ID, 7, EOS_ID], frozenset({EOS_ID})) == [5, 6]
    with pytest.raises(InputError, match="prompt 1 is empty"):
        tokenization.encode_texts(tok, ["the cat", ""], add_special_tokens=True)


def test_missing_tokenizer_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot load a tokenizer"):
        tokenization.load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- the command

def test_generate_from_facts(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    fact_file = write_lines(tmp_path / "facts.jsonl", FACT_LINES)
    out = tmp_path / "out" / "gen.jsonl"
    code, stdout, err = run_cli(capsys, "--model", tiny_model_dir_with_tokenizer, "--facts",
                                fact_file, *SCHEDULE, "--batch-size", "2", "--out", out)
    assert code == 0, err
    assert "wrote 3 generation(s)" in stdout
    records = read_jsonl(out)
    assert [r["prompt"] for r in records] == [f.get("question", f.get("prompt")) for f in FACT_LINES]
    assert [r.get("answer") for r in records] == ["the author was born", "mat", None]
    assert "answer" not in records[2]

    # the same generations straight from the sampler, batched differently
    backbone = ports.load_pretrained(tiny_model_dir_with_tokenizer)
    tok = tokenization.load_tokenizer(tiny_model_dir_with_tokenizer)
    # TOFU questions are fed in the training prompt format; prompt/target records as given
    texts = [f.texts()[0] for f in facts.read_facts(fact_file)]
    assert texts[0] == data.format_prompt(records[0]["prompt"]) and texts[1] == records[1]["prompt"]
    prompts = tokenization.encode_texts(tok, texts, add_special_tokens=False)
    full = sampler.sample_many(backbone, prompts, jax.random.key(0), pad_id=EOS_ID, batch_size=3,
                               gen_length=8, steps=4, block_length=4)
    for record, generated in zip(records, full):
        ids = record["token_ids"]
        assert EOS_ID not in ids
        stop = [i for i, t in enumerate(generated) if t == EOS_ID]
        assert ids == generated[: stop[0] if stop else len(generated)].tolist()
        assert record["generation"] == tok.decode(ids, skip_special_tokens=True).strip()
    assert [r["template"] for r in records] == ["question", "raw", "question"]


def test_generate_one_prompt_is_reproducible(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / f"{name}.jsonl"
        code, _, err = run_cli(capsys, "--model", tiny_model_dir_with_tokenizer, "--prompt",
                               "the cat sat on the", *SCHEDULE, "--temperature", "1.0",
                               "--seed", seed, "--out", out)
        assert code == 0, err
        outs.append(read_jsonl(out))
    assert len(outs[0]) == 1 and outs[0][0]["prompt"] == "the cat sat on the"
    assert outs[0] == outs[1]
    assert outs[0][0]["token_ids"] != outs[2][0]["token_ids"]


def bad_invocations(model_dir: Path, tmp_path: Path):
    long_prompt = " ".join(["the"] * 250)
    broken = write_lines(tmp_path / "broken.jsonl", [FACT_LINES[0], "{not json"])
    empty = write_lines(tmp_path / "empty.jsonl", [])
    base = ["--model", model_dir, "--out", tmp_path / "x.jsonl"]
    return [
        (["--prompt", "the cat", "--gen-length", "10", "--block-length", "4"],
         "gen length 10 is not divisible by block length 4"),
        (["--prompt", "the cat", "--gen-length", "8", "--block-length", "4", "--steps", "3"],
         "steps 3 is not divisible by the number of blocks 2"),
        (["--prompt", "", *SCHEDULE], "the prompt is empty"),
        (["--prompt", long_prompt, *SCHEDULE, "--template", "raw"],
         "--prompt: prompt of 250 tokens + gen length 8 exceeds the model's maximum length 256"),
        (["--prompt", "the cat", *SCHEDULE, "--remasking", "lowest"], "unknown remasking 'lowest'"),
        (["--prompt", "the cat", *SCHEDULE, "--temperature", "-1"], "temperature must be"),
        (["--facts", broken, *SCHEDULE], "broken.jsonl:2: malformed JSON"),
        (["--facts", empty, *SCHEDULE], "empty.jsonl is empty"),
    ], base


def test_bad_inputs_exit_2_with_one_line(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    cases, base = bad_invocations(tiny_model_dir_with_tokenizer, tmp_path)
    for argv, message in cases:
        code, stdout, err = run_cli(capsys, *base, *argv)
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("timerome generate: error: "), err
        assert message in lines[0], (message, lines[0])
    assert not (tmp_path / "x.jsonl").exists()


def test_model_without_tokenizer(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--model", fixture_dir("llada"), "--prompt", "the cat",
                           *SCHEDULE, "--out", tmp_path / "x.jsonl")
    assert code == 2 and "no tokenizer files" in err and len(err.strip().splitlines()) == 1


def test_exit_status_of_the_real_process(tiny_model_dir_with_tokenizer, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "timerome_jax.cli", "generate", "--model",
         str(tiny_model_dir_with_tokenizer), "--prompt", "", *SCHEDULE, "--out",
         str(tmp_path / "x.jsonl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["timerome generate: error: the prompt is empty"]
