"""Figure 4: the forget / retain trade-off of one edit memory swept over α and q, its Pareto
frontier, the training- and inference-time baselines as points, and two operating points.

    python experiments/pareto.py [--model tofu-tiny] [--quick] [--baselines runs/forget_table/results.json] \
        --out runs/pareto

One memory of every --forget fact is built at the traced coordinate (`_common.coordinate`), then
re-weighted for each (α, q) with `memory.with_hyperparameters` (no re-solve, and no recompilation:
the memory is a pytree argument of the jitted scorer). For each point: the forget drop
ForgetLP(no edit) − ForgetLP(edit) and the retain change RetainLP(edit) − RetainLP(no edit), in nats
per answer, MC-ELBO over --lp-seeds seeds with the same masks for both models (paired), mean over
pairs per seed, then the mean and a bootstrap 95 % CI over seeds (`_common.summary`). α = 0 is the
unedited model bit for bit (tests/test_memory.py), so its points reuse the no-edit scores.

Operating points: "utility_safe" is the point with the largest mean forget drop whose mean retain
change lies within --retain-tolerance nats of no edit; "max_forget" the largest mean forget drop
overall. The frontier is the set of points no other point beats on both axes.

--baselines reads the results.json of experiments/forget_table.py (`rows` of {"method",
"forget_lp", "retain_lp", ...} with a "no edit" row): each method is placed relative to that file's
own no-edit row (paired per seed when both rows list `per_seed` values of equal length; otherwise
the no-edit mean is taken as exact and the method's CI is shifted). A missing or unreadable file
gives no points and a note in results.json.

Writes pareto.png, results.json, results.md.

Cost of the defaults on tofu-tiny (40 forget facts, 40 retain pairs, 8 α × 3 q = 21 edited points
plus no edit, 5 seeds × 8 MC samples, trace of 8 facts with K = 8, R = 3): 22 scorings of 80 pairs
× 40 masked copies, ~70k sequences of ~60–90 tokens. The scorer ran at 8.2 ms per sequence on this
2-core CPU while a training job held it (measured here), about 3x faster idle (docs/tracing.md:
126 vs ~355 GFLOP/s): about 4 minutes idle, 10 minutes shared. `--quick` (3 facts, α ∈ {0, 1, 2},
q ∈ {3, 1}, 2 seeds × 2 samples, K = 2) took 45 s on the tiny fixture model with the cores shared.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from timerome_jax import api
from timerome_jax import memory as mem
from timerome_jax.errors import InputError

import _common
import _quick

DEFAULT_ALPHAS = "0,0.25,0.5,0.75,1,1.5,2,3"
QUICK = {"forget": "forget01_subjects[:3]", "retain": "retain90[:3]", "trace_facts": "forget01_subjects[:3]",
         "trace_steps": 2, "noise_samples": 2, "mc_samples": 2, "lp_seeds": 2, "alphas": "0,1,2"}


def q_values(text: str | None, n: int) -> list[int]:
    """--q-values, or n, n // 2, n // 4 (q = n: no sparsification), distinct, descending."""
    if not text:
        return sorted({v for v in (n, n // 2, n // 4) if v >= 1}, reverse=True)
    values = sorted(set(_common.parse_list(text, int, "--q-values")), reverse=True)
    for v in values:
        if not 1 <= v <= n:
            raise InputError(f"q must lie in 1..{n} (the number of forget facts), got {v}")
    return values


def scores(s: _common.Setup, backbone, sets: dict) -> dict[str, np.ndarray]:
    """Answer LP [seeds, pairs] of every fact set (same MC masks for every backbone)."""
    return {name: s.lp(backbone, pairs) for name, pairs in sets.items()}




def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points that no other point beats on both x and y (larger is better for
    both; a tie on one axis and a win on the other beats), sorted by x."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    at_least = (x[None, :] >= x[:, None]) & (y[None, :] >= y[:, None])       # [i, j]: j is at least i on both
    better = (x[None, :] > x[:, None]) | (y[None, :] > y[:, None])
    beaten = at_least & better
    front = np.flatnonzero(~beaten.any(axis=1))
    return front[np.argsort(x[front], kind="stable")]


def operating_points(points: list[dict], tolerance: float) -> dict:
    drops = np.array([p["forget_drop"]["mean"] for p in points])
    retain = np.array([p["retain_change"]["mean"] for p in points])
    safe = np.flatnonzero(np.abs(retain) <= tolerance)   # α = 0 (retain change 0) always qualifies
    chosen = {"utility_safe": int(safe[np.argmax(drops[safe])]), "max_forget": int(np.argmax(drops))}
    return chosen


def read_baselines(path: str | None) -> tuple[list[dict], str | None]:
    """Baseline points (forget drop, retain change vs the file's own no-edit row) and a note
    when the file is missing or not usable (then no points)."""
    if not path:
        return [], "no --baselines file given"
    try:
        payload = json.loads(Path(path).read_text())
        rows = payload["rows"]
        by_method = {r["method"]: r for r in rows}
    except FileNotFoundError:
        return [], f"baselines file {path} not found: no baseline points"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [], f"baselines file {path} is unreadable ({type(e).__name__}: {e}): no baseline points"
    if "no edit" not in by_method:
        return [], f"baselines file {path} has no 'no edit' row to measure changes from: no baseline points"
    base = by_method["no edit"]

    def change(row, metric, sign):
        r, b = row[metric], base[metric]
        seeds_r, seeds_b = r.get("per_seed"), b.get("per_seed")   # paired: same MC masks per seed
        if seeds_r and seeds_b and len(seeds_r) == len(seeds_b):
            return {**_common.summary(sign * (np.asarray(seeds_r) - np.asarray(seeds_b))), "paired": True}
        low, high = r.get("ci_low"), r.get("ci_high")
        bounds = ((None, None) if low is None or high is None
                  else sorted((sign * (low - b["mean"]), sign * (high - b["mean"]))))
        return {"mean": sign * (r["mean"] - b["mean"]), "ci_low": bounds[0], "ci_high": bounds[1], "paired": False}

    points, unscored = [], []
    try:
        for row in rows:
            if row["method"] == "no edit":
                continue
            if any(row[m].get("mean") is None or base[m].get("mean") is None for m in ("forget_lp", "retain_lp")):
                unscored.append(row["method"])   # a metric the table could not compute for this row
                continue
            points.append({"method": row["method"], "forget_drop": change(row, "forget_lp", -1.0),
                           "retain_change": change(row, "retain_lp", +1.0)})
    except (KeyError, TypeError, AttributeError) as e:
        return [], f"baselines file {path} has a malformed row ({type(e).__name__}: {e}): no baseline points"
    return points, (f"rows without ForgetLP or RetainLP left out: {', '.join(unscored)}" if unscored else None)


def error_bars(summaries: list[dict]) -> np.ndarray:
    """[2, N] distances from the mean to the CI ends (0 where there is no CI)."""
    out = np.zeros((2, len(summaries)))
    for i, s in enumerate(summaries):
        if s.get("ci_low") is not None:
            out[:, i] = [s["mean"] - s["ci_low"], s["ci_high"] - s["mean"]]
    return out


def figure(points: list[dict], front: np.ndarray, chosen: dict, baselines: list[dict], tolerance: float,
           n: int, path: Path) -> None:
    plt = _common.figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.axhspan(-tolerance, tolerance, color="tab:green", alpha=0.08, label=f"retain within ±{tolerance:g} nats")
    ax.axhline(0, color="grey", linewidth=0.6)
    for qi, q in enumerate(sorted({p["q"] for p in points}, reverse=True)):
        curve = sorted((p for p in points if p["q"] == q), key=lambda p: p["alpha"])
        xs = [p["forget_drop"] for p in curve]
        ys = [p["retain_change"] for p in curve]
        ax.errorbar([x["mean"] for x in xs], [y["mean"] for y in ys], xerr=error_bars(xs), yerr=error_bars(ys),
                    marker="o", markersize=4, capsize=2, linewidth=1.2,
                    label=f"TimeROME q = {q}" + (" (no sparsification)" if q == n else ""))
        if qi == 0:
            for p in curve:
                ax.annotate(f"α={p['alpha']:g}", (p["forget_drop"]["mean"], p["retain_change"]["mean"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=6, color="dimgrey")
    fx = [points[i]["forget_drop"]["mean"] for i in front]
    fy = [points[i]["retain_change"]["mean"] for i in front]
    ax.plot(fx, fy, "k--", linewidth=1.0, marker="o", markersize=9, markerfacecolor="none", label="Pareto frontier")
    for name, marker in (("utility_safe", "*"), ("max_forget", "P")):
        p = points[chosen[name]]
        ax.plot(p["forget_drop"]["mean"], p["retain_change"]["mean"], marker=marker, markersize=13, color="gold",
                markeredgecolor="black", linestyle="none",
                label=f"{name.replace('_', '-')}: α={p['alpha']:g}, q={p['q']}")
    for b in baselines:
        ax.errorbar([b["forget_drop"]["mean"]], [b["retain_change"]["mean"]], xerr=error_bars([b["forget_drop"]]),
                    yerr=error_bars([b["retain_change"]]), marker="s", markersize=5, capsize=2, color="tab:red",
                    linestyle="none")
        ax.annotate(b["method"], (b["forget_drop"]["mean"], b["retain_change"]["mean"]), textcoords="offset points",
                    xytext=(4, -9), fontsize=7, color="tab:red")
    ax.set_xlabel("forget drop −ΔForgetLP (nats per answer)")
    ax.set_ylabel("ΔRetainLP (nats per answer)")
    ax.set_title("forget / retain trade-off (bootstrap 95 % CIs over seeds)", fontsize=9)
    ax.legend(fontsize=6.5, loc="best")
    _common.save_figure(fig, path, dpi=130)


def markdown(points, front, chosen, baselines, note, coordinate, args) -> str:
    c = coordinate
    lines = [f"# Pareto sweep (Fig. 4): {args.model}", "",
             f"Memory of {points[0]['n_facts']} facts at layer {c.layer}, {c.module}, step {c.step}; "
             f"λ = {args.lam:g}; "
             f"{args.lp_seeds} seeds × {args.mc_samples} MC samples; mean [95 % CI] over seeds, nats per answer.", "",
             "| α | q | forget drop | retain change | frontier |", "|---|---|---|---|---|"]
    for i, p in enumerate(points):
        lines.append(f"| {p['alpha']:g} | {p['q']} | {_common.fmt(p['forget_drop'])} | "
                     f"{_common.fmt(p['retain_change'])} | {'yes' if i in set(front.tolist()) else ''} |")
    lines += ["", "| operating point | α | q | forget drop | retain change |", "|---|---|---|---|---|"]
    for name, i in chosen.items():
        p = points[i]
        lines.append(f"| {name} | {p['alpha']:g} | {p['q']} | {_common.fmt(p['forget_drop'])} | "
                     f"{_common.fmt(p['retain_change'])} |")
    lines += ["", "Baselines (relative to the baselines file's own no-edit row):", ""]
    if baselines:
        lines += ["| method | forget drop | retain change |", "|---|---|---|"]
        lines += [f"| {b['method']} | {_common.fmt(b['forget_drop'])} | {_common.fmt(b['retain_change'])} |"
                  for b in baselines]
        lines += ["", f"note: {note}"] if note else []
    else:
        lines.append(f"none: {note}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0], "runs/pareto")
    _common.add_memory_arguments(p)
    p.add_argument("--alphas", default=DEFAULT_ALPHAS, help="comma-separated α values")
    p.add_argument("--q-values", default=None, help="comma-separated q values (default: n, n//2, n//4)")
    p.add_argument("--baselines", default=None, help="results.json of experiments/forget_table.py")
    p.add_argument("--retain-tolerance", type=float, default=1.0,
                   help="utility-safe: |mean retain change| at most this many nats")
    # 8 MC samples (not 16) keep the 22 scorings of the defaults within ~10 minutes on 2 cores;
    # RealAuthorLP is optional here (--real-authors SPEC) for the same reason
    p.set_defaults(mc_samples=8, real_authors="")
    args = p.parse_args()
    if args.quick:
        _quick.apply_quick(p, args, QUICK)   # options typed on the command line win
    with _common.experiment(args) as out:
        start = time.perf_counter()
        alphas = _common.parse_list(args.alphas, float, "--alphas", valid=lambda a: bool(np.isfinite(a) and a >= 0),
                                    must="finite numbers >= 0")
        if {"alpha", "q"} & _quick.given_options(p):
            raise InputError("pareto sweeps α and q: give --alphas and --q-values, not --alpha or --q")
        if not np.isfinite(args.retain_tolerance) or args.retain_tolerance < 0:
            raise InputError(f"--retain-tolerance must be >= 0, got {args.retain_tolerance}")
        s = _common.setup(args)
        seconds = {}
        coordinate, coordinate_info = _common.coordinate(s)
        seconds["trace"] = time.perf_counter() - start

        forget = s.encode(args.forget)
        qs = q_values(args.q_values, forget.num_facts)
        tic = time.perf_counter()
        record = api.build_memory(s.backbone, s.tokenizer, forget, coordinate,
                                  api.MemorySpec(alpha=1.0, lam=args.lam, noise_samples=args.noise_samples),
                                  seed=args.seed)
        seconds["build_memory"] = time.perf_counter() - tic
        sets = {"forget": api.qa_pairs(s.tokenizer, forget.facts, "forget"),
                "retain": s.pairs(args.retain, "retain")}
        if args.real_authors:
            sets["real_authors"] = s.pairs(args.real_authors, "real_authors")

        tic = time.perf_counter()
        base = scores(s, s.backbone, sets)
        grid = [(a, q) for q in qs for a in sorted(set(alphas))]
        points = []
        for alpha, q in _common.progress(grid, "scoring (α, q)", "point"):
            edited = base if alpha == 0 else scores(
                s, s.backbone.with_edits(mem.with_hyperparameters(record.memory, alpha=alpha, q=q)), sets)
            points.append({"alpha": alpha, "q": q, "n_facts": forget.num_facts, "rescored": alpha != 0,
                           **_common.lp_changes(base, edited)})
        seconds["scoring"] = time.perf_counter() - tic

        front = pareto_front([p["forget_drop"]["mean"] for p in points], [p["retain_change"]["mean"] for p in points])
        for i, point in enumerate(points):
            point["on_frontier"] = bool(i in set(front.tolist()))
        chosen = operating_points(points, args.retain_tolerance)
        baselines, note = read_baselines(args.baselines)
        figure(points, front, chosen, baselines, args.retain_tolerance, forget.num_facts, out / "pareto.png")
        (out / "results.md").write_text(markdown(points, front, chosen, baselines, note, coordinate, args))

        operating = {}
        for name, i in chosen.items():
            point = points[i]
            operating[name] = {"alpha": point["alpha"], "q": point["q"], "lam": args.lam,
                               "coordinate": coordinate.as_dict(), "forget_drop": point["forget_drop"],
                               "retain_change": point["retain_change"], "point_index": i,
                               "is_no_edit": point["alpha"] == 0}
        operating["utility_safe"]["retain_tolerance"] = args.retain_tolerance
        seconds["total"] = time.perf_counter() - start
        _common.write_json(out / "results.json", {
            "experiment": "pareto (paper Fig. 4)", "model": args.model, "fingerprint": s.backbone.fingerprint(),
            "seed": args.seed, "quick": args.quick,
            "settings": {"alphas": sorted(set(alphas)), "q_values": qs, "lam": args.lam, "forget": args.forget,
                         "retain": args.retain, "real_authors": args.real_authors or None,
                         "trace_facts": args.trace_facts, "trace_steps": args.trace_steps,
                         "noise_samples": args.noise_samples, "mc_samples": args.mc_samples,
                         "lp_seeds": args.lp_seeds, "retain_tolerance": args.retain_tolerance,
                         "estimator": "mc_elbo"},
            "coordinate": coordinate_info, "forget_facts": list(forget.wheres),
            "no_edit": {name: _common.summary(values) for name, values in base.items()},
            "points": points, "frontier": front.tolist(), "operating_points": operating,
            "baselines": baselines, "baselines_file": args.baselines, "baselines_note": note,
            "seconds": seconds,
        })
        safe, most = points[chosen["utility_safe"]], points[chosen["max_forget"]]
        print(f"coordinate layer {coordinate.layer}, {coordinate.module}, step {coordinate.step}; "
              f"utility-safe α={safe['alpha']:g} q={safe['q']}: forget drop {_common.fmt(safe['forget_drop'])}, "
              f"retain {_common.fmt(safe['retain_change'])}; max-forget α={most['alpha']:g} q={most['q']}: "
              f"forget drop {_common.fmt(most['forget_drop'])}, retain {_common.fmt(most['retain_change'])}")


if __name__ == "__main__":
    main()
