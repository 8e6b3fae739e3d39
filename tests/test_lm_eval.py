"""The lm-evaluation-harness model `timerome` through lm-eval's own API (runs when the [lmeval] extra
is installed): loglikelihood against `answer_log_likelihood` on the same inputs and keys, request
order and seeds, an edit memory lowering the LP of its facts, rolling and generation requests,
`simple_evaluate` on the shipped offline task, `timerome lm-eval`, and bad inputs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

import ports  # noqa: E402
from timerome_jax import api, cli, data, likelihood, sampler, tokenization  # noqa: E402
from timerome_jax import lm_eval_model as lem  # noqa: E402
from timerome_jax.errors import InputError  # noqa: E402

SMALL = dict(mc_num=4, batch_size=16, gen_length=8, steps=4, block_length=8)


def ll_request(context: str, continuation: str, idx: int = 0) -> Instance:
    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=idx)


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir_with_tokenizer):
    return lem.TimeromeLM(pretrained=str(tiny_model_dir_with_tokenizer), **SMALL)


def test_loglikelihood_is_the_mc_elbo_of_the_pair(tiny_lm):
    requests = [ll_request("who wrote the book about the old city ?", " the author was born"),
                ll_request("the cat sat on the ", "mat", 1)]           # trailing space moves to the continuation
    out = tiny_lm.loglikelihood(requests, disable_tqdm=True)
    tok, bb = tiny_lm.tokenizer, tiny_lm.backbone
    for (context, continuation), (value, greedy) in zip([r.args for r in requests], out):
        pair = tiny_lm.request_pair(context, continuation, where="test")
        assert pair.answer_ids == tuple(tok((context[len(context.rstrip()):] + continuation),
                                            add_special_tokens=False)["input_ids"])
        key = jax.random.fold_in(jax.random.key(0), pair.key_data)
        expected = likelihood.answer_log_likelihood_jit(
            bb, np.asarray([pair.prompt_ids]), np.ones((1, len(pair.prompt_ids))), np.asarray([pair.answer_ids]),
            np.ones((1, len(pair.answer_ids))), key[None], mc_samples=4, batch_size=16)
        assert value == pytest.approx(float(expected[0]), rel=1e-5)
        assert isinstance(greedy, bool)
    # the masks follow the text, not the request order; the same seed gives the same numbers
    again = tiny_lm.loglikelihood(requests[::-1], disable_tqdm=True)[::-1]
    assert again == out
    other = lem.TimeromeLM(pretrained=tiny_lm.pretrained, seed=1, **SMALL)
    assert other.loglikelihood(requests, disable_tqdm=True)[0][0] != out[0][0]


def test_rolling_and_generation(tiny_lm):
    text = "the river runs through the valley to the north ."
    (rolled,) = tiny_lm.loglikelihood_rolling(
        [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)], disable_tqdm=True)
    tokens = tuple(tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    pair = likelihood.Pair(lem._pair_id("lm-eval-rolling", text, "0"), tiny_lm.start_ids, tokens)
    expected = likelihood.score_pairs(tiny_lm.backbone, [pair], [0], pad_id=tiny_lm.pad_id, mc_samples=4,
                                      batch_size=16)[0, 0]
    assert rolled == pytest.approx(expected) and rolled < 0
    gen = [Instance(request_type="generate_until", doc={}, idx=i,
                    arguments=("who wrote the book ?", {"until": [w]})) for i, w in enumerate(["zzz", "the"])]
    full, cut = tiny_lm.generate_until(gen, disable_tqdm=True)
    ids = tiny_lm.tokenizer("who wrote the book ?", add_special_tokens=False)["input_ids"]
    assert full == api.generate_answers(tiny_lm.backbone, tiny_lm.tokenizer, [ids], gen_length=8, steps=4,
                                        block_length=8, batch_size=16, pad_id=tiny_lm.pad_id)[0]
    assert cut == (full[:full.index("the")] if "the" in full else full)
    # max_gen_toks caps the answer at its first tokens (the canvas stays gen_length = 8)
    capped = [Instance(request_type="generate_until", doc={}, idx=0,
                       arguments=("who wrote the book ?", {"until": [], "max_gen_toks": m})) for m in (3, 100)]
    row = np.asarray(sampler.sample_many(tiny_lm.backbone, [list(ids)], jax.random.key(0), pad_id=tiny_lm.pad_id,
                                         gen_length=8, steps=4, block_length=8))[0]
    three, hundred = tiny_lm.generate_until(capped, disable_tqdm=True)
    assert three == data.decode_answer(tiny_lm.tokenizer, row[:3]) and hundred == full
    with pytest.raises(InputError, match="max_gen_toks must be a positive integer"):
        tiny_lm.generate_until([Instance(request_type="generate_until", doc={}, idx=0,
                                         arguments=("who ?", {"until": [], "max_gen_toks": 0}))], disable_tqdm=True)


def test_memory_lowers_the_loglikelihood_of_its_facts(tmp_path_factory):
    """An edit memory of three forget01 facts on the embedded model: lm-eval's loglikelihood of
    those answers drops (same masks: the keys follow the text)."""
    bb = ports.load_pretrained("tofu-tiny")
    tok = api.tokenizer(bb)
    forget = api.load_facts("forget01_subjects[:3]")
    record = api.build_memory(bb, tok, api.encode(bb, tok, forget), api.Coordinate(1, 0, "resid"),
                              api.MemorySpec.paper(noise_samples=1))
    path = tmp_path_factory.mktemp("lmeval_mem") / "mem"
    api.save_memory(record, path)
    requests = [ll_request(data.format_prompt(f.prompt), " " + f.answer.strip(), i) for i, f in enumerate(forget)]
    plain = lem.TimeromeLM(pretrained="tofu-tiny", mc_num=2).loglikelihood(requests, disable_tqdm=True)
    edited = lem.TimeromeLM(pretrained="tofu-tiny", memory=str(path), mc_num=2).loglikelihood(requests,
                                                                                            disable_tqdm=True)
    assert all(e[0] < p[0] - 1.0 for e, p in zip(edited, plain)), (plain, edited)


def test_simple_evaluate_on_the_offline_task():
    lm = lem.TimeromeLM(pretrained="tofu-tiny", mc_num=2)
    results = lem.evaluate_tasks(lm, ["tofu_world_facts_mc"], limit=4)
    task = results["results"]["tofu_world_facts_mc"]
    assert 0.0 <= task["acc,none"] <= 1.0 and task["sample_len"] == 4
    assert results["config"]["model_args"]["mc_num"] == 2 and results["config"]["model"] == "timerome"


def test_cli_writes_results_and_refuses_bad_inputs(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["lm-eval", "--tasks", "tofu_real_authors_mc", "--limit", "2", "--mc-num", "2",
                     "--out", str(out)])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert "acc,none" in doc["results"]["tofu_real_authors_mc"]
    capsys.readouterr()
    for argv, message in [
        (["--tasks", "no_such_task"], "unknown lm-eval task(s) no_such_task"),
        (["--tasks", "tofu_world_facts_mc", "--mc-num", "0"], "mc_num must be a positive integer"),
        (["--tasks", "tofu_world_facts_mc", "--memory", str(tmp_path / "missing")], "is not a directory"),
        (["--tasks", "tofu_world_facts_mc", "--include-path", str(tmp_path / "nope")], "--include-path"),
        (["--tasks", "tofu_world_facts_mc", "--limit", "0"], "--limit must be a positive integer"),
    ]:
        target = tmp_path / "bad"
        assert cli.main(["lm-eval", *argv, "--out", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
        assert not target.exists()


def test_model_args_are_checked(tiny_model_dir_with_tokenizer):
    with pytest.raises(InputError, match="unknown model_args temperature"):
        lem.TimeromeLM.create_from_arg_string(f"pretrained={tiny_model_dir_with_tokenizer},temperature=1")
    with pytest.raises(InputError, match="mc_num must be a positive integer"):
        lem.TimeromeLM.create_from_arg_string(f"pretrained={tiny_model_dir_with_tokenizer},mc_num=0")
    with pytest.raises(InputError, match="unknown log-likelihood method"):
        lem.TimeromeLM(pretrained=str(tiny_model_dir_with_tokenizer), estimator="exact")
    lm = lem.TimeromeLM.create_from_arg_string(f"pretrained={tiny_model_dir_with_tokenizer},mc_num=3",
                                               {"batch_size": 8, "device": None})
    assert lm.mc_num == 3 and lm.batch_size == 8
    assert tokenization.pad_token_id(lm.tokenizer, lm.backbone) == lm.pad_id


def test_lm_eval_own_cli_runs_the_registered_model(tmp_path, monkeypatch):
    """`timerome-lm-eval` is lm-eval's command line with `timerome` registered and the shipped
    tasks on the include path."""
    from timerome_jax.commands import lmeval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lmeval.harness_main(["run", "--model", "timerome", "--model_args", "pretrained=tofu-tiny,mc_num=2",
                         "--tasks", "tofu_real_authors_mc", "--limit", "2", "--batch_size", "8",
                         "--output_path", str(tmp_path / "out")])
    (written,) = list((tmp_path / "out").rglob("results_*.json"))
    doc = json.loads(written.read_text())
    assert doc["results"]["tofu_real_authors_mc"]["sample_len"] == 2
    assert doc["config"]["model"] == "timerome"
