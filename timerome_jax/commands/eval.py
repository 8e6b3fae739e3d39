"""`timerome eval`: the TOFU / robustness metrics of a model, an edited model or an unlearned one.

    timerome eval --model M [--memory MEMDIR | --params DIR] --suite tofu-forget01 \\
        [--seeds 5 --mc-samples 32 --estimator mc_elbo --reference R] [--mesh dp8] --out DIR
    timerome eval --suite counterfact [--facts CASES] [--memory MEMDIR] --out DIR

`--suite counterfact` scores rewrite cases (--facts: EasyEdit's JSON array, JSONL or a packaged
selection; default the shipped counterfact[:400]) with EasyEdit's rewrite_acc / rephrase_acc /
locality and CounterFact's efficacy / paraphrase / neighborhood scores (`timerome_jax.rewrite`),
before and after the edit: DIR/metrics.json (each metric's mean, ci_low, ci_high over cases; the
unedited model's beside it; per-case rows).

Writes DIR/metrics.json (one entry per metric with mean, ci_low, ci_high, per_seed; 'config'; 'cost'
with the measured wall-clock and peak memory) and DIR/items.jsonl (per QA pair: generation, ROUGE-L,
LP per seed), and prints the metrics as a table. `--format open-unlearning` also writes
TOFU_EVAL.json and TOFU_SUMMARY.json (`timerome_jax.open_unlearning`); `--plot` writes
DIR/summary.png (`plots.evaluation_summary`). Definitions: `timerome_jax.metrics`,
docs/evaluation.md. With --mesh the models are loaded onto the mesh and the scored QA rows are
split over its 'data' axis (--pairs-per-call then counts rows per data shard); the numbers equal
the single-device run's (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import ports
from ports.fileio import atomic_directory
from timerome_jax import evaluate, likelihood, open_unlearning, plots, rewrite, sampler, suites
from timerome_jax import memory as mem
from timerome_jax.commands._mesh import Placement, add_mesh_argument
from timerome_jax.errors import InputError
from timerome_jax.tokenization import backbone_tokenizer, load_tokenizer, pad_token_id

# --quick: few QA pairs per split and few MC samples, for smoke tests (explicit flags win).
QUICK = {"limit": 4, "mc_samples": 4, "seeds": 2}
DEFAULTS = {"limit": None, "mc_samples": 32, "seeds": 5}


def register(sub, common) -> None:
    p = sub.add_parser("eval", parents=[common],
                       help="TOFU metrics (LP, truth ratio, forget quality, utility, ROUGE, robustness)")
    p.add_argument("--model", default="tofu-tiny", help="checkpoint directory or embedded name "
                   "(default tofu-tiny); with --params, where the tokenizer comes from if DIR has none")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--memory", metavar="MEMDIR", help="evaluate --model with this edit memory")
    which.add_argument("--params", metavar="DIR", help="evaluate this model directory (e.g. written "
                       "by `timerome unlearn`) instead of --model's weights")
    p.add_argument("--suite", default="tofu-forget01",
                   help=f"{' | '.join(suites.SUITES)} (default tofu-forget01), {COUNTERFACT} (rewrite cases, "
                   "see --facts), or a JSON file "
                   "{\"forget\": [...], \"retain\": [...], \"real_authors\": [...], \"world_facts\": [...]}")
    p.add_argument("--facts", default=None, help=f"with --suite {COUNTERFACT}: the rewrite cases (EasyEdit JSON "
                   "array, JSONL or a packaged selection; default counterfact, the 400 shipped cases)")
    p.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1 (default 5)")
    p.add_argument("--estimator", default="mc_elbo",
                   help=f"answer log-likelihood estimator: {' | '.join(likelihood.METHODS)}")
    p.add_argument("--mc-samples", type=int, default=None, help="MC-ELBO copies per pair (default 32)")
    p.add_argument("--reference", default=None, help="retain-twin model for forget quality "
                   "(default: tofu-tiny-retain for tofu-tiny; 'none' to skip)")
    p.add_argument("--num-retain", type=int, default=40, help="retain QA pairs (default 40)")
    p.add_argument("--limit", type=int, default=None, help="at most N QA pairs per split")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: --limit 4 --mc-samples 4 --seeds 2 unless given")
    p.add_argument("--truth-ratio-mean", choices=("geometric", "arithmetic"), default="geometric",
                   help="how the perturbed answers are combined (default geometric, open-unlearning)")
    p.add_argument("--gen-length", type=int, default=96, help="greedy generation for ROUGE: answer "
                   "tokens G (per split: the smallest multiple of --block-length holding the longest "
                   "reference answer + 1, at most G; default 96)")
    p.add_argument("--steps", type=int, default=48, help="denoising steps of that generation")
    p.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block length")
    p.add_argument("--pairs-per-call", type=int, default=8,
                   help="QA pairs per compiled call (per data shard with --mesh)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward")
    p.add_argument("--ci-method", choices=("percentile", "BCa"), default="percentile")
    p.add_argument("--format", default="timerome", help="timerome (metrics.json, items.jsonl) | open-unlearning "
                   "(also TOFU_EVAL.json and TOFU_SUMMARY.json with open-unlearning's metric names)")
    p.add_argument("--plot", action="store_true", help="also write summary.png (forget vs retain, MIA AUCs)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_mesh_argument(p)
    p.set_defaults(run=run, outputs=(("out", "dir"),))


def resolve_settings(args: argparse.Namespace) -> dict:
    base = QUICK if args.quick else DEFAULTS
    settings = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    if settings["seeds"] < 1:
        raise InputError(f"--seeds must be >= 1, got {settings['seeds']}")
    if settings["limit"] is not None and settings["limit"] < 1:
        raise InputError(f"--limit must be >= 1, got {settings['limit']}")
    return settings


def load_suite_arg(spec: str, num_retain: int) -> suites.Suite:
    if spec in suites.SUITES:
        return suites.load_suite(spec, num_retain=num_retain)
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"unknown suite {spec!r}: neither {', '.join(suites.SUITES)} nor a file")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the suite file {path}: {e}") from None
    return suites.suite_from_records(records, name=path.name)


def load_model(args: argparse.Namespace, placement: Placement):
    """(backbone, tokenizer) for --model / --memory / --params (an edited backbone for --memory),
    on the --mesh mesh when one is given."""
    if args.params:
        backbone = placement.load(args.params)
        if backbone.tokenizer_dir is not None:
            tokenizer = backbone_tokenizer(backbone)
        else:
            tokenizer = load_tokenizer(ports.resolve_model_path(args.model))
        return backbone, tokenizer
    backbone = placement.load(args.model)
    tokenizer = backbone_tokenizer(backbone)
    if args.memory:
        memory = mem.load(args.memory, backbone).memory
        if placement.mesh is not None:  # restored onto one device; the backbone's parameters are on the mesh
            from timerome_jax import distributed

            memory = distributed.replicate(memory, placement.mesh)
        backbone = backbone.with_edits(memory)
    return backbone, tokenizer


COUNTERFACT = "counterfact"


def run_counterfact(args: argparse.Namespace, settings: dict, placement: Placement, start: float) -> int:
    """`--suite counterfact`: the rewrite metrics of --model (with --memory) on --facts."""
    if args.params:
        raise InputError(f"--suite {COUNTERFACT} scores an edit memory: use --memory, not --params")
    if args.format != "timerome" or args.plot:
        raise InputError(f"--format open-unlearning and --plot apply to the TOFU suites, not to {COUNTERFACT}")
    likelihood.check_method("mc_elbo", settings["mc_samples"], args.batch_size)
    cases = rewrite.load_cases(args.facts or COUNTERFACT)[:settings["limit"]]
    backbone, tokenizer = load_model(args, placement)
    unedited = backbone.without_edits()
    pad_id = pad_token_id(tokenizer, backbone)
    score = lambda model: rewrite.case_metrics(model, unedited, tokenizer, cases, pad_id=pad_id,  # noqa: E731
                                               seeds=range(settings["seeds"]), mc_samples=settings["mc_samples"])
    print(f"timerome eval: scoring {len(cases)} case(s) unedited" + (" and edited" if args.memory else ""),
          file=sys.stderr)
    before = score(unedited)
    after = score(backbone) if args.memory else before
    summary, summary_before = rewrite.summarise(after), rewrite.summarise(before)
    result = {"suite": COUNTERFACT, "metrics": summary, "unedited": summary_before,
              "cases": [{"case": a["case"], "id": a["id"], "post": {k: a[k] for k in rewrite.METRICS},
                         "pre": {k: b[k] for k in rewrite.METRICS}} for a, b in zip(after, before)],
              "config": {"model": args.model, "memory": args.memory, "facts": args.facts or COUNTERFACT,
                         "cases": len(cases), "seeds": settings["seeds"], "mc_samples": settings["mc_samples"],
                         "fingerprint": unedited.fingerprint()},
              "cost": {"process_wall_clock_s": time.perf_counter() - start}}
    with atomic_directory(Path(args.out), overwrite=args.overwrite) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"{'metric':<20} {'unedited':>9} {'edited':>9}  95% CI (edited)")
    for name in rewrite.METRICS:
        if name in summary:
            m, b = summary[name], summary_before[name]
            ci = "" if m["ci_low"] is None else f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
            print(f"{name:<20} {b['mean']:>9.3f} {m['mean'] if args.memory else float('nan'):>9.3f}  {ci} (n={m['n']})")
    print(f"{COUNTERFACT}: {len(cases)} case(s), {settings['seeds']} seed(s), MC-ELBO M={settings['mc_samples']}; "
          f"{time.perf_counter() - start:.1f} s; wrote {Path(args.out) / 'metrics.json'}")
    return 0


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    settings = resolve_settings(args)
    if args.suite == COUNTERFACT:
        return run_counterfact(args, settings, Placement.from_args(args), start)
    if args.facts is not None:
        raise InputError(f"--facts goes with --suite {COUNTERFACT}; a TOFU suite brings its own facts")
    open_unlearning.check_format(args.format)
    likelihood.check_method(args.estimator, settings["mc_samples"], args.batch_size)
    if args.pairs_per_call < 1:
        raise InputError(f"--pairs-per-call must be >= 1, got {args.pairs_per_call}")
    sampler.check_schedule(args.gen_length, args.steps, args.block_length)
    placement = Placement.from_args(args)  # a bad --mesh stops here, before anything is loaded
    generation = evaluate.GenerationConfig(args.gen_length, args.steps, args.block_length)
    suite = load_suite_arg(args.suite, args.num_retain)
    out = Path(args.out)

    backbone, tokenizer = load_model(args, placement)
    reference, reference_tokenizer, reference_name, reason = evaluate.load_reference(
        args.reference, args.model, tokenizer, load=placement.load)
    from tqdm import tqdm

    result = evaluate.evaluate_suite(
        backbone, tokenizer, suite, seeds=range(settings["seeds"]), estimator=args.estimator,
        mc_samples=settings["mc_samples"], reference=reference,
        reference_tokenizer=reference_tokenizer, reference_name=reference_name,
        no_reference_reason=reason, truth_ratio_mean=args.truth_ratio_mean, limit=settings["limit"],
        generation=generation, pairs_per_call=args.pairs_per_call, batch_size=args.batch_size,
        ci_method=args.ci_method, mesh=placement.mesh,
        progress=lambda calls: tqdm(calls, desc="scoring", unit="call", file=sys.stderr, leave=False),
        stage=lambda name: print(f"timerome eval: {name}", file=sys.stderr))
    items = result.pop("items")
    result["config"].update({"model": args.model, "memory": args.memory, "params": args.params,
                             "fingerprint": backbone.fingerprint(), "quick": bool(args.quick),
                             "limit": settings["limit"], "mesh": args.mesh, "format": args.format})
    result["cost"]["process_wall_clock_s"] = time.perf_counter() - start
    with atomic_directory(out, overwrite=args.overwrite) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        (tmp / "items.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
        if args.format == "open-unlearning":
            for name, doc in zip((open_unlearning.EVAL_FILE, open_unlearning.SUMMARY_FILE),
                                 open_unlearning.documents(result, items)):
                (tmp / name).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        if args.plot:
            plots.evaluation_summary(result, tmp / "summary.png", title=f"{args.memory or args.params or args.model}"
                                     f" on {suite.name}")
    print(evaluate.metric_table(result))
    for warning in result["warnings"]:
        print(f"timerome eval: warning: {warning}", file=sys.stderr)
    cost = result["cost"]
    device_peak = cost["device_peak_bytes_in_use"]
    estimator = args.estimator + (f" (M={settings['mc_samples']})" if args.estimator == "mc_elbo" else "")
    print(f"{suite.name}: {settings['seeds']} seed(s), {estimator}; "
          f"{cost['process_wall_clock_s']:.1f} s wall-clock, peak RSS "
          f"{cost['peak_rss_bytes'] / 2**20:.0f} MiB"
          + ("" if device_peak is None else f", device peak {device_peak / 2**20:.0f} MiB")
          + f"; wrote {out / 'metrics.json'}")
    return 0
