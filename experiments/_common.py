"""Shared plumbing for the paper-figure experiments: arguments, atomic output, JSON, progress.

Every experiment runs on the embedded model by default (`--model tofu-tiny`) and on a user's
checkpoint with `--model DIR`; `--quick` shrinks it to a smoke run of a few minutes or less.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from ports.errors import UserError
from timerome_jax.errors import InputError
from ports.fileio import atomic_directory


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="tofu-tiny", help="checkpoint directory or embedded model name")
    p.add_argument("--out", default=default_out, help="output directory (written atomically)")
    p.add_argument("--quick", action="store_true", help="reduced settings: a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def parse_list(text: str, kind, flag: str, *, valid=None, must: str = "", unique: bool = False) -> list:
    """A comma-separated option of `kind` values (float, int, str), one error naming `flag` for an
    unreadable, empty or invalid list. `valid` (value -> bool) with `must` (what valid values are,
    for the error); `unique` returns the distinct values in ascending order."""
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        noun = {float: "numbers", int: "integers"}.get(kind, "values")
        raise InputError(f"{flag} must be comma-separated {noun}, got {text!r}") from None
    if not values:
        raise InputError(f"{flag} is empty")
    if valid is not None and not all(valid(v) for v in values):
        raise InputError(f"{flag} must be {must}, got {text!r}")
    return sorted(set(values)) if unique else values


# the seed's falsifier ("What would settle it"): an edit fails when the forgotten facts' LP drops by
# less than forget_drop nats per answer, or when unrelated facts lose more than retain_loss
FALSIFIER = {"forget_drop": 40.0, "retain_loss": 5.0}


def positive(v: float) -> bool:
    return bool(np.isfinite(v) and v > 0)


def command_line() -> str:
    """The command that ran this experiment, as a user would type it (recorded in results)."""
    return "python " + " ".join(shlex.quote(a) for a in [f"experiments/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(jsonable(payload), indent=2) + "\n")


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs) with every array result ready, seconds)."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def progress(items, desc: str, unit: str = "it"):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, leave=False)


@contextlib.contextmanager
def experiment(args: argparse.Namespace):
    """Yield a temporary output directory; it becomes `args.out` only if the run succeeds.
    User errors print one line and exit 2, as the `timerome` CLI does."""
    start = time.perf_counter()
    try:
        with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
            yield tmp
    except UserError as e:
        print(f"{Path(sys.argv[0]).stem}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


# --- the shared setup of the memory experiments ----------------------------------------------------



@dataclasses.dataclass
class Setup:
    """The model and its tokenizer, and the fact sets every memory experiment scores."""

    args: argparse.Namespace
    backbone: object
    tokenizer: object
    pad_id: int

    def encode(self, spec: str):
        """The facts of a data selection or JSONL file, encoded for tracing (`api.encode`)."""
        from timerome_jax import api

        return api.encode(self.backbone, self.tokenizer, api.load_facts(spec))

    def pairs(self, spec: str, tag: str):
        from timerome_jax import api

        return api.qa_pairs(self.tokenizer, api.load_facts(spec), tag)

    def lp(self, backbone, pairs, seeds=None) -> np.ndarray:
        """Answer LP [seeds, pairs] (MC-ELBO, --mc-samples; paired masks across models)."""
        from timerome_jax import api

        seeds = range(self.args.lp_seeds) if seeds is None else seeds
        return api.score_pairs(backbone, pairs, list(seeds), pad_id=self.pad_id, mc_samples=self.args.mc_samples)


def add_memory_arguments(p: argparse.ArgumentParser, *, forget: str = "forget01_subjects",
                         retain: str = "retain90[:40]") -> None:
    """Options shared by the memory experiments (trace settings fixed at the demo's defaults)."""
    p.add_argument("--trace-facts", default="forget01_subjects[:8]", help="facts traced to find the coordinate")
    p.add_argument("--coordinate", default=None, help="LAYER,MODULE,STEP: skip tracing")
    p.add_argument("--trace-steps", type=int, default=8, help="denoising steps K of the trace")
    p.add_argument("--noise-samples", type=int, default=3, help="noise draws R (trace and memory deltas)")
    p.add_argument("--forget", default=forget, help="facts to forget (data selection or JSONL)")
    p.add_argument("--retain", default=retain, help="facts whose LP should not move")
    p.add_argument("--real-authors", default="real_authors[:40]", help="RealAuthorLP facts ('' to skip)")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--q", type=int, default=None)
    p.add_argument("--mc-samples", type=int, default=16, help="MC-ELBO samples per answer")
    p.add_argument("--lp-seeds", type=int, default=5, help="MC seeds (bootstrap CIs over seeds)")


# the fact sets a memory experiment scores or chooses on; no two may share a fact (issue #19)
SET_ARGUMENTS = ("forget", "retain", "real_authors", "gate_facts", "covariance")


def check_sets(args: argparse.Namespace, **extra) -> None:
    """One error (`splits.check_disjoint`) when two of the experiment's fact sets share a fact:
    the `SET_ARGUMENTS` it has, plus `extra` (name -> selection or facts), empty ones skipped."""
    from timerome_jax import splits

    sets = {name: getattr(args, name) for name in SET_ARGUMENTS if getattr(args, name, None)}
    sets.update({name: value for name, value in extra.items() if value})
    splits.check_disjoint(**sets)


def setup(args: argparse.Namespace) -> Setup:
    """Load --model after checking that the experiment's fact sets are disjoint (`check_sets`)."""
    import ports
    from timerome_jax import api
    from timerome_jax.tokenization import pad_token_id

    check_sets(args)

    backbone = ports.load_pretrained(args.model)
    tokenizer = api.tokenizer(backbone)
    return Setup(args, backbone, tokenizer, pad_token_id(tokenizer, backbone))


def coordinate(s: Setup) -> tuple[object, dict]:
    """(coordinate, info): --coordinate, else the trace of --trace-facts (seed --seed)."""
    from timerome_jax import api

    if s.args.coordinate:
        c = api.Coordinate.parse(s.args.coordinate, s.backbone.config.n_layers, s.args.trace_steps)
        return c, {"coordinate": c.as_dict(), "traced": False}
    facts = s.encode(s.args.trace_facts)
    config = api.TraceConfig(steps=s.args.trace_steps, noise_samples=s.args.noise_samples)
    traced = api.trace(s.backbone, facts, config, seed=s.args.seed,
                       progress=lambda xs: progress(xs, "tracing", "chunk"))
    return traced.coordinate, {"coordinate": traced.coordinate.as_dict(), "traced": True,
                               "trace_facts": list(facts.wheres), "trace_seconds": traced.seconds,
                               "best_cell_tie": traced.best_cell_tie(), "total_effect": traced.total_effect()}


def summary(values_S: np.ndarray) -> dict:
    """Mean over pairs per seed, then mean and bootstrap 95 % CI over seeds (metrics.bootstrap_ci)."""
    from timerome_jax import metrics

    per_seed = np.asarray(values_S, np.float64)
    per_seed = per_seed.mean(axis=-1) if per_seed.ndim == 2 else per_seed
    mean, low, high = metrics.bootstrap_ci(per_seed)
    return {"mean": mean, "ci_low": low, "ci_high": high, "per_seed": per_seed.tolist()}


def lp_changes(base: dict, edited: dict, labels: dict | None = None) -> dict:
    """Forget drop and retain (and real-author) change against no edit, paired per seed, with the
    edited LPs; `base` maps 'forget', 'retain'[, 'real_authors'] to LPs [seeds, pairs], `edited`
    the same, or [builds, seeds, pairs] for memories built with several noise seeds (the per-seed
    summaries then average the builds).

    With per-pair LPs, the forget drop and the retain change are also summarised over facts (issue
    #19): mean and bootstrap CI over facts and builds (`*_over_facts`, `metrics.fact_bootstrap_ci`),
    and the retain change's tail (`retain_tail`: the share of retain facts losing more than 1 and 5
    nats and the worst five, named by `labels['retain']` when given)."""
    from timerome_jax import metrics

    def change(name, sign):  # edited − base (sign +1) or base − edited (-1), [builds, seeds, pairs]
        e = np.asarray(edited[name], np.float64)
        e = e[None] if e.ndim == np.asarray(base[name]).ndim else e
        return sign * (e - np.asarray(base[name], np.float64)[None])

    def over_seeds(x):  # builds averaged: what `summary` reads per seed
        return x.mean(axis=0)

    drop, retain = change("forget", -1.0), change("retain", 1.0)
    out = {"forget_drop": summary(over_seeds(drop)), "retain_change": summary(over_seeds(retain)),
           "forget_lp": summary(over_seeds(-drop) + np.asarray(base["forget"])),
           "retain_lp": summary(over_seeds(retain) + np.asarray(base["retain"]))}
    if "real_authors" in base:
        out["real_authors_change"] = summary(over_seeds(change("real_authors", 1.0)))
    if retain.ndim == 3:
        out["builds"] = int(retain.shape[0])
        for key, x in (("forget_drop", drop), ("retain_change", retain)):
            mean, low, high = metrics.fact_bootstrap_ci(x.mean(axis=1))  # MC seeds averaged: [builds, facts]
            out[f"{key}_over_facts"] = {"mean": mean, "ci_low": low, "ci_high": high}
        out["retain_tail"] = metrics.loss_tail(retain.mean(axis=(0, 1)), (labels or {}).get("retain"))
    return out


# a greedy answer with ROUGE-L recall ≥ this against the reference "reproduces" it
REPRODUCED = 0.9


def rouge_scores(s: Setup, backbone, pairs, args) -> np.ndarray:
    """ROUGE-L recall of each greedy answer against its reference [len(pairs)] (the schedule of
    args.gen_length / gen_steps / block_length)."""
    from timerome_jax import evaluate, metrics

    prompts = [p.prompt_ids for p in pairs]
    answers = evaluate.generate_answers(backbone, s.tokenizer, prompts, gen_length=args.gen_length,
                                       steps=args.gen_steps, block_length=args.block_length, batch_size=64,
                                       pad_id=s.pad_id)
    references = [s.tokenizer.decode(list(p.answer_ids)) for p in pairs]
    return np.asarray([metrics.rouge_l_recall(a, r) for a, r in zip(answers, references)])


def page_header(title: str, payload: dict) -> list[str]:
    """The first lines of an experiment's results.md: title with model and fingerprint, the command."""
    return [f"# {title}: {payload['model']} ({payload['fingerprint']})", "", f"Command: `{payload['command']}`", ""]


def fact_labels(facts) -> list[str]:
    """'where: question' of each fact, for the worst-facts lists."""
    return [f"{f.where}: {' '.join(f.prompt.split())[:100]}" for f in facts]


def fmt_tail(tail: dict) -> str:
    """'a % > 1, b % > 5 nats' of a `metrics.loss_tail`."""
    return f"{tail['share_losing_over_1']:.0%} > 1, {tail['share_losing_over_5']:.0%} > 5"


def fmt(s: dict) -> str:
    """'mean [low, high]' of a `summary`."""
    if s.get("ci_low") is None:
        return f"{s['mean']:.2f}"
    return f"{s['mean']:.2f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}]"


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Lay out, write and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
