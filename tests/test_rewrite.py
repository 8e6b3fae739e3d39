"""Rewrite edits (timerome_jax.rewrite, DESIGN.md §3b): records, values, the shared memory, metrics."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import ports
from timerome_jax import api, rewrite, tokenization
from timerome_jax import memory as mem
from timerome_jax.errors import InputError
from timerome_jax.facts import Fact
from timerome_jax.memory import MemorySpec, RewriteValues

# cases on the fixture vocabulary (tests/conftest.py); the unedited greedy answers are other words
RECORDS = [
    dict(prompt="the author was born in a small town near the", subject="the author", target_new="moon",
         ground_truth="sea", rephrase_prompt="her first novel : the author was born near the",
         locality_prompt="the cat sat on the", locality_ground_truth="mat"),
    dict(prompt="the river runs through the valley to the", subject="the river", target_new="city",
         ground_truth="north", locality_prompt=["the cat sat on the", "he works as a"],
         locality_ground_truth=["mat", "doctor"]),
]
CORE = RewriteValues(steps=25)
WHERE = api.Coordinate(layer=0, module="mlp", step=0, steps=8)
# one ungated entry per case at its last subject token (ROME's position): the memory tests below
# follow each value through the algebra; the preset (every subject token, gated) is tested apart
LAST = dict(key_positions="last", gate_rate=None)


@pytest.fixture(scope="module")
def model(tiny_model_dir_with_tokenizer):
    backbone = ports.load_pretrained(tiny_model_dir_with_tokenizer)
    return backbone, api.tokenizer(backbone)


@pytest.fixture(scope="module")
def cases():
    return [rewrite.parse_case(r, f"case{i}") for i, r in enumerate(RECORDS)]


def _greedy(backbone, tokenizer, cases):
    return api.generate(backbone, tokenizer, [c.fact() for c in cases], gen_length=1, steps=1, block_length=1)


# --- records ---------------------------------------------------------------------------------------

def test_cases_read_as_easyedit_writes_them(tmp_path, cases):
    array = tmp_path / "cases.json"
    array.write_text(json.dumps(RECORDS))
    lines = tmp_path / "cases.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    for path in (array, lines):
        read = rewrite.read_cases(path)
        assert [(c.prompt, c.subject, c.target_new, c.ground_truth) for c in read] == \
            [(c.prompt, c.subject, c.target_new, c.ground_truth) for c in cases]
    assert cases[0].rephrase_prompts == (RECORDS[0]["rephrase_prompt"],)
    assert cases[1].locality == (("the cat sat on the", "mat"), ("he works as a", "doctor"))
    assert rewrite.read_cases(array)[1].where == f"{array}[1]" and rewrite.read_cases(lines)[1].where == f"{lines}:2"
    # ROME's templated prompts; the packaged CounterFact cases
    assert rewrite.parse_case({**RECORDS[0], "prompt": "{} was born near the"}, "x").prompt == "the author was born near the"
    shipped = rewrite.load_cases("counterfact[:3]")
    assert shipped[0].subject == "Danielle Darrieux" and shipped[0].target_new == "English"
    assert shipped[0].ground_truth == "French" and shipped[0].locality[0][1] == "French"
    # the same edit has the same id wherever it is read; the fact is the new object's
    assert cases[0].id == rewrite.read_cases(array)[0].id == cases[0].fact().id
    assert cases[0].fact().texts() == (RECORDS[0]["prompt"], " moon")


@pytest.mark.parametrize("change, message", [
    (dict(subject="the sea"), "does not occur in the prompt"),
    (dict(target_new=" "), "'target_new' is empty"),
    (dict(target_new="sea"), "target_new equals ground_truth"),
    (dict(subject=None), "missing field 'subject'"),
    (dict(target_new=3), "must be a string"),
    (dict(locality_ground_truth=None), "locality prompt"),
    (dict(rephrase_prompt=[""]), "'rephrase_prompt' must be a non-empty string"),
])
def test_each_bad_record_gives_its_error(change, message):
    record = {k: v for k, v in {**RECORDS[0], **change}.items() if v is not None}
    with pytest.raises(InputError, match=message):
        rewrite.parse_case(record, "cases.json[0]")


def test_bad_files_and_duplicates(tmp_path, cases):
    with pytest.raises(InputError, match="does not exist"):
        rewrite.read_cases(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(InputError, match="malformed JSON"):
        rewrite.read_cases(bad)
    bad.write_text("[]")
    with pytest.raises(InputError, match="holds no cases"):
        rewrite.read_cases(bad)
    with pytest.raises(InputError, match="the same rewrite as case0"):
        rewrite.check_distinct([cases[0], cases[1], cases[0]])
    for bad_values in (dict(method="ft"), dict(steps=0), dict(learning_rate=-1.0), dict(kl_weight=float("nan"))):
        with pytest.raises(InputError):
            RewriteValues(**bad_values)
    with pytest.raises(InputError, match="capture steps and sampler steps do not apply"):
        MemorySpec.rewriting(capture_steps="all")


# --- values and the memory -----------------------------------------------------------------------

def test_a_rewrite_memory_makes_the_target_the_greedy_answer(model, cases):
    backbone, tok = model
    assert _greedy(backbone, tok, cases) != ["moon", "city"]          # not the answers before
    facts = api.encode(backbone, tok, [c.fact() for c in cases])
    record = api.build_memory(backbone, tok, facts, WHERE, MemorySpec.rewriting(rewrite=CORE, **LAST))
    edited = backbone.with_edits(record.memory)
    assert _greedy(edited, tok, cases) == ["moon", "city"]
    assert record.rewrite == CORE and record.fact_ids == facts.ids and record.capture_steps == (0,)
    # the weights are untouched: without the memory the logits are the original ones, bit for bit
    ids = jnp.asarray(facts.batch.input_ids_FT)
    np.testing.assert_array_equal(np.asarray(edited.without_edits().apply(ids)), np.asarray(backbone.apply(ids)))


def test_removing_a_rewrite_restores_the_memory_without_it(model, cases, tmp_path):
    backbone, tok = model
    facts = api.encode(backbone, tok, [c.fact() for c in cases])
    spec = MemorySpec.rewriting(rewrite=CORE, **LAST)
    both = api.build_memory(backbone, tok, facts, WHERE, spec)
    # a removal equals a build of the rest with the same λ̃ (the ridge of the memory it came from)
    keys, values, _, _ = rewrite.capture(backbone, tok, facts, 0, "mlp", CORE)
    first, _ = mem.build(keys[:1], values[:1], layer=0, module="mlp", alpha=1.0, lam=spec.lam, key_scale=both.key_scale)
    removed = both.remove_facts([facts.ids[1]])
    ids = jnp.asarray(facts.batch.input_ids_FT)
    np.testing.assert_allclose(np.asarray(backbone.with_edits(removed.memory).apply(ids)),
                               np.asarray(backbone.with_edits(first).apply(ids)), atol=1e-5)
    assert _greedy(backbone.with_edits(removed.memory), tok, cases)[1] != "city"
    # appending the second rewrite again gives the two-case memory back; the record keeps its values
    api.save_memory(removed, tmp_path / "mem")
    loaded = api.load_memory(tmp_path / "mem", backbone)
    assert loaded.rewrite == CORE
    again = api.extend_memory(backbone, loaded, facts.take([1]), tokenizer=tok)
    np.testing.assert_allclose(np.asarray(backbone.with_edits(again.memory).apply(ids)),
                               np.asarray(backbone.with_edits(both.memory).apply(ids)), atol=1e-4)
    with pytest.raises(InputError, match="needs the model's tokenizer"):
        api.extend_memory(backbone, loaded, facts.take([1]))


def test_the_optimised_value_does_not_depend_on_its_batch(model, cases):
    backbone, tok = model
    extra = rewrite.parse_case(dict(prompt="which language does the author speak at", subject="the author",
                                    target_new="night"), "extra")
    facts = api.encode(backbone, tok, [c.fact() for c in (extra, *cases)])
    for positions in ("last", "subject"):
        keys, values, rows, _ = rewrite.capture(backbone, tok, facts, 0, "mlp", CORE, positions=positions,
                                                cases_per_chunk=3)
        alone_keys, alone_values, alone_rows, _ = rewrite.capture(backbone, tok, facts.take([2]), 0, "mlp", CORE,
                                                                  positions=positions)
        assert np.array_equal(alone_rows, np.zeros(len(alone_rows), int)) and np.sum(rows == 2) == len(alone_rows)
        np.testing.assert_allclose(alone_keys, keys[rows == 2], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(alone_values, values[rows == 2], rtol=1e-4, atol=1e-4)


def test_optimised_values_raise_the_target_and_in_context_values_follow_the_definition(model, cases):
    backbone, tok = model
    facts = api.encode(backbone, tok, [c.fact() for c in cases])
    _, _, _, info = rewrite.capture(backbone, tok, facts, 0, "mlp", RewriteValues(steps=1))
    _, _, _, trained = rewrite.capture(backbone, tok, facts, 0, "mlp", CORE)
    assert all(b < a for a, b in zip(info["target_nll_per_token"], trained["target_nll_per_token"]))

    keys, values, rows, _ = rewrite.capture(backbone, tok, facts, 1, "mlp", RewriteValues(method="in_context"))
    assert rows.tolist() == [0, 1]
    # reference from the definition: value at the query's last subject token of "{prompt} {o*}. {prompt}"
    # minus value at the last subject token of the prompt, answer region masked, unpadded forwards
    for i, case in enumerate(cases):
        answer = tok(" " + case.target_new, add_special_tokens=False)["input_ids"]
        masks = [backbone.mask_token_id] * len(answer)
        plain = tok(case.prompt, add_special_tokens=False)["input_ids"]
        context = tok(f"{case.prompt} {case.target_new}. {case.prompt}", add_special_tokens=False)["input_ids"]
        subject_len = len(tok(case.subject, add_special_tokens=False)["input_ids"])   # the prompts open with it
        site = ports.Site(1, "mlp")
        _, (p,) = backbone.apply(jnp.asarray([plain + masks]), capture=(site,))
        _, (c,) = backbone.apply(jnp.asarray([context + masks]), capture=(site,))
        query_last = len(context) - len(plain) + subject_len - 1
        np.testing.assert_allclose(keys[i], np.asarray(p.key[0, subject_len - 1]), atol=1e-5)
        np.testing.assert_allclose(values[i], np.asarray(c.value[0, query_last] - p.value[0, subject_len - 1]),
                                   atol=1e-5)


def test_subject_token_values_follow_the_definition_and_the_gated_preset_edits_only_its_subjects(model, cases):
    backbone, tok = model
    facts = api.encode(backbone, tok, [c.fact() for c in cases])
    keys, values, rows, _ = rewrite.capture(backbone, tok, facts, 1, "mlp", RewriteValues(method="in_context"),
                                            positions="subject")
    # reference from the definition, token by token over the subject (both prompts open with it)
    site = ports.Site(1, "mlp")
    for i, case in enumerate(cases):
        answer = tok(" " + case.target_new, add_special_tokens=False)["input_ids"]
        masks = [backbone.mask_token_id] * len(answer)
        plain = tok(case.prompt, add_special_tokens=False)["input_ids"]
        context = tok(f"{case.prompt} {case.target_new}. {case.prompt}", add_special_tokens=False)["input_ids"]
        subject_len = len(tok(case.subject, add_special_tokens=False)["input_ids"])
        _, (p,) = backbone.apply(jnp.asarray([plain + masks]), capture=(site,))
        _, (c,) = backbone.apply(jnp.asarray([context + masks]), capture=(site,))
        query = len(context) - len(plain)
        assert subject_len == 2 and np.sum(rows == i) == subject_len      # one entry per subject token, in order
        np.testing.assert_allclose(keys[rows == i], np.asarray(p.key[0, :subject_len]), atol=1e-5)
        np.testing.assert_allclose(values[rows == i], np.asarray(c.value[0, query:query + subject_len]
                                                                  - p.value[0, :subject_len]), atol=1e-5)

    # the preset: optimised values at every subject token, gated on other text
    gate_facts = [Fact(prompt=p, answer=a, subject=p.split()[1], kind="prompt") for p, a in (
        ("the cat sat on the", "mat"), ("he works as a", "doctor"), ("she lives in the", "city"),
        ("my friend wrote a", "book"))]
    spec = MemorySpec.rewriting(rewrite=CORE)
    assert (spec.key_positions, spec.gate_rate, RewriteValues().steps) == ("subject", 0.001, 100)
    record = api.build_memory(backbone, tok, facts, WHERE, spec, gate_facts=gate_facts)
    assert record.memory.size == 4 and record.fact_ids == tuple(np.repeat(facts.ids, 2))
    edited = backbone.with_edits(record.memory)
    assert _greedy(edited, tok, cases) == ["moon", "city"]
    # a prompt without the edited subjects passes the gate unchanged, bit for bit
    ids = jnp.asarray([tok("the cat sat on the", add_special_tokens=False)["input_ids"] + [backbone.mask_token_id]])
    np.testing.assert_array_equal(np.asarray(edited.apply(ids)), np.asarray(backbone.apply(ids)))


# --- metrics ---------------------------------------------------------------------------------------

def test_metrics_by_hand_and_their_direction(model, cases):
    backbone, tok = model
    pad = tokenization.pad_token_id(tok, backbone)
    pre = rewrite.case_metrics(backbone, backbone, tok, cases, pad_id=pad, mc_samples=4)
    # by hand: one forward with the object masked; accuracy = top proposal == target token
    for row, case in zip(pre, cases):
        prompt = tok(case.prompt, add_special_tokens=False)["input_ids"]
        target = tok(" " + case.target_new, add_special_tokens=False)["input_ids"]
        logits = np.array(backbone.apply(jnp.asarray([prompt + [backbone.mask_token_id] * len(target)])))[0]
        logits[:, backbone.mask_token_id] = -np.inf
        assert row["rewrite_acc"] == float(np.mean(logits[len(prompt):].argmax(-1) == target)) == 0.0
        assert row["locality"] == 1.0                    # the unedited model agrees with itself
    assert pre[1]["rephrase_acc"] is None and pre[1]["paraphrase_score"] is None   # no rephrase given
    metrics, edited, record = api.edit(backbone, tok, [c.prompt for c in cases], [c.target_new for c in cases],
                                       [c.subject for c in cases], ground_truth=[c.ground_truth for c in cases],
                                       rephrase_prompts=[RECORDS[0]["rephrase_prompt"], []],
                                       locality_prompts=[RECORDS[0]["locality_prompt"], RECORDS[1]["locality_prompt"]],
                                       locality_ground_truth=[RECORDS[0]["locality_ground_truth"],
                                                              RECORDS[1]["locality_ground_truth"]],
                                       coordinate=WHERE, spec=MemorySpec.rewriting(rewrite=CORE, **LAST), mc_samples=4)
    assert [r["rewrite_acc"] for r in metrics["post"]] == [1.0, 1.0]
    assert metrics["summary"]["post"]["rewrite_acc"]["mean"] == 1.0 and metrics["summary"]["pre"]["rewrite_acc"]["mean"] == 0.0
    assert all(r["efficacy_score"] == 1.0 for r in metrics["post"])
    assert set(metrics["summary"]["post"]) == set(rewrite.METRICS)
    assert metrics["summary"]["post"]["rephrase_acc"]["n"] == 1 and metrics["post"][1]["rephrase_acc"] is None
    assert edited.edits[-1] is record.memory
    with pytest.raises(InputError, match="1 target_new value"):
        api.edit(backbone, tok, [c.prompt for c in cases], ["moon"], [c.subject for c in cases], coordinate=WHERE)
    with pytest.raises(InputError, match="ground_truth is needed"):
        api.edit(backbone, tok, [cases[0].prompt], ["moon"], [cases[0].subject])


# --- command line ----------------------------------------------------------------------------------

def _cli(capsys, *argv):
    from timerome_jax import cli

    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_rewrites_evaluates_appends_and_removes(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    model = tiny_model_dir_with_tokenizer
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(RECORDS))
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps(RECORDS[0]) + "\n")
    second = tmp_path / "second.jsonl"
    second.write_text(json.dumps(RECORDS[1]) + "\n")
    memory, scores = tmp_path / "mem", tmp_path / "scores"
    code, out, _ = _cli(capsys, "edit", "--rewrite", "--model", model, "--facts", cases, "--coordinate", "0,mlp,0",
                        "--steps", "8", "--out", memory)
    assert code == 0 and "wrote a rewrite memory (optimised values) of 2 fact(s)" in out and "λ=0.0001" in out
    code, out, _ = _cli(capsys, "eval", "--suite", "counterfact", "--model", model, "--facts", cases, "--memory", memory,
                        "--seeds", "1", "--mc-samples", "4", "--out", scores)
    assert code == 0 and "rewrite_acc" in out
    result = json.loads((scores / "metrics.json").read_text())
    assert result["metrics"]["rewrite_acc"]["mean"] == 1.0 and result["unedited"]["rewrite_acc"]["mean"] == 0.0
    assert set(result["metrics"]["locality"]) == {"mean", "ci_low", "ci_high", "n"}
    assert [c["post"]["rewrite_acc"] for c in result["cases"]] == [1.0, 1.0] and len(result["cases"]) == 2
    # sequential: one case, then the other appended, equals the batch memory's answers
    seq = tmp_path / "seq"
    assert _cli(capsys, "edit", "--rewrite", "--model", model, "--facts", first, "--coordinate", "0,mlp,0",
                "--steps", "8", "--out", seq)[0] == 0
    code, out, _ = _cli(capsys, "edit", "--rewrite", "--append", seq, "--model", model, "--facts", second)
    assert code == 0 and "now holds 2" in out
    backbone = ports.load_pretrained(model)
    tok = api.tokenizer(backbone)
    record = api.load_memory(seq, backbone)
    assert _greedy(backbone.with_edits(record.memory), tok, rewrite.read_cases(cases)) == ["moon", "city"]
    code, out, _ = _cli(capsys, "edit", "--remove", seq, "--fact-ids", record.fact_ids[1])
    assert code == 0 and "1 remain" in out
    # without a coordinate the old facts are traced over the MLP sites (ROME's), not every module
    code, out, _ = _cli(capsys, "edit", "--rewrite", "--model", model, "--facts", cases, "--steps", "4",
                        "--noise-samples", "2", "--rewrite-steps", "2", "--out", tmp_path / "traced")
    assert code == 0 and "module mlp" in out.split("traced:")[1].splitlines()[0]


@pytest.mark.parametrize("extra, message", [
    (["--rewrite-steps", "3"], "apply to rewrites only: add --rewrite"),
    (["--rewrite", "--rewrite-steps", "0"], "rewrite steps must be a positive integer"),
    (["--rewrite", "--lam", "-1"], "lambda"),
])
def test_cli_rewrite_bad_flags(tiny_model_dir_with_tokenizer, tmp_path, capsys, extra, message):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(RECORDS))
    code, _, err = _cli(capsys, "edit", "--model", tiny_model_dir_with_tokenizer, "--facts", cases, "--coordinate",
                        "0,mlp,0", "--steps", "8", "--out", tmp_path / "m", *extra)
    assert code != 0 and message in err and not (tmp_path / "m").exists()


def test_cli_rewrite_bad_records_and_mismatched_memories(tiny_model_dir_with_tokenizer, tmp_path, capsys):
    model = tiny_model_dir_with_tokenizer
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**RECORDS[0], "target_new": "sea"}) + "\n")
    code, _, err = _cli(capsys, "edit", "--rewrite", "--model", model, "--facts", bad, "--coordinate", "0,mlp,0",
                        "--steps", "8", "--out", tmp_path / "m")
    assert code != 0 and f"{bad}:1: target_new equals ground_truth" in err and not (tmp_path / "m").exists()
    no_truth = tmp_path / "no_truth.jsonl"
    no_truth.write_text(json.dumps({k: v for k, v in RECORDS[0].items() if k != "ground_truth"}) + "\n")
    code, _, err = _cli(capsys, "edit", "--rewrite", "--model", model, "--facts", no_truth, "--out", tmp_path / "m")
    assert code != 0 and "no ground_truth, so the old fact cannot be traced" in err
    forget = tmp_path / "forget"
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": "the cat sat on the", "subject": "the cat", "target": "mat"}) + "\n")
    assert _cli(capsys, "edit", "--paper", "--model", model, "--facts", facts, "--coordinate", "0,mlp,0", "--steps", "8",
                "--out", forget)[0] == 0
    code, _, err = _cli(capsys, "edit", "--rewrite", "--append", forget, "--model", model, "--facts", bad.parent / "x.json")
    assert code != 0 and "does not exist" in err
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(RECORDS))
    code, _, err = _cli(capsys, "edit", "--rewrite", "--append", forget, "--model", model, "--facts", cases)
    assert code != 0 and "is a forgetting memory: drop --rewrite" in err
    code, _, err = _cli(capsys, "eval", "--suite", "tofu-forget01", "--facts", cases, "--out", tmp_path / "e")
    assert code != 0 and "--facts goes with --suite counterfact" in err


# --- baselines ------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["mlp", "attn"])
def test_memit_style_weight_edit_equals_the_linear_memory(model, module):
    from timerome_jax.baselines import weight_edit

    backbone, _ = model
    site = ports.Site(1, module)
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(3, site.key_width(backbone.config))).astype(np.float32)
    values = rng.normal(size=(3, backbone.config.d_model)).astype(np.float32)
    moment = np.cov(rng.normal(size=(200, keys.shape[1])), rowvar=False)
    ids = jnp.asarray(rng.integers(0, 370, (2, 9)), jnp.int32)
    for whitening in (None, mem.whitening_from_moment(moment)):
        memory, _ = mem.build(keys, values, layer=1, module=module, alpha=2.0, lam=0.1, whitening=whitening)
        written = weight_edit(backbone, memory)
        np.testing.assert_allclose(np.asarray(written.apply(ids)), np.asarray(backbone.with_edits(memory).apply(ids)),
                                   atol=2e-4)
        assert written.edits == () and np.array_equal(written.params["embed"]["embedding"],
                                                      backbone.params["embed"]["embedding"])
    with pytest.raises(InputError, match="without a gate and without q"):
        weight_edit(backbone, mem.with_gate(memory, 0.5))
    resid, _ = mem.build(np.ones((1, 64), np.float32), values[:1], layer=1, module="resid", alpha=1.0, lam=0.1)
    with pytest.raises(ports.ConfigError, match="weight edits need an 'mlp' or 'attn' site"):
        weight_edit(backbone, resid)


def test_ft_l_raises_the_new_object_within_its_bound(model, cases):
    from timerome_jax.baselines import fine_tune_site

    backbone, tok = model
    facts = api.encode(backbone, tok, [c.fact() for c in cases])
    tuned, losses = fine_tune_site(backbone, tok, facts, 1, "mlp", steps=10, learning_rate=1e-2, norm_bound=5e-2)
    assert losses[-1] < losses[0] and len(losses) == 11
    change = np.asarray(tuned.params["blocks"]["mlp"]["down_proj"]["kernel"] - backbone.params["blocks"]["mlp"]["down_proj"]["kernel"])
    assert np.abs(change[1]).max() <= 5e-2 + 1e-7 and np.abs(change[1]).max() > 0
    assert not change[0].any() and not change[2].any()        # only the traced layer's kernel moves
    with pytest.raises(InputError, match="norm bound must be a finite number > 0"):
        fine_tune_site(backbone, tok, facts, 1, norm_bound=0.0)


def test_in_context_editing_prefixes_the_edited_prompts(model, cases):
    from timerome_jax.baselines import in_context_prefix

    backbone, tok = model
    pad = tokenization.pad_token_id(tok, backbone)
    rows = rewrite.case_metrics(backbone, backbone, tok, cases, pad_id=pad, mc_samples=4, prefix=in_context_prefix)
    assert in_context_prefix(cases[0]) == "the author was born in a small town near the moon. "
    for row, case in zip(rows, cases):
        prompt = tok(in_context_prefix(case) + case.prompt, add_special_tokens=False)["input_ids"]
        target = tok(" " + case.target_new, add_special_tokens=False)["input_ids"]
        logits = np.array(backbone.apply(jnp.asarray([prompt + [backbone.mask_token_id] * len(target)])))[0]
        logits[:, backbone.mask_token_id] = -np.inf
        assert row["rewrite_acc"] == float(np.mean(logits[len(prompt):].argmax(-1) == target))
