"""`timerome unlearn`: run one baseline the paper compares against (docs/baselines.md).

    timerome unlearn --model M --method gradascent|graddiff|npo|simnpo|rmu --suite tofu-forget01 \\
        [--lr --max-steps --batch-size --seed ...] --out DIR
    timerome unlearn --model M --method steer|caa|random_memory --suite tofu-forget01 \\
        [--trace TRACEDIR | --coordinate L,MODULE,STEP] [--alpha --lam --q --seed] --out DIR

Training methods write a model directory (`timerome convert` layout: config.json, timerome.json,
orbax params, tokenizer files) plus `train_stats.json`; `ports.load_pretrained(DIR)` loads it.
Inference methods write a small directory (`kind`, `baseline.json`, `vector.npz` or `memory/`)
that `timerome_jax.baselines.load_inference_baseline(DIR, backbone)` attaches to the base model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax.numpy as jnp

import ports
from ports import checkpoint
from ports.fileio import atomic_directory
from timerome_jax import api, resources, suites, tracing
from timerome_jax.baselines import inference, training
from timerome_jax.errors import InputError

DEFAULT_MODEL = "tofu-tiny"
METHODS = training.TRAINING_METHODS + inference.INFERENCE_METHODS
STATS_FILE = "train_stats.json"


def register(sub, common) -> None:
    p = sub.add_parser("unlearn", parents=[common], help="run an unlearning baseline (training- or inference-time)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or embedded name")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--suite", required=True, help=f"one of {', '.join(suites.SUITES)}")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--seed", type=int, default=0, help="minibatch order, forward-process masks, RMU direction, "
                   "noise draws, random coordinate")
    p.add_argument("--num-forget", type=int, default=None, help="use the first N forget QA pairs (default: all)")
    p.add_argument("--num-retain", type=int, default=suites.DEFAULT_NUM_RETAIN,
                   help="retain set: the first N QA pairs of retain90")
    g = p.add_argument_group("training methods")
    g.add_argument("--lr", type=float, default=training.TrainConfig.lr, help="AdamW learning rate (> 0)")
    g.add_argument("--max-steps", type=int, default=training.TrainConfig.max_steps, help="step budget (>= 1)")
    g.add_argument("--batch-size", type=int, default=training.TrainConfig.batch_size,
                   help="forget (and retain) rows per step")
    g.add_argument("--eval-every", type=int, default=None, help="steps between convergence checks "
                   "(default: one epoch of the forget set)")
    g.add_argument("--patience", type=int, default=training.TrainConfig.patience,
                   help="plateau window W, in convergence checks")
    g.add_argument("--tol", type=float, default=training.TrainConfig.tol,
                   help="plateau: stop when ForgetLP fell by less than TOL nats over the last W checks")
    g.add_argument("--min-epochs", type=float, default=training.TrainConfig.min_epochs,
                   help="no plateau stop before this many epochs of the forget set")
    g.add_argument("--target-drop", type=float, default=None,
                   help="also stop once ForgetLP fell by this many nats from its initial value")
    g.add_argument("--mc-samples", type=int, default=training.TrainConfig.mc_samples,
                   help="MC-ELBO copies per QA pair of the convergence estimator")
    g.add_argument("--monitor-retain", action="store_true",
                   help="also record RetainLP at every convergence check (costs as much again)")
    g.add_argument("--weight-decay", type=float, default=training.TrainConfig.weight_decay)
    g.add_argument("--forget-weight", type=float, default=None, help="γ (default: the method's)")
    g.add_argument("--retain-weight", type=float, default=None, help="α (default: the method's)")
    g.add_argument("--beta", type=float, default=None, help="NPO / SimNPO β (default 0.1 / 4.5)")
    g.add_argument("--delta", type=float, default=0.0, help="SimNPO margin δ")
    g.add_argument("--rmu-layer", type=int, default=None, help="RMU layer ℓ (default: n_layers // 2)")
    g.add_argument("--rmu-coeff", type=float, default=training.RMU_COEFF,
                   help="RMU steering coefficient (default 2: target norm 2 x the mean activation norm)")
    g.add_argument("--rmu-scale", default="relative", choices=("relative", "absolute"), help="relative (c = coeff x mean ||h_frozen||) or "
                   "absolute (c = coeff)")
    g.add_argument("--answer-window", type=int, default=suites.DEFAULT_ANSWER_WINDOW,
                   help="largest answer + end-of-text window of a training row")
    i = p.add_argument_group("inference-time methods")
    source = i.add_mutually_exclusive_group()
    source.add_argument("--trace", metavar="DIR", help="the traced coordinate from DIR/summary.json")
    source.add_argument("--coordinate", help="LAYER,MODULE,STEP (default: trace the forget facts)")
    i.add_argument("--alpha", type=float, default=1.0, help="scale α of the added vector / memory")
    i.add_argument("--lam", type=float, default=0.1, help="random_memory: ridge λ (as timerome edit)")
    i.add_argument("--q", type=int, default=None, help="random_memory: sparsity q (as timerome edit)")
    i.add_argument("--steps", type=int, default=8, help="denoising steps K of the traced trajectories")
    i.add_argument("--noise-samples", type=int, default=10, help="noise draws R")
    i.add_argument("--noise-scale", type=float, default=3.0, help="ν: noise std in units of σ")
    i.add_argument("--k-min", type=int, default=0, help="when tracing: coordinate over steps >= k-min")
    i.add_argument("--facts-per-chunk", type=int, default=4)
    p.set_defaults(run=run, outputs=(("out", "dir"),))


def check_arguments(args: argparse.Namespace) -> None:
    """Every input error before any model is loaded (one InputError each)."""
    if args.method not in METHODS:
        raise InputError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    suites.check_suite(args.suite)
    if args.num_forget is not None and args.num_forget < 1:
        raise InputError(f"--num-forget must be >= 1, got {args.num_forget}")
    if args.num_retain < 0:
        raise InputError(f"--num-retain must be >= 0, got {args.num_retain}")
    if args.method in training.TRAINING_METHODS:
        if not math.isfinite(args.lr) or args.lr <= 0:
            raise InputError(f"--lr must be a finite number > 0, got {args.lr}")
        if args.max_steps < 1:
            raise InputError(f"--max-steps must be >= 1, got {args.max_steps}")
        train_config(args).validate()
    else:
        if not math.isfinite(args.alpha):
            raise InputError(f"--alpha must be finite, got {args.alpha}")
        for name in ("steps", "noise_samples", "facts_per_chunk"):
            if getattr(args, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.noise_scale < 0:
            raise InputError(f"--noise-scale must be >= 0, got {args.noise_scale}")


def train_config(args: argparse.Namespace) -> training.TrainConfig:
    return training.TrainConfig(
        method=args.method, lr=args.lr, max_steps=args.max_steps, batch_size=args.batch_size, seed=args.seed,
        weight_decay=args.weight_decay, forget_weight=args.forget_weight, retain_weight=args.retain_weight,
        beta=args.beta, delta=args.delta, rmu_layer=args.rmu_layer, rmu_coeff=args.rmu_coeff, rmu_scale=args.rmu_scale,
        eval_every=args.eval_every, patience=args.patience, tol=args.tol, min_epochs=args.min_epochs,
        target_drop=args.target_drop, mc_samples=args.mc_samples, monitor_retain=args.monitor_retain)


def _progress(row: dict) -> None:
    retain = f", RetainLP {row['retain_lp']:.2f}" if "retain_lp" in row else ""
    print(f"  step {row['step']}: ForgetLP {row['forget_lp']:.2f}{retain}", file=sys.stderr, flush=True)


def run_training(args: argparse.Namespace, backbone: ports.Backbone) -> int:
    tokenizer = api.tokenizer(backbone)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else backbone.config.eos_token_id
    if eos is None:
        raise InputError("the tokenizer and the model config name no end-of-text token")
    config = train_config(args)
    objective = config.objective(backbone.config.n_layers)
    needs_retain = objective.uses_retain or args.monitor_retain
    suite = suites.load_suite(args.suite, num_retain=args.num_retain if needs_retain else 1)
    rows = dict(tokenizer=tokenizer, eos_id=int(eos), max_len=backbone.config.max_seq_len,
                answer_window=args.answer_window)
    forget_records = suite.forget[:args.num_forget] if args.num_forget else suite.forget
    # row ids name the plain splits (forgetXX, retain90), whose QA pairs these are
    forget = suites.encode_rows(forget_records, score="answer", where=suites.SUITES[args.suite].removesuffix("_perturbed"),
                                **rows)
    retain = suites.encode_rows(suite.retain, score="window", where="retain90", **rows) if needs_retain else None
    result = training.train(backbone, forget, retain, config, progress=_progress)
    stats = {**result.stats, "suite": args.suite, "model": str(args.model), "fingerprint_before": backbone.fingerprint()}
    model_dir = Path(backbone.source)
    raw = checkpoint.read_config_json(model_dir)
    meta = {"family": backbone.config.family, "mask_token_id": backbone.mask_token_id,
            "dtype": jnp.dtype(backbone.dtype).name, "source": str(model_dir),
            "unlearn": {"method": args.method, "suite": args.suite, "stats": STATS_FILE}}
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        checkpoint.save_converted(tmp, result.params, raw, meta, tokenizer_source=model_dir)
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    print(f"{args.method} on {args.suite}: {stats['steps']} steps ({stats['stop_reason']}), ForgetLP "
          f"{stats['forget_lp_initial']:.2f} -> {stats['forget_lp_final']:.2f}"
          + (f", RetainLP {stats['retain_lp_initial']:.2f} -> {stats['retain_lp_final']:.2f}"
             if stats.get("retain_lp_final") is not None else "")
          + f"; {stats['wall_clock_seconds']:.1f} s (+{stats['compile_seconds']:.1f} s compile); wrote {args.out}")
    return 0


def traced_coordinate(args: argparse.Namespace, backbone: ports.Backbone, facts: api.Facts) -> tracing.Coordinate:
    L = backbone.config.n_layers
    if args.coordinate:
        return tracing.Coordinate.parse(args.coordinate, L, args.steps)
    if args.trace:
        return tracing.Coordinate.from_trace(args.trace, L)
    config = tracing.TraceConfig(steps=args.steps, noise_samples=args.noise_samples, noise_scale=args.noise_scale)
    c = api.trace(backbone, facts, config, seed=args.seed, k_min=args.k_min, facts_per_chunk=args.facts_per_chunk).coordinate
    print(f"traced: layer {c.layer}, step {c.step}, module {c.module}", file=sys.stderr)
    return c


def run_inference(args: argparse.Namespace, backbone: ports.Backbone) -> int:
    facts = api.encode(backbone, api.tokenizer(backbone), suites.forget_facts(args.suite, args.num_forget))
    if args.method == "random_memory":
        from timerome_jax import memory as mem
        mem.check_hyperparameters(args.alpha, args.lam, args.q, facts.num_facts)
    with resources.Measure() as cost:
        coordinate = traced_coordinate(args, backbone, facts)
        baseline = inference.build_inference_baseline(
            args.method, backbone, facts, coordinate, seed=args.seed, alpha=args.alpha, lam=args.lam,
            q=args.q, steps=args.steps, noise_samples=args.noise_samples, noise_scale=args.noise_scale,
            facts_per_chunk=args.facts_per_chunk)
    extra = {"suite": args.suite, "build_cost": cost.as_dict(),
             "device": resources.device_description()}
    inference.save_inference_baseline(baseline, args.out, model=str(Path(backbone.source).absolute()), extra=extra,
                                      overwrite=args.overwrite)
    c = baseline.coordinate
    print(f"{args.method} on {args.suite} ({facts.num_facts} facts): layer {c.layer}, module {c.module}, step "
          f"{c.step}, α={args.alpha:g}; built in {cost.seconds:.1f} s; wrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    backbone = ports.load_pretrained(args.model)
    if args.method in training.TRAINING_METHODS:
        return run_training(args, backbone)
    return run_inference(args, backbone)
