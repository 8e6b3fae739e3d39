"""Training baselines as forget / retain curves (issue #19): a learning-rate sweep per method, each
run to its convergence rule, every scored checkpoint an early-stopped model on the test splits.

    python experiments/baseline_curves.py [--methods gradascent,graddiff,npo,simnpo,rmu] \
        [--lrs 1e-4,3e-4,1e-3] [--heldout runs/heldout/results.json] --out runs/baseline_curves

Each method unlearns the test author (`--forget-part`, default the split table's `forget_b`: the facts
to forget are the method's input, as they are the memory's), with its retain regulariser on
`--regulariser-part` (default `retain_tune`), which no scored set shares (checked before loading). A
run stops by `baselines.training`'s rule: the forget LP on the training facts (MC-ELBO, fixed key)
moved less than --tol nats over --patience evaluations after --min-epochs, or --max-steps. At the
steps of --checkpoints (and at the last step) the model of that step is scored on the test
splits with paired MC masks: the forget drop on the forget author, the change on `--other-part`
(default `forget_a`, the other author) and on `--retain-part` (default `retain_test`), each as a mean
and a 95 % bootstrap CI over facts, with the share of retain facts losing more than 5 nats.

With --heldout (the results.json of experiments/heldout.py), the figure also places that run's
memories for the same test author (the recommended memory and its controls) beside the curves.
With --include (results.json files of earlier runs of this script) a sweep grows run by run: their
runs join this one's in the table and figure, after a check that they were scored the same way
(model fingerprint, seed, parts, MC seeds and samples) and that no (method, lr) is run twice.

Writes results.json (every run: config, stop reason, steps, per-checkpoint scores and per-fact
changes), results.md and curves.png (forget drop against retain change, one curve per method and
learning rate).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from timerome_jax import api, metrics, splits, suites
from timerome_jax import data as data_mod
from timerome_jax.baselines import training
from timerome_jax.errors import InputError

import _common
import _quick

QUICK = {"methods": "gradascent,npo", "lrs": "1e-4", "max_steps": 4, "checkpoints": "0,2", "lp_seeds": 2,
         "mc_samples": 2, "limit": 3, "eval_every": 2, "min_epochs": 0.0}


def records(selection: str, limit: int | None) -> list[dict]:
    rows = [r for _, _, r in data_mod.load_selection(selection)]
    return rows[:limit] if limit else rows


def change(base, edited, labels=None) -> dict:
    """Mean and 95 % CI over facts of edited − base (MC seeds averaged), and the tail of losses."""
    per_fact = (np.asarray(edited, np.float64) - np.asarray(base, np.float64)).mean(axis=0)
    mean, low, high = metrics.fact_bootstrap_ci(per_fact[None])
    return {"mean": mean, "ci_low": low, "ci_high": high, "per_fact": per_fact.tolist(),
            "tail": metrics.loss_tail(per_fact, labels)}


def heldout_points(path: str | None, test_author: str) -> tuple[list[dict], str | None]:
    """The memories of experiments/heldout.py for this test author, or ([], why not)."""
    if not path:
        return [], None
    try:
        payload = json.loads(Path(path).read_text())
        direction = next(d for d in payload["directions"] if d["test_author"] == test_author and d["results"])
    except (OSError, ValueError, KeyError, StopIteration) as e:
        return [], f"--heldout {path}: no results for test author {test_author} ({type(e).__name__})"
    return [{"memory": name, "forget_drop": r["forget_drop"]["mean"], "retain_change": r["retain_change"]["mean"],
             "other_author_change": r["other_author_change"]["mean"]}
            for name, r in direction["results"].items()], None


# what two runs must share for their checkpoints to sit on one figure: the same model, parts and
# paired MC masks (the no-edit LPs they are measured against are then the same numbers)
COMPARABLE = ("forget", "other", "retain", "regulariser", "lp_seeds", "mc_samples", "limit")
# what trained a run (its cap and convergence rule): recorded per run, since an included run may differ
TRAIN_SETTINGS = ("max_steps", "eval_every", "patience", "tol", "min_epochs", "batch_size")


def included_runs(paths: list[str], fingerprint: str, seed: int, settings: dict, own: list[tuple[str, float]]) -> list[dict]:
    """The runs of earlier results.json files (--include), refused with one error when one was
    scored otherwise than this run or repeats a (method, lr)."""
    runs, seen = [], set(own)
    for path in paths:
        try:
            payload = json.loads(Path(path).read_text())
            their = payload["settings"]
            differ = [k for k in COMPARABLE if their.get(k) != settings.get(k)]
            if payload["fingerprint"] != fingerprint:
                differ.insert(0, "model fingerprint")
            if payload["seed"] != seed:
                differ.append("seed")
            new = payload["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"--include {path}: not a results.json of baseline_curves.py ({type(e).__name__}: {e})") from None
        if differ:
            raise InputError(f"--include {path}: scored with another {', '.join(differ)} than this run; "
                             "its checkpoints would not be comparable")
        for run in new:
            if (run["method"], run["lr"]) in seen:
                raise InputError(f"--include {path}: {run['method']} at lr {run['lr']:g} is already in the sweep")
            seen.add((run["method"], run["lr"]))
            train = {k: their.get(k) for k in TRAIN_SETTINGS}
            runs.append({"train_settings": train, **run, "included_from": str(path)})
    return runs


def figure(runs: list[dict], memories: list[dict], path: Path) -> None:
    plt = _common.figure()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    # colour = method, line style and marker = learning rate: a sweep has more runs than a colour cycle
    methods = sorted({run["method"] for run in runs})
    lrs = sorted({run["lr"] for run in runs})
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    for ax, key, title in ((axes[0], "retain_change", "retain_test"), (axes[1], "other_author_change", "other author")):
        ax.axhline(0, color="grey", linewidth=0.6)
        for run in runs:
            xs = [c["forget_drop"]["mean"] for c in run["checkpoints"]]
            ys = [c[key]["mean"] for c in run["checkpoints"]]
            line, marker = styles[lrs.index(run["lr"]) % len(styles)]
            ax.plot(xs, ys, color=f"C{methods.index(run['method']) % 10}", linestyle=line, marker=marker,
                    markersize=3, linewidth=1, label=f"{run['method']} lr {run['lr']:g}")
        for m in memories:
            ax.scatter([m["forget_drop"]], [m[key]], marker="*", s=90, color="black", zorder=5)
            ax.annotate(m["memory"], (m["forget_drop"], m[key]), fontsize=7)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("forget drop (nats per answer)")
        ax.set_ylabel(f"{title} change (nats per answer)")
        ax.set_title(f"{title}: training baselines (curves) and memories (stars)", fontsize=9)
    axes[0].legend(fontsize=6, ncol=2)
    _common.save_figure(fig, path, dpi=130)


def markdown(payload: dict) -> str:
    st = payload["settings"]
    lines = [*_common.page_header("Training baselines as curves", payload),
             f"Forget `{st['forget']}`, regulariser `{st['regulariser']}`; scored on forget, other author "
             f"`{st['other']}` and retain `{st['retain']}` ({st['lp_seeds']} MC seeds × {st['mc_samples']} samples, "
             "paired); changes in nats per answer, [95 % CI] over facts. Convergence: forget LP on the training "
             f"facts moved < {st['tol']:g} nats over {st['patience']} evaluations (every {st['eval_every']} steps) "
             f"after {st['min_epochs']:g} epochs, or {st['max_steps']} steps.", "",
             "| method | lr | stop | steps | checkpoint step | forget drop | retain_test change | retain > 5 nats | "
             "other author change |", "|---|---|---|---|---|---|---|---|---|"]
    for run in payload["runs"]:
        for c in run["checkpoints"]:
            stop = run["stop_reason"] + (f" ({run['train_settings']['max_steps']})" if run["stop_reason"] == "max_steps" else "")
            lines.append(f"| {run['method']} | {run['lr']:g} | {stop} | {run['steps']} | {c['step']} | "
                         f"{_common.fmt(c['forget_drop'])} | {_common.fmt(c['retain_change'])} | "
                         f"{c['retain_change']['tail']['share_losing_over_5']:.0%} | {_common.fmt(c['other_author_change'])} |")
    if payload["memories"]:
        lines += ["", "Memories of experiments/heldout.py for the same test author (means):", "",
                  "| memory | forget drop | retain_test change | other author change |", "|---|---|---|---|"]
        lines += [f"| {m['memory']} | {m['forget_drop']:.2f} | {m['retain_change']:.2f} | {m['other_author_change']:.2f} |"
                  for m in payload["memories"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0], "runs/baseline_curves")
    p.add_argument("--methods", default=",".join(training.TRAINING_METHODS))
    p.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="AdamW learning rates of the sweep")
    p.add_argument("--forget-part", default="forget_b", help="split-table role the baselines unlearn (the test author)")
    p.add_argument("--other-part", default="forget_a", help="split-table role: the other author")
    p.add_argument("--retain-part", default="retain_test", help="split-table role whose LP should stay")
    p.add_argument("--regulariser-part", default="retain_tune", help="split-table role of the retain regulariser's data")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=5, help="steps between convergence checks")
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--tol", type=float, default=0.1)
    p.add_argument("--min-epochs", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--checkpoints", default="0,5,10,20,40,80,150",
                   help="steps whose models are scored on the test splits (the last step always is)")
    p.add_argument("--mc-samples", type=int, default=4)
    p.add_argument("--lp-seeds", type=int, default=2)
    p.add_argument("--heldout", default=None, help="results.json of experiments/heldout.py (memories as points)")
    p.add_argument("--limit", type=int, default=None, help="at most N facts per set (smoke runs)")
    p.add_argument("--include", default="", help="comma-separated results.json of earlier runs of this script "
                   "to add to the sweep (scored the same way; checked)")
    args = p.parse_args()
    if args.quick:
        _quick.apply_quick(p, args, QUICK)
    with _common.experiment(args) as out:
        start = time.perf_counter()
        methods = _common.parse_list(args.methods, str, "--methods")
        unknown = [m for m in methods if m not in training.TRAINING_METHODS]
        if unknown:
            raise InputError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(training.TRAINING_METHODS)}")
        lrs = _common.parse_list(args.lrs, float, "--lrs", valid=_common.positive, must="finite numbers > 0")
        checkpoints = set(_common.parse_list(args.checkpoints, int, "--checkpoints", valid=lambda v: v >= 0,
                                                   must="steps >= 0"))
        roles = {"forget": args.forget_part, "other": args.other_part, "retain": args.retain_part,
                 "regulariser": args.regulariser_part}
        selections = {name: splits.selection(role) for name, role in roles.items()}
        train_settings = {k: getattr(args, k) for k in TRAIN_SETTINGS}
        include = _common.parse_list(args.include, str, "--include") if args.include else []
        splits.check_disjoint(**selections)
        s = _common.setup(args)
        eos = s.tokenizer.eos_token_id if s.tokenizer.eos_token_id is not None else s.backbone.config.eos_token_id
        encode = dict(tokenizer=s.tokenizer, eos_id=int(eos), max_len=s.backbone.config.max_seq_len)
        forget_rows = suites.encode_rows(records(selections["forget"], args.limit), score="answer", where="forget01", **encode)
        regulariser = suites.encode_rows(records(selections["regulariser"], args.limit), score="window",
                                         where="retain90", **encode)
        facts = {name: api.load_facts(selections[name])[:args.limit] if args.limit else api.load_facts(selections[name])
                 for name in ("forget", "other", "retain")}
        pairs = {name: api.qa_pairs(s.tokenizer, f, name) for name, f in facts.items()}
        labels = {name: _common.fact_labels(f) for name, f in facts.items()}
        base = {name: s.lp(s.backbone, ps) for name, ps in pairs.items()}
        settings = {**{name: f"{role} = {selections[name]}" for name, role in roles.items()}, **train_settings,
                    "methods": methods, "lrs": lrs, "checkpoints": sorted(checkpoints), "lp_seeds": args.lp_seeds,
                    "mc_samples": args.mc_samples, "limit": args.limit}
        included = included_runs(include, s.backbone.fingerprint(), args.seed, settings,
                                 [(m, lr) for m in methods for lr in lrs])
        runs = []
        for method in methods:
            for lr in lrs:
                config = training.TrainConfig(method=method, lr=lr, max_steps=args.max_steps, batch_size=args.batch_size,
                                              seed=args.seed, eval_every=args.eval_every, patience=args.patience,
                                              tol=args.tol, min_epochs=args.min_epochs)
                scored = []

                def score(step, model):
                    lp = {name: s.lp(model, ps) for name, ps in pairs.items()}
                    scored.append({"step": step, "forget_drop": change(lp["forget"], base["forget"], labels["forget"]),
                                   "retain_change": change(base["retain"], lp["retain"], labels["retain"]),
                                   "other_author_change": change(base["other"], lp["other"], labels["other"])})

                def checkpoint(step, model):
                    if step in checkpoints:
                        score(step, model)
                    return {}

                tic = time.perf_counter()
                result = training.train(s.backbone, forget_rows, regulariser, config, checkpoint=checkpoint)
                stats = result.stats
                if not scored or scored[-1]["step"] != stats["steps"]:   # the run's last model, always
                    score(stats["steps"], dataclasses.replace(s.backbone, params=result.params))
                scored[-1]["final"] = True
                runs.append({"method": method, "lr": lr, "train_settings": train_settings, "stop_reason": stats["stop_reason"],
                             "converged": stats["converged"], "steps": stats["steps"], "epochs": stats["epochs"],
                             "seconds": time.perf_counter() - tic, "train_seconds": stats["train_seconds"],
                             "convergence_curve": [{"step": e["step"], "forget_lp": e["forget_lp"]}
                                                   for e in stats["evaluations"]],
                             "checkpoints": scored})
                print(f"{method} lr {lr:g}: {stats['stop_reason']} after {stats['steps']} steps; final forget drop "
                      f"{scored[-1]['forget_drop']['mean']:.2f}, retain_test {scored[-1]['retain_change']['mean']:+.2f}, "
                      f"other author {scored[-1]['other_author_change']['mean']:+.2f}", flush=True)
        runs += included
        memories, note = heldout_points(args.heldout, args.forget_part)
        payload = {"experiment": "training baselines as curves (LR sweep, early-stopped checkpoints)",
                   "command": _common.command_line(), "model": args.model, "fingerprint": s.backbone.fingerprint(),
                   "quick": args.quick, "seed": args.seed, "settings": settings,
                   "included": include,
                   "no_edit_lp": {name: _common.summary(v) for name, v in base.items()},
                   "runs": runs, "memories": memories, "memories_note": note,
                   "seconds": time.perf_counter() - start}
        _common.write_json(out / "results.json", payload)
        (out / "results.md").write_text(markdown(payload))
        figure(runs, memories, out / "curves.png")


if __name__ == "__main__":
    main()
