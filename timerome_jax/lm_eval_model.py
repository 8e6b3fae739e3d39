"""lm-evaluation-harness model `timerome`: a masked diffusion LM (optionally edited) inside lm-eval.

Needs the `[lmeval]` extra (lm-eval >= 0.4.10, whose core imports no torch). This module imports
lm_eval when it is imported; nothing else in `timerome_jax` imports it at import time, so the
package works without the extra. Importing it registers the model name `timerome`:

    import lm_eval, timerome_jax.lm_eval_model
    lm_eval.simple_evaluate(model="timerome", model_args="pretrained=tofu-tiny,mc_num=32",
                            tasks=["tofu_world_facts_mc"], task_manager=timerome_jax.lm_eval_model.task_manager())

`model_args`: `pretrained` (checkpoint directory, `timerome convert` output or embedded name;
default tofu-tiny), `memory` (an edit-memory directory: every request then runs edited),
`mc_num` (MC-ELBO copies per request, default 32), `estimator` (mc_elbo | one_step | chain),
`gen_length`, `steps`, `block_length` (the sampler's schedule for `generate_until`; default the
model's `generation_config.json`), `batch_size` (sequences per forward), `seed` (default 0).

The three request types, as LLaDA's lm-eval adapter defines them for an MDLM:

* `loglikelihood(context, continuation)`: trailing whitespace of the context moves to the
  continuation (as lm-eval's HF model does); prompt ids = the context's tokens, answer ids = the
  continuation's, each encoded on its own without special tokens (`data.encode_prompt` /
  `data.encode_answer`'s encoding, so a TOFU question's answer gets exactly the LP `timerome eval`
  gives it). The value is `likelihood.score_pairs` with the chosen estimator (default MC-ELBO,
  `mc_num` copies). The masks of a request come from `fold_in(key(seed), crc32(pair id))` with
  the pair id `lm-eval/<sha1 of context and continuation>`: they depend on the text only, not on
  the request order, the batch or the model, so an edited and an unedited model are compared on
  the same masks. `is_greedy`: every continuation token is the argmax with the whole
  continuation masked (one forward, `privacy.token_statistics`). A context too long for the model
  is cut from the left; an empty one becomes the end-of-text token.
* `loglikelihood_rolling(text)`: the text's tokens in windows of max_len // 2 tokens, each scored
  as an answer given up to max_len // 2 preceding tokens (the first window given the end-of-text
  token); the sum over windows.
* `generate_until(context, gen_kwargs)`: the masked-diffusion sampler (`sampler.sample_many`,
  low-confidence remasking, greedy unless gen_kwargs ask for sampling) with the model_args
  schedule, decoded up to the first end-of-text, then cut at the first `until` string. The
  sampler's canvas is `gen_length` tokens for every request (one compiled shape); a request's
  `max_gen_toks` caps the answer at its first `max_gen_toks` tokens (a cap above `gen_length`
  cannot lengthen it: raise `gen_length`).

`task_manager()` indexes the offline tasks shipped in `timerome_jax/data/lm_eval_tasks/` (built
from the packaged TOFU data; nothing is downloaded) plus any `include_paths`; `evaluate_tasks`
runs `lm_eval.simple_evaluate` with them (docs/evaluation.md, "lm-evaluation-harness").
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

import lm_eval
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import ports
from timerome_jax import data, likelihood, privacy, sampler, tokenization
from timerome_jax import memory as mem
from timerome_jax.errors import InputError
from timerome_jax.likelihood import Pair

MODEL_NAME = "timerome"
MODEL_ARGS = ("pretrained", "memory", "mc_num", "estimator", "gen_length", "steps", "block_length", "batch_size",
              "seed")
# the offline tasks shipped with the package (their data is the packaged TOFU jsonl)
OFFLINE_TASKS = ("tofu_world_facts_mc", "tofu_real_authors_mc", "tofu_forget01_gen")


def tasks_dir() -> Path:
    """The directory of the shipped lm-eval task YAMLs."""
    return Path(str(resources.files("timerome_jax").joinpath("data", "lm_eval_tasks")))


def _positive_int(label: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise InputError(f"{label} must be a positive integer, got {value!r}")
    return int(value)


def _pair_id(prefix: str, *texts: str) -> str:
    return f"{prefix}/{hashlib.sha1(chr(0).join(texts).encode('utf-8')).hexdigest()[:16]}"


def _requests_progress(disable: bool, desc: str):
    if disable:
        return None
    import sys

    from tqdm import tqdm

    return lambda calls: tqdm(calls, desc=desc, unit="call", file=sys.stderr, leave=False)


@register_model(MODEL_NAME)
class TimeromeLM(LM):
    """An MDLM backbone (with an optional edit memory) as an lm-eval `LM` (module docstring)."""

    def __init__(self, pretrained: str = "tofu-tiny", memory: str | None = None, mc_num: int = 32,
                 estimator: str = "mc_elbo", gen_length: int | None = None, steps: int | None = None,
                 block_length: int | None = None, batch_size: int | str = 32, seed: int = 0,
                 max_batch_size: int | None = None, device: str | None = None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise InputError(f"unknown model_args {', '.join(sorted(unknown))}; the {MODEL_NAME} model takes "
                             f"{', '.join(MODEL_ARGS)}")
        self.mc_num = _positive_int("model_args mc_num", mc_num)
        self.batch_size = _positive_int("model_args batch_size", 32 if batch_size == "auto" else batch_size)
        if isinstance(seed, str) and seed.strip().isdigit():
            seed = int(seed)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise InputError(f"model_args seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        likelihood.check_method(estimator, self.mc_num, self.batch_size)
        self.estimator = estimator
        given = {"gen_length": gen_length, "steps": steps, "block_length": block_length}
        given = {k: None if v is None else _positive_int(f"model_args {k}", v) for k, v in given.items()}
        if None not in given.values():
            sampler.check_schedule(**given)
        if memory is not None and not Path(str(memory)).is_dir():
            raise InputError(f"model_args memory {str(memory)!r} is not a directory (an edit memory written by "
                             "`timerome edit`)")
        backbone = ports.load_pretrained(str(pretrained))
        sampler.check_mask_token(backbone)
        self.schedule = {k: v if v is not None else sampler.recommended_schedule(backbone)[k]
                         for k, v in given.items()}
        sampler.check_schedule(**self.schedule)
        self.tokenizer = tokenization.backbone_tokenizer(backbone)
        if memory is not None:
            backbone = backbone.with_edits(mem.load(str(memory), backbone).memory)
        self.backbone = backbone
        self.pretrained, self.memory = str(pretrained), None if memory is None else str(memory)
        self.pad_id = tokenization.pad_token_id(self.tokenizer, backbone)
        eos = self.tokenizer.eos_token_id
        self.start_ids = (int(eos if eos is not None else self.pad_id),)
        self.max_len = int(backbone.config.max_seq_len)

    # --- tokens --------------------------------------------------------------------------------------

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def request_pair(self, context: str, continuation: str, where: str) -> Pair:
        """The scored (prompt, answer) pair of one loglikelihood request (module docstring)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        answer = self._encode(continuation)
        if not answer:
            raise InputError(f"{where}: the continuation {continuation!r} tokenises to nothing")
        if len(answer) >= self.max_len:
            raise InputError(f"{where}: the continuation has {len(answer)} tokens; the model's maximum length is "
                             f"{self.max_len}")
        prompt = self._encode(context) or self.start_ids
        prompt = prompt[-(self.max_len - len(answer)):]
        return Pair(_pair_id("lm-eval", context, continuation), prompt, answer)

    def _score(self, pairs: list[Pair], disable_tqdm: bool, desc: str) -> np.ndarray:
        return likelihood.score_pairs(self.backbone, pairs, [self.seed], pad_id=self.pad_id, estimator=self.estimator,
                                      mc_samples=self.mc_num, batch_size=self.batch_size,
                                      progress=_requests_progress(disable_tqdm, desc))[0]

    # --- the three request types -----------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if not requests:
            return []
        pairs = [self.request_pair(*req.args, where=f"loglikelihood request {i}") for i, req in enumerate(requests)]
        lp = self._score(pairs, disable_tqdm, "loglikelihood")
        greedy = [bool(np.all(s["correct"])) for s in
                  privacy.token_statistics(self.backbone, pairs, pad_id=self.pad_id, prefixes=False)]
        return [(float(v), g) for v, g in zip(lp, greedy)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if not requests:
            return []
        window = self.max_len // 2
        pairs, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args[:1]
            tokens = self._encode(text)
            if not tokens:
                raise InputError(f"loglikelihood_rolling request {i}: the text tokenises to nothing")
            for start in range(0, len(tokens), window):
                prompt = tokens[max(0, start - window):start] or self.start_ids
                pairs.append(Pair(_pair_id("lm-eval-rolling", text, str(start)), prompt,
                                  tokens[start:start + window]))
                owner.append(i)
        lp = self._score(pairs, disable_tqdm, "loglikelihood_rolling")
        totals = np.zeros(len(requests))
        np.add.at(totals, owner, lp)
        return [float(v) for v in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        G = self.schedule["gen_length"]
        if G >= self.max_len:
            raise InputError(f"gen_length {G} leaves no room for a prompt in the model's maximum length {self.max_len}")
        prompts, stops, caps, temperature = [], [], [], None
        for i, req in enumerate(requests):
            context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            cap = kwargs.get("max_gen_toks")
            caps.append(G if cap is None else min(G, _positive_int(f"generate_until request {i}: max_gen_toks", cap)))
            t = float(kwargs.get("temperature", 0.0) or 0.0) if kwargs.get("do_sample", False) else 0.0
            if temperature is not None and t != temperature:
                raise InputError("generate_until requests of one call must share one temperature")
            temperature = t
            prompts.append(list((self._encode(context) or self.start_ids)[-(self.max_len - G):]))
        ids = sampler.sample_many(self.backbone, prompts, jax.random.key(self.seed), pad_id=self.pad_id,
                                  batch_size=self.batch_size, temperature=temperature or 0.0,
                                  progress=_requests_progress(disable_tqdm, "generate_until"), **self.schedule)
        out = []
        for row, until, cap in zip(ids, stops, caps):
            text = data.decode_answer(self.tokenizer, row[:cap])
            cut = min((text.find(u) for u in until if u and u in text), default=len(text))
            out.append(text[:cut])
        return out


# --- running lm-eval -------------------------------------------------------------------------------------

def task_manager(include_paths: Sequence[str | Path] = (), *, include_defaults: bool = False):
    """An lm-eval `TaskManager` over the shipped offline tasks and `include_paths` (and lm-eval's
    own task index with `include_defaults`)."""
    from lm_eval.tasks import TaskManager

    paths = [tasks_dir()]
    for p in include_paths:
        if not Path(p).is_dir():
            raise InputError(f"--include-path {p} is not a directory of lm-eval task YAMLs")
        paths.append(Path(p))
    return TaskManager(include_path=[str(p) for p in paths], include_defaults=include_defaults)


def resolve_tasks(tasks: Sequence[str], include_paths: Sequence[str | Path] = ()):
    """(task manager, task names) with every name known: the shipped tasks and `include_paths` are
    searched first, then lm-eval's own index (standard tasks such as hellaswag, whose data comes
    from the Hub)."""
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise InputError("no lm-eval task given (--tasks NAME[,NAME...])")
    manager = task_manager(include_paths)
    if any(n not in manager.all_tasks for n in names):
        manager = task_manager(include_paths, include_defaults=True)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise InputError(f"unknown lm-eval task(s) {', '.join(unknown)}; the offline tasks shipped here are "
                         f"{', '.join(OFFLINE_TASKS)}; lm-eval's own (e.g. hellaswag) need the Hub and "
                         "--allow-download; add your own with --include-path DIR")
    return manager, names


def set_offline(allow_download: bool) -> None:
    """Forbid Hugging Face Hub access (datasets and hub), unless downloads are allowed."""
    if allow_download:
        return
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.config.HF_DATASETS_OFFLINE = True   # read at import; lm_eval imported datasets already
    datasets.config.HF_HUB_OFFLINE = True


def check_run(limit: int | None, num_fewshot: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InputError(f"--limit must be a positive integer, got {limit!r}")
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise InputError(f"--num-fewshot must be a non-negative integer, got {num_fewshot!r}")


def evaluate_tasks(model: TimeromeLM, tasks: Sequence[str], *, include_paths: Sequence[str | Path] = (),
                   limit: int | None = None, num_fewshot: int | None = None, allow_download: bool = False,
                   bootstrap_iters: int = 1000, resolved=None) -> dict:
    """`lm_eval.simple_evaluate` of `model` on `tasks` (see `resolve_tasks`; `resolved`: its
    result, already computed), offline unless `allow_download`. Returns lm-eval's results dict
    (JSON-serialisable with `lm_eval.utils.handle_non_serializable`). lm-eval's Python, NumPy and
    few-shot seeds are its defaults (fixed); torch's is not set."""
    check_run(limit, num_fewshot)
    set_offline(allow_download)
    manager, names = resolved or resolve_tasks(tasks, include_paths)
    results = lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=bootstrap_iters,
                                      torch_random_seed=None)
    results["config"].update({"model": MODEL_NAME, "model_args": {
        "pretrained": model.pretrained, "memory": model.memory, "mc_num": model.mc_num, "estimator": model.estimator,
        "batch_size": model.batch_size, "seed": model.seed, **model.schedule},
        "fingerprint": model.backbone.fingerprint(), "lm_eval_version": lm_eval.__version__})
    return results


__all__ = ["MODEL_ARGS", "MODEL_NAME", "OFFLINE_TASKS", "TimeromeLM", "check_run", "evaluate_tasks", "resolve_tasks", "set_offline",
           "task_manager", "tasks_dir"]
