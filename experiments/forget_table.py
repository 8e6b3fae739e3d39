"""The paper's table on TOFU forget01: no edit, every baseline and TimeROME, scored by the code of
`timerome eval` (`evaluate.evaluate_suite`), with 95 % bootstrap CIs over seeds and the measured
cost of each method.

    python experiments/forget_table.py [--model tofu-tiny] [--operating-points runs/pareto/results.json]
        [--methods gradascent,...,timerome] [--seeds 3 --mc-samples 8 --limit 8] [--quick] --out runs/forget_table

Rows (`--methods`, default all; "no edit" always):
* no edit: the model as it is.
* gradascent, graddiff, npo, simnpo, rmu: `baselines.training.train` on the suite's forget set
  (and the first --num-retain retain90 pairs), each to its convergence rule (docs/baselines.md).
* steer, caa, random_memory: `baselines.inference.build_inference_baseline` at the traced
  coordinate, with the α (and, for random_memory, λ and q) of the TimeROME point named by
  --baseline-point (default utility_safe; the flags' point without --operating-points).
* TimeROME: the edit memory of `api.build_memory` over the forget facts at the traced
  coordinate, at the "utility-safe" and "max-forget" operating points read from
  `--operating-points` (results.json of experiments/pareto.py: `operating_points.utility_safe` /
  `.max_forget`, each with alpha, lam, q and optionally covariance), else one row at --alpha /
  --lam / --q (said so in results.md).

The coordinate is traced once (--trace-facts, as `timerome demo`) and shared by the inference
baselines and TimeROME; its cost is reported once (`trace`), not inside their rows.

Every row is evaluated by `evaluate.evaluate_suite` (seeds 0..--seeds-1 fix the MC-ELBO masks, so
all rows are scored on the same masks; the retain twin `tofu-tiny-retain` is the forget-quality
reference for tofu-tiny, as `timerome eval` resolves it): ForgetLP, RetainLP, RealAuthorLP,
forget quality, model utility, truth ratio, ROUGE-L, paraphrase and relearn LPs, each as mean and
95 % CI over seeds. Forget drop = ForgetLP(no edit) − ForgetLP(row) and retain change =
RetainLP(row) − RetainLP(no edit) are bootstrapped from the per-seed paired differences.

Cost per method, measured in this process with `resources.Measure` (wall-clock, peak RSS with the
VmHWM reset at the start of the phase): training rows report their training loop (steps and
convergence checks, `training.train`'s own measure) with the ahead-of-time compilation apart
(`compile_seconds`, `first_call_seconds`); inference-time and TimeROME rows build twice and report
the second build, so that no row pays for compiling a function another row shares
(`first_call_seconds` is the first build). Evaluation cost is in `eval_cost`.

Writes results.json (`rows`: one dict per method with every metric {mean, ci_low, ci_high,
per_seed, n_seeds}, forget_drop / retain_change / real_author_change, cost, eval_cost, settings),
results.md (the exact command, then the tables) and forget_table.png (forget drop and retain
change per method with CI error bars).

Cost of the defaults on tofu-tiny (3 seeds, M=8, 8 QA pairs per split, 40 forget facts, training
to convergence within 60 steps; 10 rows without --operating-points, 11 with), estimated from the
pieces of a measured --quick run (docs/RESULTS_DRAFT_table.md): about 900 CPU-seconds, i.e.
8–15 minutes on an idle 2-core CPU and about 30 minutes while a training run shares it. --limit 0
(every QA pair: 40 forget, 40 retain, 100 real-author, 117 world-fact) costs about 8x the
evaluation. --quick on the test fixture: about 40 CPU-seconds with three methods.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from timerome_jax import api, evaluate, metrics, resources, sampler, suites
from timerome_jax import memory as mem
from timerome_jax.baselines import inference, training
from timerome_jax.errors import InputError

import _common

TIMEROME = "timerome"
POINTS = {"utility_safe": "TimeROME (utility-safe)", "max_forget": "TimeROME (max-forget)"}
NO_EDIT = "no edit"

# --quick: a smoke run (explicit flags win, as in `timerome eval --quick`)
QUICK = dict(seeds=2, mc_samples=2, limit=2, num_forget=4, num_retain=4, max_steps=2, batch_size=2,
             train_mc_samples=2, min_epochs=0.0, trace_facts="forget01_subjects[:2]", trace_steps=4,
             noise_samples=2, gen_length=32, gen_steps=8, block_length=32)
DEFAULTS = dict(seeds=3, mc_samples=8, limit=8, num_forget=None, num_retain=40, max_steps=60, batch_size=8,
                train_mc_samples=4, min_epochs=5.0, trace_facts="forget01_subjects[:8]", trace_steps=8,
                noise_samples=3, gen_length=96, gen_steps=48, block_length=32)


# --- arguments shared with experiments/transfer.py ---------------------------------------------------

def add_evaluation_arguments(p: argparse.ArgumentParser) -> None:
    """Evaluation, trace and memory options (None = the --quick or default value)."""
    e = p.add_argument_group("evaluation (evaluate.evaluate_suite, as timerome eval)")
    e.add_argument("--seeds", type=int, default=None, help="MC seeds 0..N-1 (CIs over seeds; default 3)")
    e.add_argument("--mc-samples", type=int, default=None, help="MC-ELBO copies per QA pair (default 8)")
    e.add_argument("--limit", type=int, default=None,
                   help="QA pairs per split (default 8 in forget_table, 10 in transfer; 0 = all)")
    e.add_argument("--num-retain", type=int, default=None, help="retain QA pairs (retain90[:N], default 40)")
    e.add_argument("--reference", default=None, help="retain twin for forget quality (default: as "
                   "timerome eval, tofu-tiny-retain for tofu-tiny; 'none' to skip)")
    e.add_argument("--gen-length", type=int, default=None, help="greedy generation for ROUGE (default 96)")
    e.add_argument("--gen-steps", type=int, default=None, help="its denoising steps (default 48)")
    e.add_argument("--block-length", type=int, default=None, help="its block length (default 32)")
    t = p.add_argument_group("trace and memory")
    t.add_argument("--trace-facts", default=None,
                   help="facts traced for the coordinate (default forget01_subjects[:8])")
    t.add_argument("--coordinate", default=None, help="LAYER,MODULE,STEP: skip tracing")
    t.add_argument("--trace-steps", type=int, default=None, help="denoising steps K of the trace (default 8)")
    t.add_argument("--noise-samples", type=int, default=None,
                   help="noise draws R (trace, memory, baselines; default 3)")
    t.add_argument("--operating-points", metavar="PATH", default=None,
                   help="results.json of experiments/pareto.py (operating_points.utility_safe / .max_forget)")
    t.add_argument("--alpha", type=float, default=1.0, help="α without --operating-points")
    t.add_argument("--lam", type=float, default=0.1, help="λ without --operating-points")
    t.add_argument("--q", type=int, default=None, help="q without --operating-points (default n)")
    t.add_argument("--covariance", default=None, metavar="FACTS",
                   help="covariance-regularised memory over these retain facts (as timerome edit --covariance)")
    t.add_argument("--gate-rate", type=float, default=None, help="gated memory without --operating-points "
                   "(as timerome edit --gate-rate; needs --gate-facts)")
    t.add_argument("--gate-facts", default=None, metavar="FACTS", help="retain facts that calibrate the gate")
    t.add_argument("--capture-steps", default=None, help="keys at these steps ('all' or '0,3,7') without "
                   "--operating-points")
    t.add_argument("--key-positions", default=None, choices=("last", "subject"),
                   help="keys at the last or at every subject token without --operating-points (default last)")


def resolve(args: argparse.Namespace, quick: dict, defaults: dict) -> None:
    """Fill every None option from the --quick or default table (explicit flags win)."""
    base = quick if args.quick else defaults
    for name, value in base.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.limit == 0:
        args.limit = None


def check_evaluation_arguments(args: argparse.Namespace) -> None:
    for name in ("seeds", "mc_samples", "num_retain", "trace_steps", "noise_samples"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 0, got {args.limit}")
    sampler.check_schedule(args.gen_length, args.gen_steps, args.block_length)


# --- operating points --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Point:
    """One TimeROME configuration: row name, α, λ, q (None = n), covariance facts (None = plain
    ridge), where it came from, and optionally a gate (rate r calibrated on `gate_facts`,
    `memory.retain_gate`), the capture steps ('all' or steps; None = k*) and the key positions
    ('last' subject token or every 'subject' token)."""

    name: str
    alpha: float
    lam: float
    q: int | None
    covariance: str | None
    source: dict
    gate_rate: float | None = None
    gate_facts: str | None = None
    capture_steps: str | None = None
    key_positions: str = "last"
    sampler_capture: mem.SamplerCapture | None = None

    def describe(self) -> str:
        return (f"α={self.alpha:g}, λ={self.lam:g}, q={self.q if self.q is not None else 'n'}"
                + (f", covariance {self.covariance}" if self.covariance else "")
                + (f", keys at steps {self.capture_steps}" if self.capture_steps else "")
                + (", keys at every subject token" if self.key_positions == "subject" else "")
                + (f", and at sampler steps {','.join(map(str, self.sampler_capture.capture_steps))}"
                   if self.sampler_capture else "")
                + (f", gated at rate {self.gate_rate:g} on {self.gate_facts}" if self.gate_rate else ""))


def operating_points(args: argparse.Namespace, which=tuple(POINTS)) -> list[Point]:
    """The TimeROME rows: the `which` points of --operating-points, else one from the flags."""
    if not args.operating_points:
        return [Point("TimeROME", float(args.alpha), float(args.lam), args.q, args.covariance,
                      {"from": "flags --alpha/--lam/--q (no --operating-points given)"},
                      getattr(args, "gate_rate", None), getattr(args, "gate_facts", None),
                      getattr(args, "capture_steps", None), getattr(args, "key_positions", None) or "last")]
    path = Path(args.operating_points)
    try:
        points = json.loads(path.read_text())["operating_points"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"cannot read operating_points from {path}: {e}") from None
    out = []
    for key in which:
        if key not in POINTS:
            raise InputError(f"unknown operating point {key!r}; choose from {', '.join(POINTS)}")
        point = points.get(key) if isinstance(points, dict) else None
        if not isinstance(point, dict) or "alpha" not in point:
            raise InputError(f"{path}: operating_points has no {key!r} entry with an alpha")
        covariance = point.get("covariance", args.covariance)
        if covariance is True:
            covariance = args.covariance or "retain90[40:160]"  # not the scored retain90[:40]
        try:
            q = point.get("q")
            gate_rate = point.get("gate_rate")
            steps = point.get("capture_steps")
            out.append(Point(POINTS[key], float(point["alpha"]), float(point.get("lam", args.lam)),
                             None if q is None else int(q), covariance or None,
                             {"from": str(path), "key": key, "point": point},
                             None if gate_rate is None else float(gate_rate), point.get("gate_facts"),
                             None if steps is None else (steps if isinstance(steps, str)
                                                         else ",".join(str(int(k)) for k in steps)),
                             api.MemorySpec(key_positions=point.get("key_positions", "last")).key_positions,
                             None if point.get("sampler_capture") is None
                             else mem.SamplerCapture(**point["sampler_capture"])))
        except (TypeError, ValueError) as e:
            raise InputError(f"{path}: operating point {key!r} is malformed: {e}") from None
    return out


def build_timerome(backbone, tokenizer, facts, coordinate, point: Point, args, *, warm_up: bool = True):
    """(edited backbone, MemoryRecord, cost dict): the memory of `point` over `facts`, measured
    after a compiling first build (`measured`), or once, compilation included (warm_up=False)."""

    if point.gate_rate and not point.gate_facts:
        raise InputError(f"{point.name}: a gate rate needs gate facts to calibrate on")
    spec = api.MemorySpec(alpha=point.alpha, lam=point.lam, q=point.q, capture_steps=point.capture_steps,
                          key_positions=point.key_positions, sampler=point.sampler_capture,
                          gate_rate=point.gate_rate or None, noise_samples=args.noise_samples)

    def build():
        details = {"covariance": None, "gate": None}
        record = api.build_memory(
            backbone, tokenizer, facts, coordinate, spec, seed=args.seed,
            gate_facts=api.load_facts(point.gate_facts) if spec.gate_rate else None,
            covariance_facts=api.load_facts(point.covariance) if point.covariance else None,
            report=details.__setitem__)
        return record, details

    (record, details), cost = measured(build, warm_up=warm_up)
    return backbone.with_edits(record.memory), record, {**cost, **details}


# --- evaluation ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Evaluator:
    """`evaluate.evaluate_suite` with this run's settings and the forget-quality reference, resolved
    as `timerome eval` resolves it (`evaluate.load_reference`)."""

    args: argparse.Namespace
    tokenizer: object
    reference: object = None
    reference_tokenizer: object = None
    reference_name: str | None = None
    reason: str = ""

    @classmethod
    def for_model(cls, args: argparse.Namespace, model: str, tokenizer) -> "Evaluator":
        reference, ref_tokenizer, name, reason = evaluate.load_reference(args.reference, model, tokenizer)
        return cls(args, tokenizer, reference, ref_tokenizer, name, reason)

    def __call__(self, backbone, suite, desc: str, limit=None) -> dict:
        a = self.args
        return evaluate.evaluate_suite(
            backbone, self.tokenizer, suite, seeds=range(a.seeds), mc_samples=a.mc_samples,
            reference=self.reference, reference_tokenizer=self.reference_tokenizer,
            reference_name=self.reference_name, no_reference_reason=self.reason, limit=limit,
            generation=evaluate.GenerationConfig(a.gen_length, a.gen_steps, a.block_length),
            progress=lambda calls: _common.progress(calls, f"eval {desc}", "call"))


# ForgetLP(no edit) − ForgetLP(row): forgetting is a drop; the others are changes (row − no edit)
DIFFERENCES = {"forget_drop": ("forget_lp", -1.0), "retain_change": ("retain_lp", 1.0),
               "real_author_change": ("real_author_lp", 1.0)}


def metric_entries(result: dict) -> dict:
    """Every metric of `metrics.METRICS` from an evaluate_suite result (items dropped)."""
    return {name: result[name] for name in metrics.METRICS}


def paired(base: dict, result: dict, metric: str, sign: float) -> dict:
    """sign · (metric(row) − metric(base)) per seed (same MC masks), mean and bootstrap CI."""
    a, b = base[metric]["per_seed"], result[metric]["per_seed"]
    if a is None or b is None:
        return {"mean": None, "ci_low": None, "ci_high": None, "per_seed": None}
    return _common.summary(sign * (np.asarray(b) - np.asarray(a)))


def differences(base: dict, result: dict) -> dict:
    return {name: paired(base, result, metric, sign) for name, (metric, sign) in DIFFERENCES.items()}


def fmt(s: dict | None, spec: str = ".2f") -> str:
    """'mean [low, high]' (or 'n/a' for a metric that could not be computed)."""
    if s is None or s.get("mean") is None:
        return "n/a"
    if s.get("ci_low") is None:
        return f"{s['mean']:{spec}}"
    return f"{s['mean']:{spec}} [{s['ci_low']:{spec}}, {s['ci_high']:{spec}}]"


def error_bars(summaries: list[dict]) -> np.ndarray:
    """[2, N] distances from the mean to the CI ends (0 where there is no CI)."""
    return np.asarray([[0.0 if s["ci_low"] is None else s["mean"] - s["ci_low"] for s in summaries],
                       [0.0 if s["ci_high"] is None else s["ci_high"] - s["mean"] for s in summaries]])


# --- the rows ------------------------------------------------------------------------------------

def methods_argument(text: str) -> list[str]:
    known = list(training.TRAINING_METHODS) + list(inference.INFERENCE_METHODS) + [TIMEROME]
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in known]
    if unknown or not chosen:
        raise InputError(f"unknown method(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(known)}")
    return [m for m in known if m in chosen]  # table order


def train_config(args: argparse.Namespace, method: str):
    return training.TrainConfig(method=method, lr=args.lr, max_steps=args.max_steps, batch_size=args.batch_size,
                                seed=args.seed, mc_samples=args.train_mc_samples, min_epochs=args.min_epochs)


def run_training(s: _common.Setup, method: str, args: argparse.Namespace):
    """(trained backbone, cost, settings) of one training-time baseline, run to convergence."""
    eos = s.tokenizer.eos_token_id if s.tokenizer.eos_token_id is not None else s.backbone.config.eos_token_id
    if eos is None:
        raise InputError("the tokenizer and the model config name no end-of-text token")
    config = train_config(args, method)
    with resources.Measure() as outer:
        suite = suites.load_suite(args.suite, num_retain=args.num_retain)
        rows = dict(tokenizer=s.tokenizer, eos_id=int(eos), max_len=s.backbone.config.max_seq_len)
        # row ids name the plain splits (forgetXX, retain90), whose QA pairs these are
        forget = suites.encode_rows(suite.forget[:args.num_forget] if args.num_forget else suite.forget,
                                    score="answer", where=suites.SUITES[args.suite].removesuffix("_perturbed"), **rows)
        retain = suites.encode_rows(suite.retain, score="window", where="retain90", **rows)
        result = training.train(s.backbone, forget, retain, config)
    stats = result.stats
    keep = ("steps", "epochs", "stop_reason", "converged", "compile_seconds", "setup_seconds", "train_seconds",
            "eval_seconds", "seconds_per_step", "forget_lp_initial", "forget_lp_final", "trained_parameters")
    # the loop (steps + convergence checks) is the comparable cost; compilation is reported apart
    cost = {**stats["peak_memory"], "first_call_seconds": outer.seconds, **{k: stats[k] for k in keep}}
    return (dataclasses.replace(s.backbone, params=result.params), cost,
            {"config": dataclasses.asdict(config), "objective": stats["objective"],
             "evaluations": stats["evaluations"], "num_forget": stats["num_forget"],
             "num_retain": stats["num_retain"]})


def measured(build, *, warm_up: bool = True):
    """(build(), cost) measured by `resources.Measure`. With warm_up, `build` first runs once to
    compile (its wall-clock is `first_call_seconds`) and the measured run is the second, so that
    every method's `seconds` excludes compilation whichever method compiled a shared function first."""
    first = None
    if warm_up:
        start = time.perf_counter()
        build()
        first = time.perf_counter() - start
    with resources.Measure() as cost:
        out = build()
    return out, {**cost.as_dict(), "first_call_seconds": first, "compilation_excluded": warm_up}


def run_inference(s: _common.Setup, method: str, facts, coordinate, point: Point, args: argparse.Namespace):
    """(steered / edited backbone, cost, settings) of one inference-time baseline."""
    baseline, cost = measured(lambda: inference.build_inference_baseline(
        method, s.backbone, facts, coordinate, seed=args.seed, alpha=point.alpha,
        lam=point.lam, q=point.q, steps=args.trace_steps, noise_samples=args.noise_samples))
    settings = {"coordinate": baseline.coordinate.as_dict(), "traced_coordinate": coordinate.as_dict(),
                "alpha": point.alpha, "hyperparameters_from": point.name, **baseline.settings}
    return baseline.attach(s.backbone), cost, settings


def make_row(method: str, kind: str, result: dict, base: dict, cost: dict | None, settings: dict) -> dict:
    """One row of results.json: every metric, the paired differences against `base`, costs, settings."""
    row = {"method": method, "kind": kind, **metric_entries(result)}
    row.update(differences(base, result))
    row.update(cost=cost, eval_cost=result["cost"], settings=settings)
    return row


# --- outputs ------------------------------------------------------------------------------------

def mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:.0f} MiB"


def seconds(cost: dict | None) -> str:
    if cost is None or cost.get("seconds") is None:
        return "–"
    return f"{cost['seconds']:.1f} s" if cost["seconds"] >= 1 else f"{cost['seconds']:.2g} s"


def markdown(payload: dict) -> str:
    rows = payload["rows"]
    out = [f"# TOFU {payload['suite']}: every method, one evaluation", "", "```", payload["command"], "```", ""]
    st = payload["settings"]
    c, trace = payload["coordinate"], payload["trace"]
    where = "no coordinate (training methods only)" if c is None else (
        f"coordinate layer {c['layer']}, module {c['module']}, step {c['step']} "
        + (f"(traced in {trace['cost']['seconds']:.1f} s, shared by the inference rows)" if trace["traced"]
           else "(given)"))
    out.append(f"Model `{payload['model']}` (fingerprint {payload['fingerprint'][:12]}), seeds {st['seeds']}, "
               f"MC-ELBO M={st['mc_samples']}, {st['limit'] or 'all'} QA pairs per split, forget-quality "
               f"reference: {st['reference'] or 'none (' + st['no_reference_reason'] + ')'}; {where}.")
    out.append("")
    out.append("TimeROME operating points: " + "; ".join(
        f"{p['name']}: {Point(**p).describe()} (from {p['source']['from']})" for p in payload["operating_points"]))
    for p in payload["operating_points"]:
        tuned_at = (p["source"].get("point") or {}).get("coordinate")
        if tuned_at and c and tuned_at != c:
            out += ["", f"Note: {p['name']} was tuned at layer {tuned_at['layer']}, module {tuned_at['module']}, "
                    f"step {tuned_at['step']}, not at this run's coordinate; its α/λ/q are applied here unchanged."]
    out += ["", "Values: mean [95 % bootstrap CI] over seeds; LPs in nats per answer. Wall-clock and peak RSS: "
            "building the method (inference-time rows: a second, timed build after a first one that compiles) or "
            "its training loop (steps and convergence checks; ahead-of-time compilation apart), measured in this "
            "process; evaluation not included. The trace that finds the coordinate is a one-off cost shared by "
            "the inference-time rows (above).", ""]
    out.append("| method | ForgetLP | RetainLP | RealAuthorLP | forget quality | model utility | wall-clock "
               "| peak RSS |")
    out.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["cost"]
        out.append(f"| {r['method']} | {fmt(r['forget_lp'])} | {fmt(r['retain_lp'])} | {fmt(r['real_author_lp'])} | "
                   f"{fmt(r['forget_quality'], '.3g')} | {fmt(r['model_utility'], '.3g')} | {seconds(c)} | "
                   f"{mib(None if c is None else c['host_peak_rss_bytes'])} |")
    out += ["", "Paired differences against no edit (same MC masks per seed), and the other metrics:", ""]
    out.append("| method | forget drop | retain change | real-author change | truth ratio (forget) | ROUGE-L forget | "
               "ROUGE-L retain | paraphrase ForgetLP | relearn ForgetLP | training stop |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["cost"] or {}
        stop = f"{c['stop_reason']} after {c['steps']} steps" if "stop_reason" in c else "–"
        out.append(f"| {r['method']} | {fmt(r['forget_drop'])} | {fmt(r['retain_change'])} | "
                   f"{fmt(r['real_author_change'])} | {fmt(r['truth_ratio_forget'], '.3f')} | "
                   f"{fmt(r['rouge_forget'], '.3f')} | {fmt(r['rouge_retain'], '.3f')} | "
                   f"{fmt(r['paraphrase_forget_lp'])} | {fmt(r['relearn_forget_lp'])} | {stop} |")
    out += ["", f"Total wall-clock of this run: {payload['seconds']:.0f} s.", ""]
    return "\n".join(out)


KIND_COLOURS = {"training": "C1", "inference": "C2", "timerome": "C0", "none": "grey"}


def bar_figure(labels: list[str], panels: list[tuple[str, list[dict]]], path: Path, title: str,
               colours: list[str] | None = None) -> None:
    """One horizontal bar panel per (title, summaries): bars at the means, CI error bars."""
    plt = _common.figure()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(labels) + 1.6), sharey=True)
    y = np.arange(len(labels))
    for ax, (name, summaries) in zip(np.atleast_1d(axes), panels):
        # a metric that could not be computed is drawn as an empty slot, not as zero with a CI
        shown = [s if s["mean"] is not None else {"mean": 0.0, "ci_low": None, "ci_high": None} for s in summaries]
        ax.barh(y, [s["mean"] for s in shown], xerr=error_bars(shown), color=colours or "C0", capsize=3)
        ax.axvline(0, color="grey", linewidth=0.6)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("nats per answer")
    first = np.atleast_1d(axes)[0]
    first.set_yticks(y)
    first.set_yticklabels(labels, fontsize=8)
    first.invert_yaxis()
    fig.suptitle(title, fontsize=9)
    _common.save_figure(fig, path, dpi=120)


# --- main ----------------------------------------------------------------------------------------

def run(args: argparse.Namespace, command: str) -> dict:
    start = time.perf_counter()
    everything = training.TRAINING_METHODS + inference.INFERENCE_METHODS + (TIMEROME,)
    methods = methods_argument(args.methods or ",".join(everything))
    check_evaluation_arguments(args)
    suites.check_suite(args.suite)
    if args.num_forget is not None:
        if args.num_forget < 1:
            raise InputError(f"--num-forget must be >= 1, got {args.num_forget}")
        if args.limit is None or args.limit > args.num_forget:
            raise InputError("--limit must be <= --num-forget, so that every evaluated forget pair was edited")
    points = operating_points(args)
    baseline_point = next((p for p in points if p.source.get("key") == args.baseline_point), points[0])
    if args.baseline_alpha is not None:
        mem.check_hyperparameters(args.baseline_alpha, baseline_point.lam, None, 1)
        baseline_point = dataclasses.replace(baseline_point, alpha=float(args.baseline_alpha))

    forget_set = suites.forget_facts(args.suite)
    for point in points:  # each point's own regulariser and gate facts, against the scored sets
        _common.check_sets(args, forget=forget_set, retain=f"retain90[:{args.num_retain}]",
                           gate_facts=point.gate_facts or args.gate_facts, covariance=point.covariance)
    s = _common.setup(args)
    evaluate = Evaluator.for_model(args, args.model, s.tokenizer)
    suite = suites.load_suite(args.suite, num_retain=args.num_retain, limit=args.limit)
    facts = api.encode(s.backbone, s.tokenizer, suites.forget_facts(args.suite))  # forget01: its explicit subjects
    if args.num_forget:
        facts = facts.take(range(min(args.num_forget, facts.num_facts)))
    for point in points:
        mem.check_hyperparameters(point.alpha, point.lam, point.q, facts.num_facts)

    coordinate, trace = None, {"traced": False, "cost": None}
    if any(m in inference.INFERENCE_METHODS or m == TIMEROME for m in methods):
        with resources.Measure() as cost:
            coordinate, trace = _common.coordinate(s)
        trace["cost"] = cost.as_dict()

    plan = [(NO_EDIT, None)] + [(m, p) for m in methods for p in (points if m == TIMEROME else [None])]
    rows, base = [], None
    for method, point in _common.progress(plan, "methods", "method"):
        if method == NO_EDIT:
            model, kind, cost, settings = s.backbone, "none", None, {}
        elif method in training.TRAINING_METHODS:
            kind = "training"
            model, cost, settings = run_training(s, method, args)
        elif method in inference.INFERENCE_METHODS:
            kind = "inference"
            model, cost, settings = run_inference(s, method, facts, coordinate, baseline_point, args)
        else:
            kind, method = "timerome", point.name
            model, record, cost = build_timerome(s.backbone, s.tokenizer, facts, coordinate, point, args)
            settings = {"coordinate": coordinate.as_dict(), "alpha": point.alpha, "lam": point.lam, "q": point.q,
                        "covariance": point.covariance, "gate_rate": point.gate_rate,
                        "gate_facts": point.gate_facts, "capture_steps": point.capture_steps,
                        "key_positions": point.key_positions, "facts": len(set(record.fact_ids)),
                        "sampler_capture": None if point.sampler_capture is None else point.sampler_capture.as_dict(),
                        "memory_entries": record.memory.size,
                        "key_scale": record.key_scale, "source": point.source}
        result = evaluate(model, suite, method)
        base = base or result
        rows.append(make_row(method, kind, result, base, cost, settings))

    return {
        "experiment": "forget_table (paper Table: TOFU forget01, every method)",
        "command": command, "model": args.model, "fingerprint": s.backbone.fingerprint(), "suite": args.suite,
        "quick": bool(args.quick), "seed": args.seed,
        "settings": {"seeds": list(range(args.seeds)), "mc_samples": args.mc_samples, "limit": args.limit,
                     "num_retain": args.num_retain, "num_forget": args.num_forget,
                     "reference": evaluate.reference_name, "no_reference_reason": evaluate.reason,
                     "generation": {"gen_length": args.gen_length, "steps": args.gen_steps,
                                    "block_length": args.block_length},
                     "training": {"lr": args.lr, "max_steps": args.max_steps, "batch_size": args.batch_size,
                                  "mc_samples": args.train_mc_samples, "min_epochs": args.min_epochs,
                                  "num_retain": args.num_retain},
                     "trace": {"facts": args.trace_facts, "steps": args.trace_steps,
                               "noise_samples": args.noise_samples},
                     "inference_baselines_use": baseline_point.name, "inference_baselines_alpha": baseline_point.alpha,
                     "eval_config": base["config"]},
        "facts": {"edited": list(facts.wheres)},
        "coordinate": None if coordinate is None else coordinate.as_dict(),
        "trace": trace,
        "operating_points": [dataclasses.asdict(p) for p in points],
        "device": resources.device_description(),
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0], "runs/forget_table")
    p.add_argument("--suite", default="tofu-forget01", help="tofu-forget01 | tofu-forget05 | tofu-forget10")
    p.add_argument("--methods", default=None, help="comma-separated subset of gradascent,graddiff,npo,simnpo,rmu,"
                   "steer,caa,random_memory,timerome (default: all); 'no edit' is always a row")
    p.add_argument("--num-forget", type=int, default=None, help="edit / unlearn the first N forget facts (default all)")
    add_evaluation_arguments(p)
    g = p.add_argument_group("training-time baselines (baselines.training.train)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW rate (default 1e-4, docs/baselines.md for 5M models)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="step budget of the convergence rule (default 60: 12 epochs of forget01)")
    g.add_argument("--batch-size", type=int, default=None, help="forget (and retain) rows per step (default 8)")
    g.add_argument("--train-mc-samples", type=int, default=None, help="MC copies of the convergence check (default 4)")
    g.add_argument("--min-epochs", type=float, default=None, help="no plateau stop before this many epochs (default 5)")
    p.add_argument("--baseline-point", default="utility_safe", choices=tuple(POINTS),
                   help="with --operating-points: whose α/λ/q the inference baselines use")
    p.add_argument("--baseline-alpha", type=float, default=None,
                   help="α of the inference baselines instead of the point's (a gated memory's α is not a "
                   "steering vector's: docs/RESULTS_v3.md §2)")
    args = p.parse_args()
    resolve(args, QUICK, DEFAULTS)
    command = _common.command_line()
    with _common.experiment(args) as out:
        payload = run(args, command)
        _common.write_json(out / "results.json", payload)
        table = markdown(payload)
        (out / "results.md").write_text(table)
        rows = [r for r in payload["rows"] if r["method"] != NO_EDIT]
        bar_figure([r["method"] for r in rows],
                   [("forget drop: ForgetLP(no edit) − ForgetLP", [r["forget_drop"] for r in rows]),
                    ("retain change: RetainLP − RetainLP(no edit)", [r["retain_change"] for r in rows])],
                   out / "forget_table.png",
                   f"{payload['suite']} on {payload['model']} (mean and 95 % CI over {args.seeds} seeds; "
                   "orange: training-time, green: inference-time, blue: TimeROME)",
                   [KIND_COLOURS[r["kind"]] for r in rows])
        print(table)


if __name__ == "__main__":
    main()
