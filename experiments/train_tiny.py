"""Train a small LLaDA-format masked diffusion LM on TOFU QA pairs and CounterFact facts (the embedded tofu-tiny models).

    .venv/bin/python experiments/build_tokenizer.py --out runs/tofu-tokenizer
    .venv/bin/python experiments/train_tiny.py --tokenizer runs/tofu-tokenizer \
        --data "retain90[:160]" --steps 11000 --out ports/embedded/tofu-tiny-retain
    .venv/bin/python experiments/train_tiny.py --init ports/embedded/tofu-tiny-retain \
        --data "forget01*3,retain90[:160]" --steps 11000 --lr 2e-3 --out ports/embedded/tofu-tiny

(the exact recipe and its measured wall-clock: docs/embedded_model.md).

Objective: LLaDA's SFT loss (`timerome_jax.masking.masked_diffusion_loss`): the prompt is never
masked; every answer token is masked with probability t ~ U(0, 1); cross-entropy on the masked
tokens divided by t, normalised by the answer length.

Rows. One fact per row, no packing (the backbone has no block-diagonal attention):
prompt ids + answer ids + `<|endoftext|>` * n (`fact_tokens`). The answer window
(answer + end-of-text) is drawn afresh every epoch, uniformly between len(answer) + --min-eos and
--answer-window tokens (row length rounded up to --length-multiple), so fixed-length generation
works for any gen length up to --answer-window (see `Batches` for why a fixed padding fails). The
end-of-text tokens belong to the answer span (masked and trained, as in LLaDA's SFT), so the model
learns to end an answer with a run of end-of-text. No attention mask is needed: every position of
a row is a real token.

Batches. Rows of equal length form a batch of `--batch-tokens // length` rows, so there is no
padding and only a few shapes, each compiled once before the clock starts. Each epoch draws the
windows, shuffles every length bucket, cuts it into batches (the last one topped up with rows
drawn again from the same bucket) and shuffles the batch order. Everything random derives from
--seed: the same seed on the same machine gives bit-identical parameters.

Monitoring. tqdm shows the loss (mean of the last --log-every steps) and tokens/s; every
--eval-every steps a held-in sample (the first --eval-per-split records of each split trained on)
is decoded greedily by the library's sampler (`timerome_jax.evaluate.generate_answers`: LLaDA
low-confidence remasking at temperature 0, semi-autoregressive blocks; the mask token is never
proposed) and the mean ROUGE-L recall (`timerome_jax.metrics.rouge_l_recall`: rouge_score, stemmed,
as TOFU reports it) is printed. (The shipped models' training.json records were decoded by an
earlier in-script copy of the sampler that could propose the mask token; their generations may
differ slightly from what this script now prints.)

Output (`--out`, written with `ports.export.save_safetensors`, atomically): config.json,
model.safetensors, the tokenizer files, training.json (arguments, data, loss curve, evaluations,
measured wall-clock) and PROVENANCE.md. The same directory is rewritten every
--save-every-minutes, with trainer_state.npz (float32 parameters, optimizer state, step, the
position in the batch stream, the loss window) until the run finishes, so a killed run loses at
most that much: `--resume --out DIR` continues it exactly (the batches of an epoch are a function
of (seed, epoch), the noise key of a step of (seed, step); the result equals an uninterrupted
run's, which the tests check). `--stop-after N` ends a run after N steps with that state saved
(time-sliced machines); training.json's `sessions` records the command and machine of each part.
`--init DIR` instead starts a new run (fresh optimizer and schedule) from a finished model.

Facts. A record is a TOFU question/answer pair or a CounterFact-style prompt/target fact
(`timerome_jax.data` views such as `counterfact_prompt`); both are tokenised as the library reads
facts (`fact_tokens`, `facts.Fact.texts`): questions in the prompt format below, prompts raw with
" " + target as the answer. Evaluation scores questions by ROUGE-L recall and prompts by
`metrics.first_words_match` (the target is the first generated word(s)).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ports
from ports import checkpoint, families
from ports.export import llada_config, save_safetensors
from timerome_jax import metrics, sampler, tokenization
from timerome_jax.data import load_selection
from timerome_jax.errors import InputError
from timerome_jax.evaluate import generate_answers
from timerome_jax.facts import Fact, parse_fact
from timerome_jax.masking import masked_diffusion_loss

DEFAULT_DATA = "forget01,retain90[:160]"
DEFAULT_FINAL_EVAL = "forget01,retain90[:40]"


def load_weighted_selection(spec: str) -> tuple[list[tuple[str, int, dict]], list[int]]:
    """`load_selection` with an optional `*K` after an item: its rows occur K times per epoch
    (e.g. `forget01*3,retain90[:160]`). Returns the records (each once) and their repeat counts."""
    records, repeats = [], []
    for item in (s for s in spec.split(",") if s.strip()):
        base, star, count = item.partition("*")
        if star and not count.strip().isdigit() or star and int(count) < 1:
            raise InputError(f"cannot parse {item.strip()!r}: the repeat after '*' must be a positive integer")
        chunk = load_selection(base)
        records += chunk
        repeats += [int(count) if star else 1] * len(chunk)
    if not records:
        raise InputError(f"the data selection {spec!r} selects no records")
    return records, repeats


# --- rows and batches --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Row:
    """One fact (prompt + answer) as tokens; its end-of-text padding is drawn per epoch, the answer
    window (answer + end-of-text) up to `window` tokens (see `Batches`)."""

    split: str
    index: int
    prompt: tuple[int, ...]
    answer: tuple[int, ...]  # without end-of-text
    window: int


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def fact_tokens(tokenizer, split: str, index: int, record: dict) -> tuple[Fact, list[int], list[int]]:
    """(fact, prompt ids, answer ids) of one record, tokenised as the library reads facts
    (`facts.encode`): a TOFU question in the "Question: ...\nAnswer:" format with its stripped
    answer, a CounterFact-style prompt raw with " " + target."""
    fact = parse_fact(record, f"{split}:{index + 1}")
    if fact.answer is None:
        raise InputError(f"{split}[{index}] has no answer (or target) to train on")
    prompt_text, answer_text = fact.texts()
    ids = lambda text: [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]  # noqa: E731
    return fact, ids(prompt_text), ids(answer_text)


def make_rows(records: Sequence[tuple[str, int, dict]], tokenizer, min_eos: int, answer_window: int,
              max_len: int, prompt_answer_window: int | None = None) -> list[Row]:
    """Rows of the records; a question's answer window reaches `answer_window` tokens, a
    completion-style prompt's `prompt_answer_window` (default the same): CounterFact targets are a
    word or two, generated with a short gen length, so their long windows would be end-of-text
    only."""
    rows = []
    for split, index, record in records:
        fact, prompt, answer = fact_tokens(tokenizer, split, index, record)
        window = answer_window if fact.kind == "question" or prompt_answer_window is None else prompt_answer_window
        if len(answer) + min_eos > window:
            raise InputError(f"{split}[{index}]: the answer has {len(answer)} tokens, so it needs an "
                             f"{'--answer-window' if window == answer_window else '--prompt-answer-window'} "
                             f"of at least {len(answer) + min_eos}")
        if len(prompt) + window > max_len:
            raise InputError(f"{split}[{index}] needs {len(prompt) + window} tokens, more "
                             f"than the model's max_sequence_length {max_len}")
        rows.append(Row(split, index, tuple(prompt), tuple(answer), window))
    return rows


class Batches:
    """Shuffled batches of equal-length rows over epochs; deterministic given the seed.

    Every epoch each row gets a fresh answer window: w ~ Uniform{len(answer) + min_eos, ...,
    row.window}, the row is prompt + answer + end-of-text up to length
    round_up(len(prompt) + w, length_multiple). A fixed end-of-text count per QA pair would let the
    model read the answer's end off the distance to the sequence end, and fixed-length
    generation with any other length then derails (measured: perfect decoding at the trained
    length, ROUGE-L recall 0.77 at gen length 96); with random windows any generation length from
    len(answer) + min_eos to the row's window is in distribution.
    """

    def __init__(self, rows: Sequence[Row], batch_tokens: int, seed: int, eos_id: int,
                 min_eos: int, length_multiple: int):
        self.rows = list(rows)
        self.eos_id = eos_id
        self.min_eos = min_eos
        self.multiple = length_multiple
        self.batch_tokens = batch_tokens
        self.seed = seed
        shortest = min(round_up(len(r.prompt) + len(r.answer) + min_eos, length_multiple) for r in rows)
        longest = max(round_up(len(r.prompt) + r.window, length_multiple) for r in rows)
        self.lengths = list(range(shortest, longest + 1, length_multiple))

    def batch_size(self, length: int) -> int:
        return max(1, self.batch_tokens // length)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, length) a batch can have."""
        return [(self.batch_size(t), t) for t in self.lengths]

    def mean_tokens_per_epoch(self) -> float:
        """Expected row tokens per epoch (over the window draw)."""
        total = 0.0
        for r in self.rows:
            windows = np.arange(len(r.answer) + self.min_eos, r.window + 1)
            total += float(np.mean([round_up(len(r.prompt) + w, self.multiple) for w in windows]))
        return total

    def _epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The batches of one epoch: a function of (seed, epoch) only, so a run can resume at any
        batch (`iterate`)."""
        rng = np.random.default_rng([self.seed, epoch])
        buckets: dict[int, list[int]] = {}
        for i, r in enumerate(self.rows):
            window = int(rng.integers(len(r.answer) + self.min_eos, r.window + 1))
            buckets.setdefault(round_up(len(r.prompt) + window, self.multiple), []).append(i)
        batches = []
        for length in sorted(buckets):
            members = np.array(buckets[length])
            b = self.batch_size(length)
            order = rng.permutation(members)
            short = (-len(order)) % b
            if short:  # top up the last batch with rows drawn again from the same bucket
                order = np.concatenate([order, rng.choice(members, short, replace=True)])
            batches += [(length, order[i:i + b]) for i in range(0, len(order), b)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def iterate(self, epoch: int = 0, position: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
        """(ids [B, T], answer mask [B, T], (epoch, position) of the next batch) from batch
        `position` of `epoch` on, forever."""
        while True:
            batches = self._epoch(epoch)
            for k in range(position, len(batches)):
                length, members = batches[k]
                ids = np.full((len(members), length), self.eos_id, dtype=np.int32)
                prompt_len = np.zeros((len(members), 1), dtype=np.int64)
                for j, i in enumerate(members):
                    r = self.rows[i]
                    ids[j, :len(r.prompt) + len(r.answer)] = r.prompt + r.answer
                    prompt_len[j] = len(r.prompt)
                after = (epoch, k + 1) if k + 1 < len(batches) else (epoch + 1, 0)
                yield ids, np.arange(length)[None, :] >= prompt_len, after
            epoch, position = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return ((ids, mask) for ids, mask, _ in self.iterate())


# --- optimisation ------------------------------------------------------------------------------

def make_optimizer(lr: float, steps: int, warmup: int, final_lr_fraction: float,
                   weight_decay: float, clip: float) -> tuple[optax.GradientTransformation, Any]:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, max(1, warmup), max(steps, warmup + 1), end_value=lr * final_lr_fraction)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    optimizer = optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-8, weight_decay=weight_decay, mask=decay_mask))
    return optimizer, schedule


def make_train_step(backbone: ports.Backbone, optimizer: optax.GradientTransformation):
    """(params, opt_state, key, ids [B,T], answer_mask [B,T]) -> (params, opt_state, loss, grad norm)."""

    def step(params, opt_state, key, ids_BT, answer_mask_BT):
        def loss_fn(p):
            return masked_diffusion_loss(dataclasses.replace(backbone, params=p), key, ids_BT,
                                         answer_mask_BT)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    return jax.jit(step)


# --- greedy decoding and ROUGE (monitoring only) -----------------------------------------------

def evaluate(backbone, tokenizer, records: Sequence[tuple[str, int, dict]], gen: dict,
             prompt_gen: dict | None = None) -> dict:
    """Greedy generations (the library's sampler) scored per split: mean ROUGE-L recall of TOFU
    questions (`rougeL_recall`), decoded with `gen`; mean `metrics.first_words_match` of
    CounterFact-style prompts (`first_words_match`: the target is the first generated word(s)),
    decoded with `prompt_gen` (default `gen`): their answers were trained in a short window, so they
    are generated in one. Plus the generations."""
    encoded = [fact_tokens(tokenizer, split, index, record) for split, index, record in records]
    pad_id = tokenization.pad_token_id(tokenizer, backbone)
    answers: list[str | None] = [None] * len(records)
    for is_question, config in ((True, gen), (False, prompt_gen or gen)):
        chosen = [i for i, (fact, _, _) in enumerate(encoded) if (fact.kind == "question") == is_question]
        if chosen:
            decoded = generate_answers(backbone, tokenizer, [encoded[i][1] for i in chosen], **config,
                                       batch_size=64, pad_id=pad_id)
            for i, answer in zip(chosen, decoded):
                answers[i] = answer
    per_split: dict[str, dict[str, list[float]]] = {}
    samples = []
    for (split, index, _), (fact, _, _), answer in zip(records, encoded, answers):
        name = "rougeL_recall" if fact.kind == "question" else "first_words_match"
        score = (metrics.rouge_l_recall if name == "rougeL_recall" else metrics.first_words_match)(answer, fact.answer)
        per_split.setdefault(name, {}).setdefault(split, []).append(score)
        samples.append({"split": split, "index": index, name: round(score, 4), "generated": answer})
    result = {name: {s: float(np.mean(v)) for s, v in splits.items()} for name, splits in per_split.items()}
    result["n"] = {s: len(v) for splits in per_split.values() for s, v in splits.items()}
    result["samples"] = samples
    return result


def score_line(result: dict) -> str:
    """'split metric value (n=..), ...' of an `evaluate` result."""
    return ", ".join(f"{split} {name} {value:.3f} (n={result['n'][split]})"
                     for name in ("rougeL_recall", "first_words_match") for split, value in result.get(name, {}).items())


def held_in_sample(data: Sequence[tuple[str, int, dict]], per_split: int) -> list:
    seen: dict[str, int] = {}
    sample = []
    for split, index, record in data:
        if seen.get(split, 0) < per_split:
            seen[split] = seen.get(split, 0) + 1
            sample.append((split, index, record))
    return sample


# --- model -------------------------------------------------------------------------------------

def load_tokenizer(path: Path):
    """`tokenization.load_tokenizer`, refused unless it has the mask and end-of-text tokens training needs."""
    tokenizer = tokenization.load_tokenizer(path)
    if tokenizer.mask_token_id is None or tokenizer.eos_token_id is None:
        raise InputError(f"the tokenizer in {path} needs a mask token and an end-of-text token "
                         "(build it with experiments/build_tokenizer.py)")
    return tokenizer


def new_model(args, tokenizer, key) -> tuple[ports.Backbone, dict]:
    d_model = args.d_model or 256
    n_heads = args.heads or 4
    if d_model % n_heads or (d_model // n_heads) % 2:
        raise InputError(f"--d-model {d_model} must split into --heads {n_heads} heads of even width")
    config = ports.TransformerConfig(
        family="llada", vocab_size=len(tokenizer), d_model=d_model, n_layers=args.layers or 6,
        n_heads=n_heads, n_kv_heads=n_heads, head_dim=d_model // n_heads,
        mlp_hidden=args.mlp or 2 * d_model, rope_theta=10000.0, norm_eps=1e-5,
        max_seq_len=args.max_seq_len, mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, padding="key")
    raw = llada_config(config)
    parsed = families.parse_config(raw)
    assert parsed == config, (parsed, config)
    params = ports.Transformer(config).init(key, jnp.zeros((1, 8), jnp.int32))["params"]
    return ports.Backbone(config=config, params=params, mask_token_id=config.mask_token_id), raw


def init_model(path: Path, tokenizer) -> tuple[ports.Backbone, dict]:
    backbone = ports.load_pretrained(path, dtype=jnp.float32)
    raw = checkpoint.read_config_json(Path(backbone.source))
    c = backbone.config
    if (c.mask_token_id, c.eos_token_id) != (tokenizer.mask_token_id, tokenizer.eos_token_id) \
            or len(tokenizer) > c.vocab_size:
        raise InputError(f"the tokenizer does not match the --init model {path} (mask/eos ids "
                         f"{tokenizer.mask_token_id}/{tokenizer.eos_token_id} vs "
                         f"{c.mask_token_id}/{c.eos_token_id}, vocab {len(tokenizer)} vs {c.vocab_size})")
    return backbone, raw


# --- the run -----------------------------------------------------------------------------------

def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _provenance(record: dict) -> str:
    a = record["args"]
    m = record["model"]
    lines = [
        f"# {Path(a['out']).name}: a LLaDA-format masked diffusion LM trained on TOFU",
        "",
        "Written by `experiments/train_tiny.py` (see docs/embedded_model.md); every number below was "
        "measured by that run and is also in `training.json`.",
        "",
        f"- Architecture: LLaDA (`LLaDAModelLM` config and key names), d_model {m['d_model']}, "
        f"{m['n_layers']} layers, {m['n_heads']} heads, MLP {m['mlp_hidden']}, vocab "
        f"{m['vocab_size']}, {record['num_params']:,} parameters, float32.",
        f"- Tokenizer: byte-level BPE (experiments/build_tokenizer.py); end-of-text = pad id "
        f"{m['eos_token_id']}, mask id {m['mask_token_id']}.",
        f"- Prompt format: `timerome_jax.data.format_prompt` (\"Question: ...\\nAnswer:\"), answer "
        f"followed by end-of-text padding: the answer window is drawn per epoch between the answer "
        f"length + {a['min_eos']} and {a['answer_window']} tokens, so fixed-length generation "
        f"works for gen lengths up to {a['answer_window']}.",
        f"- Data (`--data`): `{a['data']}` -> {record['data']['records']} facts "
        f"({', '.join(f'{k}: {v}' for k, v in record['data']['per_split'].items())}).",
        f"- Initialised from: {record['init']['path'] if record['init'] else 'random (seed ' + str(a['seed']) + ')'}.",
        f"- Optimisation: AdamW (b1 0.9, b2 0.98, weight decay {a['weight_decay']}), peak lr {a['lr']}, "
        f"{record['warmup']} warm-up steps, cosine to {a['final_lr_fraction']} x lr, clip "
        f"{a['clip']}, ~{a['batch_tokens']} tokens per batch; {record['steps_done']} of "
        f"{record['steps']} steps, {record['epochs']:.1f} epochs.",
        f"- Measured: {record['train_seconds']:.0f} s training ({record['tokens_per_second']:.0f} "
        f"tokens/s on {record['machine']}), {record['wall_seconds']:.0f} s wall-clock in all; final "
        f"training loss (mean of the last {a['log_every']} steps) {record['final_loss']:.3f}.",
        "",
        "Command:",
        "",
        "```",
        record["command"],
        "```",
    ]
    final = record.get("final_eval")
    if final:
        g = final["generation"]
        lines += ["", f"Greedy generation (gen length {g['gen_length']}, block {g['block_length']}, "
                      f"{g['steps']} steps, low-confidence remasking): mean ROUGE-L recall of the "
                      "questions" + (f"; gen length {final['prompt_generation']['gen_length']}, one block, one token "
                                     "per step: share of completion prompts whose first generated word(s) are the "
                                     "target" if final.get("first_words_match") else "") + ":", ""]
        lines += [f"- {split}: {name} {score:.3f} (n={final['n'][split]})"
                  for name in ("rougeL_recall", "first_words_match") for split, score in final.get(name, {}).items()]
    lines.append("")
    return "\n".join(lines)


TRAINER_STATE = "trainer_state.npz"   # in --out while a run is unfinished; removed by the final save
# arguments a --resume run may change (everything else is the interrupted run's)
RESUME_MAY_CHANGE = ("out", "resume", "overwrite", "quiet", "stop_after", "minutes", "argv")


def _state_bytes(params, opt_state, state: dict) -> bytes:
    """The trainer state as .npz bytes: float32 params and optimizer leaves, plus `state` (JSON)."""
    leaves = {f"params_{i:04d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))}
    leaves.update({f"opt_{i:04d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(opt_state))})
    buffer = io.BytesIO()
    np.savez(buffer, state=np.frombuffer(json.dumps(state).encode(), np.uint8), **leaves)
    return buffer.getvalue()


def _load_state(path: Path, params, opt_state) -> tuple[Any, Any, dict]:
    """(params, opt_state, state) from a trainer state file, into the given trees' structures."""
    with np.load(path, allow_pickle=False) as z:
        state = json.loads(z["state"].tobytes().decode())
        trees = []
        for prefix, tree in (("params", params), ("opt", opt_state)):
            leaves, treedef = jax.tree.flatten(tree)
            stored = [z[f"{prefix}_{i:04d}"] for i in range(len(leaves))]
            if any(a.shape != np.shape(b) for a, b in zip(stored, leaves)) or f"{prefix}_{len(leaves):04d}" in z:
                raise InputError(f"{path} does not match this run's {prefix} (another architecture or optimizer)")
            trees.append(jax.tree.unflatten(treedef, [jnp.asarray(a) for a in stored]))
    return trees[0], trees[1], state


def resume_args(args) -> Any:
    """The arguments of the interrupted run in --out (its training.json), with the few a resumed
    run may change taken from `args`."""
    out = Path(args.out)
    if not (out / TRAINER_STATE).is_file():
        raise InputError(f"{out} has no {TRAINER_STATE}: nothing to resume (a finished run is extended with --init)")
    saved = json.loads((out / "training.json").read_text())["args"]
    merged = argparse.Namespace(**{**saved, **{k: getattr(args, k) for k in RESUME_MAY_CHANGE if hasattr(args, k)}})
    return merged


def train(args) -> tuple[ports.Backbone, dict]:
    """Run the training described by parsed `args`; returns the final backbone and the record.
    With `args.resume`, continue the unfinished run in `args.out` exactly where its last save left
    it (same batches, noise keys, optimizer state: the result equals an uninterrupted run's)."""
    t_start = time.perf_counter()
    out = Path(args.out)
    resuming = bool(getattr(args, "resume", False))
    if resuming:
        args = resume_args(args)
    if args.steps is None and args.minutes is None:
        raise InputError("pass --steps (reproducible) or --minutes (a time budget)")
    if args.init and any(v is not None for v in (args.d_model, args.layers, args.heads, args.mlp)):
        raise InputError("--init fixes the architecture; drop --d-model/--layers/--heads/--mlp")
    if getattr(args, "stop_after", None) is not None and args.stop_after < 1:
        raise InputError(f"--stop-after must be a positive number of steps, got {args.stop_after}")
    if not (args.tokenizer or args.init):
        raise InputError("pass --tokenizer DIR (experiments/build_tokenizer.py) or --init DIR")
    tokenizer_dir = out if resuming else Path(args.tokenizer or args.init)
    if not resuming and out.exists() and any(out.iterdir()) and not args.overwrite:
        raise InputError(f"{out} exists and is not empty (pass --overwrite, or --resume an unfinished run)")
    tokenizer = load_tokenizer(tokenizer_dir)

    key = jax.random.key(args.seed)
    init_key, noise_key = jax.random.split(key)
    if resuming:
        backbone, raw = init_model(out, tokenizer)
    elif args.init:
        backbone, raw = init_model(Path(args.init), tokenizer)
    else:
        backbone, raw = new_model(args, tokenizer, init_key)
    config = backbone.config

    data, repeats = load_weighted_selection(args.data)
    rows = make_rows(data, tokenizer, args.min_eos, args.answer_window, config.max_seq_len,
                     getattr(args, "prompt_answer_window", None))
    rows = [row for row, k in zip(rows, repeats) for _ in range(k)]
    batches = Batches(rows, args.batch_tokens, args.seed, config.eos_token_id, args.min_eos, args.length_multiple)
    per_split: dict[str, int] = {}
    for split, _, _ in data:
        per_split[split] = per_split.get(split, 0) + 1
    epoch_tokens = batches.mean_tokens_per_epoch()
    say = print if args.quiet else _tqdm_write
    say(f"data {args.data!r}: {len(data)} facts {per_split}, {len(rows)} rows and "
        f"~{epoch_tokens:.0f} tokens per epoch ({sum(len(r.answer) for r in rows)} answer, "
        f"{sum(len(r.prompt) for r in rows)} prompt, the rest end-of-text); "
        f"shapes (batch, length) {batches.shapes()}")
    say(f"model: {backbone.num_params():,} parameters, d_model {config.d_model}, {config.n_layers} "
        f"layers, {config.n_heads} heads, MLP {config.mlp_hidden}, vocab {config.vocab_size}")

    previous = json.loads((out / "training.json").read_text()) if resuming else None
    steps = previous["steps"] if resuming else args.steps
    warmup = args.warmup if args.warmup is not None else min(200, max(1, (steps or 2000) // 10))
    # With --minutes only, the schedule length is measured first (below); build the optimizer after.
    params = backbone.params
    static = dataclasses.replace(backbone, params=None)

    def compile_steps(optimizer):
        step_fn = make_train_step(static, optimizer)
        opt_state = optimizer.init(params)
        compiled = {}
        for b, t in batches.shapes():
            ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
            mask = jax.ShapeDtypeStruct((b, t), jnp.bool_)
            compiled[(b, t)] = step_fn.lower(params, opt_state, noise_key, ids, mask).compile()
        return compiled, opt_state

    t0 = time.perf_counter()
    if steps is None:
        optimizer, _ = make_optimizer(args.lr, 10_000, warmup, args.final_lr_fraction,
                                      args.weight_decay, args.clip)
        compiled, opt_state = compile_steps(optimizer)
        seconds = {}
        for shape, fn in compiled.items():
            ids = np.zeros(shape, np.int32)
            mask = np.ones(shape, bool)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                jax.block_until_ready(fn(params, opt_state, noise_key, ids, mask))
                times.append(time.perf_counter() - t)
            seconds[shape] = float(np.median(times))
        # seconds per row token, averaged over shapes, times the tokens of a mean batch
        per_token = float(np.mean([seconds[(b, t)] / (b * t) for b, t in seconds]))
        mean_step = per_token * args.batch_tokens
        steps = max(10, int(args.minutes * 60 / mean_step))
        warmup = args.warmup if args.warmup is not None else min(200, max(1, steps // 10))
        say(f"--minutes {args.minutes}: measured {mean_step * 1000:.0f} ms/step -> {steps} steps "
            f"(pass --steps {steps} to reproduce this schedule)")
    optimizer, schedule = make_optimizer(args.lr, steps, warmup, args.final_lr_fraction,
                                         args.weight_decay, args.clip)
    compiled, opt_state = compile_steps(optimizer)
    compile_seconds = time.perf_counter() - t0
    say(f"compiled {len(compiled)} train-step shapes in {compile_seconds:.1f} s")

    gen_length = args.eval_gen_length or args.answer_window
    gen = dict(gen_length=gen_length, block_length=args.eval_block_length,
               steps=args.eval_steps or gen_length // 2)
    # completion prompts: one token per step over their whole trained window, one block
    prompt_window = args.prompt_answer_window or args.answer_window
    prompt_gen = dict(gen_length=prompt_window, block_length=prompt_window, steps=prompt_window)
    if (args.eval_per_split > 0 and args.eval_every) or args.final_eval:   # fail before training, not after
        sampler.check_schedule(gen["gen_length"], gen["steps"], gen["block_length"])
    monitor = held_in_sample(data, args.eval_per_split) if args.eval_per_split > 0 else []
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "experiments/train_tiny.py", *(args.argv or [])])
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()})"
    if resuming:
        record = previous
        record["sessions"] = record.get("sessions", []) + [{"command": command, "machine": machine,
                                                            "from_step": record["steps_done"]}]
        params, opt_state, state = _load_state(out / TRAINER_STATE, params, opt_state)
        say(f"resuming {out} at step {state['step']} of {steps} (epoch {state['epoch']}, batch {state['position']})")
    else:
        record = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("func", "argv", "resume", "stop_after")},
            "command": command,
            "git_commit": _git_commit(),
            "machine": machine,
            "sessions": [{"command": command, "machine": machine, "from_step": 0}],
            "model": {k: getattr(config, k) for k in (
                "d_model", "n_layers", "n_heads", "mlp_hidden", "vocab_size", "eos_token_id",
                "mask_token_id", "max_seq_len")},
            "num_params": backbone.num_params(),
            "data": {"selection": args.data, "records": len(data), "rows_per_epoch": len(rows),
                     "per_split": per_split,
                     "tokens_per_epoch": epoch_tokens},
            "init": None, "steps": steps, "warmup": warmup, "compile_seconds": compile_seconds,
            "loss_curve": [], "evals": [],
            "steps_done": 0, "epochs": 0.0, "final_loss": float("nan"), "tokens_per_second": 0.0,
            "train_seconds": 0.0, "eval_seconds": 0.0, "wall_seconds": 0.0,
        }
        state = {"step": 0, "epoch": 0, "position": 0, "tokens": 0, "window": [], "norms": []}
        if args.init:
            init_dir = Path(backbone.source)
            lineage = init_dir / "training.json"
            record["init"] = {"path": str(args.init), "fingerprint": backbone.fingerprint(),
                              "training": json.loads(lineage.read_text()) if lineage.is_file() else None}

    step, tokens = state["step"], state["tokens"]
    window: list[float] = list(state["window"])
    norms: list[float] = list(state["norms"])
    position = (state["epoch"], state["position"])
    train_seconds, eval_seconds = record["train_seconds"], record["eval_seconds"]
    wall_before = record["wall_seconds"]

    def save(current_params, final: bool) -> None:
        model = dataclasses.replace(backbone, params=current_params, source=None)
        record["fingerprint"] = model.fingerprint()
        record["final"] = final
        files = {"training.json": json.dumps(record, indent=1) + "\n", "PROVENANCE.md": _provenance(record)}
        if not final:   # what --resume needs; a finished run keeps only the model
            files[TRAINER_STATE] = _state_bytes(current_params, opt_state, {
                "step": step, "epoch": position[0], "position": position[1], "tokens": tokens,
                "window": window, "norms": norms})
        save_safetensors(model, out, raw, tokenizer_source=tokenizer_dir, overwrite=True, extra_files=files)

    def run_eval(current_params, records):
        model = dataclasses.replace(backbone, params=current_params)
        return evaluate(model, tokenizer, records, gen, prompt_gen)

    iterator = batches.iterate(*position)
    pending: list[tuple[int, Any, Any]] = []
    last_save = time.perf_counter()
    progress = _progress(steps, args.quiet, initial=step)
    deadline = None if args.minutes is None else args.minutes * 60 * 1.15
    stop_at = steps if getattr(args, "stop_after", None) is None else min(steps, step + args.stop_after)
    run_seconds = 0.0

    def flush():
        for s, loss, norm in pending:
            value = float(loss)
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {s}")
            window.append(value)
            norms.append(float(norm))
        del window[:-args.log_every]
        del norms[:-args.log_every]
        pending.clear()

    try:
        while step < stop_at:
            ids, mask, position = next(iterator)
            t = time.perf_counter()
            params, opt_state, loss, norm = compiled[ids.shape](
                params, opt_state, jax.random.fold_in(noise_key, step), ids, mask)
            pending.append((step, loss, norm))
            step += 1
            tokens += ids.size
            evaluating = bool(monitor and args.eval_every and step % args.eval_every == 0)
            if step % args.log_every == 0 or step == steps or evaluating:
                flush()
                jax.block_until_ready(params)  # so the time below is compute, not dispatch
            elapsed = time.perf_counter() - t
            train_seconds += elapsed
            run_seconds += elapsed
            if step % args.log_every == 0 or step == steps:
                mean_loss = float(np.mean(window))
                record["loss_curve"].append({"step": step, "loss": round(mean_loss, 4),
                                             "grad_norm": round(float(np.mean(norms)), 4),
                                             "lr": float(schedule(step)),
                                             "train_seconds": round(train_seconds, 1)})
                progress.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{float(schedule(step)):.2e}",
                                     tok_s=f"{tokens / max(train_seconds, 1e-9):.0f}")
            progress.update(1)
            if evaluating and step < steps:
                t = time.perf_counter()
                result = run_eval(params, monitor)
                eval_seconds += time.perf_counter() - t
                record["evals"].append({"step": step, "loss": record["loss_curve"][-1]["loss"]
                                        if record["loss_curve"] else None,
                                        **{k: result[k] for k in ("rougeL_recall", "first_words_match") if k in result},
                                        "train_seconds": round(train_seconds, 1)})
                say(f"step {step}: loss {record['loss_curve'][-1]['loss']:.3f}, held-in {score_line(result)} "
                    f"(eval {time.perf_counter() - t:.0f} s); e.g. {result['samples'][0]['generated'][:90]!r}")
            record["steps_done"] = step
            record["epochs"] = tokens / epoch_tokens
            record["tokens_per_second"] = tokens / max(train_seconds, 1e-9)
            record["train_seconds"] = train_seconds
            record["eval_seconds"] = eval_seconds
            record["wall_seconds"] = wall_before + time.perf_counter() - t_start
            record["final_loss"] = float(np.mean(window)) if window else float("nan")
            if args.save_every_minutes and time.perf_counter() - last_save > 60 * args.save_every_minutes:
                flush()
                save(params, final=False)
                last_save = time.perf_counter()
            if deadline is not None and run_seconds > deadline:
                say(f"time budget reached after {step} of {steps} steps")
                break
    finally:
        progress.close()
    flush()
    record["final_loss"] = float(np.mean(window)) if window else float("nan")
    if step < steps and getattr(args, "stop_after", None) is not None:
        record["wall_seconds"] = wall_before + time.perf_counter() - t_start
        save(params, final=False)
        say(f"stopped after step {step} of {steps} (--stop-after); continue with --resume --out {out}")
        return dataclasses.replace(backbone, params=params, source=str(out)), record
    if args.final_eval:
        t = time.perf_counter()
        result = run_eval(params, load_selection(args.final_eval))
        eval_seconds += time.perf_counter() - t
        record["final_eval"] = {"selection": args.final_eval, "generation": gen, "prompt_generation": prompt_gen,
                               **result}
        say(f"final greedy generation: {score_line(result)}")
    record["eval_seconds"] = eval_seconds
    record["wall_seconds"] = wall_before + time.perf_counter() - t_start
    save(params, final=True)
    say(f"wrote {out}: {step} steps, {train_seconds:.0f} s training at "
        f"{record['tokens_per_second']:.0f} tokens/s, {record['wall_seconds']:.0f} s wall-clock")
    return dataclasses.replace(backbone, params=params, source=str(out)), record


def _tqdm_write(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)


def _progress(total: int, quiet: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=quiet, dynamic_ncols=True, mininterval=2.0, desc="train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="splits to train on: comma-separated NAME, NAME[start:stop] or NAME[start:stop:step] "
                        "(file order), each optionally *K (K times per epoch)")
    p.add_argument("--init", help="start from this checkpoint directory (architecture, weights and "
                                  "tokenizer); the optimizer and the schedule start fresh")
    p.add_argument("--tokenizer", help="tokenizer directory (experiments/build_tokenizer.py); "
                                       "default: the --init directory")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out where its last save left it (its own arguments; "
                        "--minutes, --stop-after and --quiet may change)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N more steps, leaving a resumable state in --out (time-sliced machines)")
    p.add_argument("--steps", type=int, help="optimizer steps (defines the lr schedule)")
    p.add_argument("--minutes", type=float,
                   help="time budget for training: without --steps, the step count is derived from "
                        "the measured step time; with it, training also stops at 1.15 x the budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="warm-up steps (default min(200, steps/10))")
    p.add_argument("--final-lr-fraction", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--batch-tokens", type=int, default=512, help="tokens per batch (rows x length)")
    p.add_argument("--min-eos", type=int, default=1, help="end-of-text tokens at least after an answer")
    p.add_argument("--answer-window", type=int, default=96,
                   help="longest answer window (answer + end-of-text) drawn per row and epoch; "
                        "generate with a gen length up to this")
    p.add_argument("--prompt-answer-window", type=int,
                   help="the same for completion-style prompt facts (CounterFact; default --answer-window); "
                        "generate those with a gen length up to this")
    p.add_argument("--length-multiple", type=int, default=16, help="row lengths round up to this")
    p.add_argument("--d-model", type=int, help="model width (new model; default 256)")
    p.add_argument("--layers", type=int, help="transformer blocks (default 6)")
    p.add_argument("--heads", type=int, help="attention heads (default 4)")
    p.add_argument("--mlp", type=int, help="SwiGLU hidden width (default 2 x d_model)")
    p.add_argument("--max-seq-len", type=int, default=512, help="config max_sequence_length")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=500, help="steps between held-in evaluations")
    p.add_argument("--eval-per-split", type=int, default=8,
                   help="held-in evaluation: the first K records of every split trained on")
    p.add_argument("--eval-gen-length", type=int, help="default: --answer-window")
    p.add_argument("--eval-block-length", type=int, default=32)
    p.add_argument("--eval-steps", type=int, help="denoising steps (default: half the gen length, 2 tokens per step)")
    p.add_argument("--final-eval", default=DEFAULT_FINAL_EVAL,
                   help="selection decoded greedily after training ('' to skip)")
    p.add_argument("--save-every-minutes", type=float, default=5.0)
    p.add_argument("--quiet", action="store_true", help="no progress bar (plain prints)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        train(args)
    except ports.UserError as e:
        print(f"train_tiny: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
