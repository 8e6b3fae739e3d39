"""The embedded-model pipeline: shipped TOFU data, prompt format, tokenizer, training script."""

import importlib.util
import itertools
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ports  # noqa: E402
from timerome_jax import data  # noqa: E402
from timerome_jax.errors import InputError  # noqa: E402

EXPERIMENTS = Path(__file__).parent.parent / "experiments"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build_tokenizer():
    return _script("build_tokenizer")


@pytest.fixture(scope="module")
def train_tiny():
    return _script("train_tiny")


@pytest.fixture(scope="module")
def tokenizer_dir(build_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    assert build_tokenizer.main(["--data", "forget01,retain90[:40]", "--vocab-size", "400",
                                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


# --- data --------------------------------------------------------------------------------------

def test_shipped_splits_load_in_file_order():
    names = data.split_names()
    for name in ("forget01", "forget01_perturbed", "forget01_subjects", "retain90", "full",
                 "real_authors_perturbed", "world_facts", "holdout01", "retain_perturbed"):
        assert name in names
    forget = data.load_split("forget01")
    full = data.load_split("full")
    assert len(forget) == 40 and len(full) == 4000 and len(data.load_split("retain90")) == 3600
    assert forget == full[-40:]  # TOFU: forget01 is the last two authors of full
    assert data.load_split("retain90")[:5] == full[:5]
    perturbed = data.load_split("forget01_perturbed")
    assert [r["question"] for r in perturbed] == [r["question"] for r in forget]
    assert len(perturbed[0]["perturbed_answer"]) == 5
    for record in data.load_split("forget01_subjects"):
        assert record["subject"] in record["question"]


def test_load_split_returns_fresh_records():
    first = data.load_split("forget01")
    first[0]["answer"] = "changed"
    assert data.load_split("forget01")[0]["answer"] != "changed"


def test_unknown_split_lists_the_known_ones():
    with pytest.raises(InputError, match="forget01.*retain90"):
        data.load_split("forget02")


def test_selection_grammar():
    rows = data.load_selection("forget01[:3], retain90[10:12],real_authors[-1:]")
    assert [(s, i) for s, i, _ in rows] == [("forget01", 0), ("forget01", 1), ("forget01", 2),
                                            ("retain90", 10), ("retain90", 11), ("real_authors", 99)]
    assert rows[3][2] == data.load_split("retain90")[10]
    for bad in ("", "forget01[:x]", "nosuchsplit", "forget01[1]", "forget01[::0]", "forget01[1:2:3:4]"):
        with pytest.raises(InputError):
            data.load_selection(bad)
    even = data.load_selection("retain_paraphrased[:160:2]")
    assert [i for _, i, _ in even] == list(range(0, 160, 2))


def test_views_choose_fields_of_their_source():
    perturbed = data.load_split("forget01_perturbed")
    para = data.load_split("forget01_paraphrased")
    assert para == [{"question": r["paraphrased_question"], "answer": r["answer"]} for r in perturbed]
    # the retain paraphrases line up with retain90 row for row (TOFU's retain_perturbed = full[:400])
    retain = data.load_split("retain90")[:160]
    assert [r["answer"] for r in data.load_split("retain_paraphrased")[:160]] == [r["answer"] for r in retain]
    cases = data.load_split("counterfact")
    assert len(cases) == 400 and cases[0]["case_id"] == 0 and cases[399]["case_id"] == 897
    prompt, rephrase, locality, rewrite = (data.load_split(f"counterfact_{v}")
                                           for v in ("prompt", "rephrase", "locality", "rewrite"))
    assert prompt[5] == {"prompt": cases[5]["prompt"], "subject": cases[5]["subject"], "target": cases[5]["ground_truth"]}
    assert rephrase[5]["prompt"] == cases[5]["rephrase_prompt"] and rephrase[5]["target"] == cases[5]["ground_truth"]
    assert locality[5] == {"prompt": cases[5]["locality_prompt"], "target": cases[5]["locality_ground_truth"]}
    assert rewrite[5]["target"] == cases[5]["target_new"] != prompt[5]["target"]
    assert all(r["subject"] in r["prompt"] for r in prompt)


def test_package_data_files_match_their_checksums():
    from importlib import resources
    import hashlib

    files = set()
    for dataset in ("tofu", "counterfact"):
        folder = resources.files("timerome_jax.data").joinpath(dataset)
        sums = folder.joinpath("SHA256SUMS").read_text().split("\n")
        listed = {line.split()[1].lstrip("./"): line.split()[0] for line in sums if line.strip()}
        for name, digest in listed.items():
            assert hashlib.sha256(folder.joinpath(name).read_bytes()).hexdigest() == digest, name
        assert folder.joinpath("PROVENANCE.md").is_file()
        files |= set(listed)
    assert files == {f"{n}.jsonl" for n in data.split_names() if n not in data.VIEWS}


# --- prompt format and tokenizer --------------------------------------------------------------

def test_prompt_format():
    assert data.format_prompt("  Who wrote it? ") == "Question: Who wrote it?\nAnswer:"


def test_tokenizer_loads_offline_with_its_special_tokens(tokenizer, tokenizer_dir):
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0
    assert tokenizer.pad_token_id == 0 and tokenizer.mask_token == "<|mdm_mask|>"
    assert tokenizer.mask_token_id == 1 and len(tokenizer) == 400
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    # ports reads the mask id from the tokenizer files without loading transformers
    assert ports.backbone._tokenizer_mask_id(tokenizer_dir) == 1


def test_prompt_and_answer_encode_as_one_string(tokenizer):
    for record in data.load_split("forget01")[:5] + data.load_split("world_facts")[:3]:
        prompt = data.encode_prompt(tokenizer, record["question"])
        answer = data.encode_answer(tokenizer, record["answer"])
        joined = tokenizer(data.format_prompt(record["question"]) + " " + record["answer"],
                           add_special_tokens=False)["input_ids"]
        assert prompt + answer == joined
        assert tokenizer.eos_token_id not in answer and tokenizer.mask_token_id not in answer
        generated = answer + [tokenizer.eos_token_id] * 3 + answer[:2]
        assert data.decode_answer(tokenizer, generated) == record["answer"]


def test_tokenizer_is_deterministic(build_tokenizer):
    texts = build_tokenizer.corpus("forget01,retain90[:20]")
    a = build_tokenizer.build_tokenizer(texts, 330)
    b = build_tokenizer.build_tokenizer(texts, 330)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


# --- rows, batches, decoding -------------------------------------------------------------------

def test_rows_and_their_limits(train_tiny, tokenizer):
    records = data.load_selection("forget01[:6]")
    rows = train_tiny.make_rows(records, tokenizer, min_eos=1, answer_window=96, max_len=512)
    for row, (_, _, record) in zip(rows, records):
        assert list(row.prompt) == data.encode_prompt(tokenizer, record["question"])
        assert data.decode_answer(tokenizer, row.answer) == record["answer"]
    with pytest.raises(InputError, match="answer-window"):
        train_tiny.make_rows(records, tokenizer, 1, answer_window=20, max_len=512)
    with pytest.raises(InputError, match="max_sequence_length"):
        train_tiny.make_rows(records, tokenizer, 1, 96, max_len=100)


def _batches(train_tiny, rows, seed):
    return train_tiny.Batches(rows, 512, seed, eos_id=0, min_eos=2, length_multiple=16)


def test_batches_are_seeded_with_random_answer_windows(train_tiny, tokenizer):
    rows = train_tiny.make_rows(data.load_selection("forget01[:6],world_facts[:10]"), tokenizer,
                                2, 160, 512)
    first, again, other = (iter(_batches(train_tiny, rows, s)) for s in (3, 3, 4))
    shapes = _batches(train_tiny, rows, 3).shapes()
    by_prompt = {r.prompt: r for r in rows}
    windows: dict[tuple, set] = {}
    differs = False
    for _ in range(60):  # several epochs
        (ids, mask), (ids2, mask2), (ids3, _) = next(first), next(again), next(other)
        np.testing.assert_array_equal(ids, ids2)
        np.testing.assert_array_equal(mask, mask2)
        differs |= ids.shape != ids3.shape or not np.array_equal(ids, ids3)
        assert ids.shape in shapes and ids.shape[1] % 16 == 0
        for row_ids, row_mask in zip(ids, mask):
            prompt_len = int(np.argmax(row_mask))
            row = by_prompt[tuple(row_ids[:prompt_len])]
            answer_end = prompt_len + len(row.answer)
            assert tuple(row_ids[prompt_len:answer_end]) == row.answer
            window = len(row_ids) - prompt_len
            assert (row_ids[answer_end:] == 0).all() and window - len(row.answer) >= 2
            assert window < 160 + 16 and row_mask[prompt_len:].all()
            windows.setdefault(row.prompt, set()).add(window)
    assert differs
    # the end-of-text padding of one QA pair varies from epoch to epoch
    assert np.mean([len(w) > 1 for w in windows.values()]) > 0.8


def test_every_row_is_used_once_per_epoch(train_tiny, tokenizer):
    rows = train_tiny.make_rows(data.load_selection("retain90[:30]"), tokenizer, 1, 160, 512)
    batches = train_tiny.Batches(rows, 10_000, 0, 0, 1, 16)  # one row per bucket slot
    epoch = batches._epoch(0)
    members = np.concatenate([m for _, m in epoch])
    # top-ups repeat rows of a bucket; every row appears at least once
    assert set(members.tolist()) == set(range(len(rows)))


def test_prompt_facts_get_their_own_answer_window(train_tiny, tokenizer):
    records = data.load_selection("world_facts[:4],counterfact_prompt[:6]")
    rows = train_tiny.make_rows(records, tokenizer, 1, 96, 512, prompt_answer_window=16)
    assert [r.window for r in rows] == [96] * 4 + [16] * 6
    batches = train_tiny.Batches(rows, 512, 0, 0, 1, 16)
    seen = 0
    for ids, mask, _ in itertools.islice(batches.iterate(), 40):
        for row_ids, row_mask in zip(ids, mask):
            prompt_len = int(np.argmax(row_mask))
            row = next(r for r in rows if r.prompt == tuple(row_ids[:prompt_len]))
            if row.window == 16:
                seen += 1
                assert len(row_ids) <= train_tiny.round_up(prompt_len + 16, 16)
    assert seen
    # the batches of an epoch depend on (seed, epoch) only: resuming mid-epoch gives the same stream
    stream = [ids for ids, _, _ in itertools.islice(batches.iterate(), 12)]
    _, _, after = next(itertools.islice(batches.iterate(), 4, None))
    for a, (b, _, _) in zip(stream[5:], batches.iterate(*after)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="--prompt-answer-window of at least"):
        train_tiny.make_rows(records, tokenizer, 1, 96, 512, prompt_answer_window=1)


def test_evaluate_decodes_prompts_in_their_own_window(train_tiny, tokenizer, monkeypatch):
    """Questions are generated with the question schedule and scored by ROUGE-L; completion prompts
    with theirs and scored by first-word match, each in the order of the records."""
    records = data.load_selection("counterfact_prompt[:2],world_facts[:1],counterfact_locality[:1]")
    calls = []

    def fake_generate(backbone, tok, prompts, **config):
        calls.append((len(prompts), config["gen_length"]))
        # the prompt facts answer their own targets; the question answers nonsense
        return [records[0][2]["target"] + " and more", "wrong", records[3][2]["target"]][:len(prompts)] \
            if config["gen_length"] == 12 else ["nothing like it"]

    monkeypatch.setattr(train_tiny, "generate_answers", fake_generate)
    monkeypatch.setattr(train_tiny.tokenization, "pad_token_id", lambda *a: 0)
    result = train_tiny.evaluate(None, tokenizer, records, dict(gen_length=96, block_length=32, steps=48),
                                 dict(gen_length=12, block_length=12, steps=12))
    assert sorted(calls) == [(1, 96), (3, 12)]
    assert result["first_words_match"] == {"counterfact_prompt": 0.5, "counterfact_locality": 1.0}
    assert result["rougeL_recall"] == {"world_facts": 0.0}
    assert [s["generated"] for s in result["samples"]][2] == "nothing like it"


def test_weighted_selection(train_tiny):
    records, repeats = train_tiny.load_weighted_selection("forget01[:2]*3,retain90[:1]")
    assert [s for s, _, _ in records] == ["forget01", "forget01", "retain90"] and repeats == [3, 3, 1]
    for bad in ("forget01*0", "forget01*x", "forget01[5:5]"):
        with pytest.raises(InputError):
            train_tiny.load_weighted_selection(bad)


def test_reveal_schedule_matches_llada():
    # train_tiny monitors with the library's sampler: its per-block schedule is LLaDA's
    from timerome_jax import sampler

    assert sampler.reveal_counts(32, 16, 32).tolist() == [2] * 16
    assert sampler.reveal_counts(10, 4, 10).tolist() == [3, 3, 2, 2]


def _reference_greedy(backbone, prompt, gen_length, block_length, steps):
    """Plain-numpy LLaDA low-confidence greedy decoding of one unpadded prompt (the mask token is
    never proposed; its confidence is the proposal's probability under the full softmax)."""
    mask_id = backbone.mask_token_id
    x = np.array(list(prompt) + [mask_id] * gen_length)[None]
    P = len(prompt)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for b in range(n_blocks):
        counts = [block_length // per_block + (i < block_length % per_block) for i in range(per_block)]
        for k in counts:
            logits = np.asarray(backbone.logits(x))[0]
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            proposal = np.where(np.arange(logits.shape[-1]) == mask_id, -np.inf, logits).argmax(-1)
            confidence = probs[np.arange(len(proposal)), proposal]
            candidates = [i for i in range(P + b * block_length, P + (b + 1) * block_length)
                          if x[0, i] == mask_id]
            chosen = sorted(candidates, key=lambda i: (-confidence[i], i))[:k]
            x[0, chosen] = proposal[chosen]
    return x[0, P:]


def test_greedy_generate_matches_a_loop_reference(train_tiny, tiny_model_dir_with_tokenizer):
    """train_tiny's monitoring generations (`evaluate.generate_answers`: `sampler.sample_many` on
    left-padded prompts, then `data.decode_answer`) equal a loop over the unpadded prompts."""
    from timerome_jax import evaluate, sampler, tokenization

    model = ports.load_pretrained(Path(__file__).parent / "fixtures" / "llada")
    tok = tokenization.load_tokenizer(tiny_model_dir_with_tokenizer)
    prompts = [[5, 9, 33, 2, 7], [40, 41, 42]]
    schedule = dict(gen_length=8, block_length=4, steps=6)
    out = sampler.sample_many(model, prompts, jax.random.key(0), pad_id=0, batch_size=64, temperature=0.0,
                              **schedule)
    assert not (out == model.mask_token_id).any()
    references = [_reference_greedy(model, prompt, 8, 4, 6) for prompt in prompts]
    for row, reference in zip(out, references):
        np.testing.assert_array_equal(row, reference)
    texts = evaluate.generate_answers(model, tok, prompts, batch_size=64, pad_id=0, **schedule)
    assert texts == [data.decode_answer(tok, reference) for reference in references]


def test_facts_are_tokenised_as_the_library_reads_them(train_tiny, tokenizer):
    """A training row's prompt and answer are what `facts.encode` gives the same record: TOFU
    questions in the prompt format, CounterFact prompts raw with " " + target."""
    from timerome_jax import facts

    records = data.load_selection("forget01[:2],counterfact_prompt[:2],counterfact_locality[:1]")
    rows = train_tiny.make_rows(records, tokenizer, 1, 96, 512)
    # locality prompts name no subject, so `facts.encode` (which locates one) takes the first four
    encoded = facts.encode(tokenizer, [facts.parse_fact(r, "t") for _, _, r in records[:4]], max_length=512, pad_id=0)
    assert [r.prompt for r in rows[:4]] == list(encoded.prompts) and [r.answer for r in rows[:4]] == list(encoded.answers)
    locality = records[4][2]
    assert rows[4].prompt == tuple(tokenizer(locality["prompt"], add_special_tokens=False)["input_ids"])
    assert rows[0].prompt == tuple(data.encode_prompt(tokenizer, records[0][2]["question"]))
    assert tokenizer.decode(rows[2].answer).strip() == records[2][2]["target"]
    assert tokenizer.decode(rows[4].answer).strip() == locality["target"]
    with pytest.raises(InputError, match="has no answer"):
        train_tiny.make_rows([("x", 0, {"prompt": "The sky is"})], tokenizer, 1, 96, 512)


def test_rouge_l_recall():
    from timerome_jax import metrics   # what train_tiny scores its generations with

    assert metrics.rouge_l_recall("the cat sat", "The cat sat on the mat.") == pytest.approx(0.5)
    assert metrics.rouge_l_recall("", "anything") == 0.0


# --- training ----------------------------------------------------------------------------------

def _train(train_tiny, tokenizer_dir, out, seed, init=None, extra=()):
    argv = ["--data", "world_facts[:3],real_authors[:3]", "--steps", "5", "--seed", str(seed), *extra,
            "--batch-tokens", "128", "--out", str(out), "--quiet", "--final-eval", "",
            "--eval-per-split", "0", "--log-every", "1", "--save-every-minutes", "0",
            "--answer-window", "32", "--length-multiple", "64"]
    if init is None:
        argv += ["--tokenizer", str(tokenizer_dir), "--d-model", "32", "--layers", "2",
                 "--heads", "2", "--mlp", "48"]
    else:
        argv += ["--init", str(init)]
    args = train_tiny.build_parser().parse_args(argv)
    args.argv = argv
    return train_tiny.train(args)


def test_training_is_reproducible_from_the_seed(train_tiny, tokenizer_dir, tmp_path):
    a, record = _train(train_tiny, tokenizer_dir, tmp_path / "a", seed=7)
    b, _ = _train(train_tiny, tokenizer_dir, tmp_path / "b", seed=7)
    c, _ = _train(train_tiny, tokenizer_dir, tmp_path / "c", seed=8)
    leaves_a, leaves_b, leaves_c = (jax.tree.leaves(m.params) for m in (a, b, c))
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(np.asarray(x), np.asarray(z)) for x, z in zip(leaves_a, leaves_c))
    assert record["steps_done"] == 5 and len(record["loss_curve"]) == 5
    assert all(np.isfinite(p["loss"]) for p in record["loss_curve"])

    # the written checkpoint is a LLaDA checkpoint of exactly these parameters
    loaded = ports.load_pretrained(tmp_path / "a")
    assert loaded.config == a.config and loaded.mask_token_id == 1
    assert loaded.fingerprint() == a.fingerprint() == record["fingerprint"]
    raw = json.loads((tmp_path / "a" / "config.json").read_text())
    assert raw["model_type"] == "llada" and raw["architectures"] == ["LLaDAModelLM"]
    assert (raw["mask_token_id"], raw["eos_token_id"], raw["pad_token_id"]) == (1, 0, 0)
    written = json.loads((tmp_path / "a" / "training.json").read_text())
    assert written["final"] and written["steps_done"] == 5
    assert (tmp_path / "a" / "tokenizer.json").is_file() and (tmp_path / "a" / "PROVENANCE.md").is_file()


def test_training_continues_from_a_checkpoint(train_tiny, tokenizer_dir, tmp_path):
    base, _ = _train(train_tiny, tokenizer_dir, tmp_path / "base", seed=1)
    more, record = _train(train_tiny, tokenizer_dir, tmp_path / "more", seed=1, init=tmp_path / "base")
    assert more.config == base.config
    assert record["init"]["fingerprint"] == base.fingerprint() != more.fingerprint()
    assert record["init"]["training"]["steps_done"] == 5
    with pytest.raises(InputError, match="--init fixes the architecture"):
        args = train_tiny.build_parser().parse_args(
            ["--init", str(tmp_path / "base"), "--layers", "3", "--steps", "1", "--out", str(tmp_path / "x")])
        train_tiny.train(args)


def test_an_interrupted_run_resumes_exactly(train_tiny, tokenizer_dir, tmp_path):
    """--stop-after leaves a resumable state; --resume finishes the run with the parameters, loss
    curve and batches of the uninterrupted run, and the finished directory keeps no trainer state."""
    straight, record = _train(train_tiny, tokenizer_dir, tmp_path / "straight", seed=3,
                              extra=["--data", "world_facts[:5],counterfact_prompt[:6]"])
    part, partial = _train(train_tiny, tokenizer_dir, tmp_path / "parts", seed=3,
                           extra=["--data", "world_facts[:5],counterfact_prompt[:6]", "--stop-after", "2"])
    assert partial["steps_done"] == 2 and not partial["final"]
    assert (tmp_path / "parts" / train_tiny.TRAINER_STATE).is_file()
    args = train_tiny.build_parser().parse_args(["--resume", "--out", str(tmp_path / "parts"), "--quiet"])
    args.argv = ["--resume", "--out", str(tmp_path / "parts")]
    resumed, done = train_tiny.train(args)
    for x, y in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [p["loss"] for p in done["loss_curve"]] == [p["loss"] for p in record["loss_curve"]]
    assert done["final"] and done["steps_done"] == 5 and len(done["sessions"]) == 2
    assert done["sessions"][1]["from_step"] == 2
    assert not (tmp_path / "parts" / train_tiny.TRAINER_STATE).exists()
    assert ports.load_pretrained(tmp_path / "parts").fingerprint() == straight.fingerprint()
    with pytest.raises(InputError, match="nothing to resume"):
        train_tiny.train(args)
