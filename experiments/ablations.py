"""Ablations of the edit memory: what tracing, per-fact coordinates, the covariance regulariser,
sparsification and the propagated TIE each change, on the same facts and the same seeds.

    python experiments/ablations.py [--model tofu-tiny] [--quick] [--only a,b,c,d,e] --out runs/ablations

Every variant is an edit memory of the --forget facts (α = --alpha, λ = --lam, q = --q unless the
ablation varies it) scored against no edit: forget drop ForgetLP(no edit) − ForgetLP(edit) and
retain change RetainLP(edit) − RetainLP(no edit), nats per answer, MC-ELBO with the same masks for
every model (paired), mean over pairs per seed, then mean and bootstrap 95 % CI over --lp-seeds
seeds (`_common.summary`). The reference memory ("traced") sits at the traced coordinate of
--trace-facts (`_common.coordinate`); every capture uses the noise of `jax.random.key(--seed)`.

a. traced vs random coordinate: --random-draws memories at `baselines.inference.random_coordinate`
   (a layer other than ℓ*, a random module, step k*; draw seeds --seed, --seed+1, ...). The
   "random (mean)" row averages the draws' scores per seed and pair; `spread` gives their std and range.
b. single vs per-fact coordinates: the forget facts are traced themselves and each is captured at
   its own (layer, module, step) (`tracing.per_fact_coordinates`); facts sharing a (layer, module)
   form one memory and all memories act together (`Backbone.with_edits(*memories)`). Each fact's key and delta
   come from a capture of the whole forget set at that fact's coordinate, so σ and the noise equal
   the single memory's. The forget trace's own single coordinate is scored too when it differs
   from the traced one.
c. ridge (λ̃ I) vs covariance-regularised (λ̃ C) memory: C from --covariance-facts, which must be
   disjoint from --retain (`memory.retain_whitening`, then `memory.build(whitening=M)`).
d. q sweep at α = --alpha: --q-sweep values (default 1, n//4, n//2, n) via
   `memory.with_hyperparameters`.
e. teacher-forced vs propagated TIE of --trace-facts: both coordinates, the Pearson and Spearman
   correlations of the fact-averaged TIE maps [K, L, M], and the memory built at each coordinate.

Identical memories (same coordinate and hyperparameters) are scored once and shared by the rows
that use them. Writes ablations.png (bars with CIs), results.json, results.md.

Cost of the defaults on tofu-tiny (40 forget facts, 40 retain pairs, 5 seeds × 8 MC samples, K = 8,
R = 3): 10–11 scorings of 80 pairs × 40 masked copies (~35k sequences, 8.2 ms each measured with a
training job sharing the 2 cores, ~3x faster idle) and four traces: 8 facts teacher-forced twice
(~27 s each shared), the 40 forget facts (~2.3 min shared) and 8 facts propagated (~12x a
teacher-forced trace on the tiny fixture: ~5.4 min shared). About 5 minutes on an idle 2-core CPU,
~14 shared; `--only a,b,c,d` saves about 40 %. `--quick` took 94 s on the tiny fixture and 106 s on tofu-tiny, cores shared.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from timerome_jax import api, tracing
from timerome_jax import memory as mem
from timerome_jax.baselines import inference
from timerome_jax.errors import InputError

import _common
import _quick

ABLATIONS = {"a": "traced vs random coordinate", "b": "single vs per-fact coordinates",
             "c": "ridge vs covariance-regularised", "d": "q sweep", "e": "teacher-forced vs propagated TIE"}
QUICK = {"forget": "forget01_subjects[:3]", "retain": "retain90[:3]", "trace_facts": "forget01_subjects[:3]",
         "trace_steps": 2, "noise_samples": 2, "mc_samples": 2, "lp_seeds": 2, "random_draws": 2,
         "covariance_facts": "retain90[40:46]"}


def parse_only(text: str) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in ABLATIONS]
    if unknown or not chosen:
        raise InputError(f"--only takes a comma-separated subset of {','.join(ABLATIONS)}, got {text!r}")
    return [a for a in ABLATIONS if a in chosen]


def q_sweep(text: str | None, n: int) -> list[int]:
    if not text:
        return sorted({v for v in (1, n // 4, n // 2, n) if v >= 1})
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise InputError(f"--q-sweep must be comma-separated integers, got {text!r}") from None
    bad = [v for v in values if not 1 <= v <= n]
    if bad or not values:
        raise InputError(f"q must lie in 1..{n} (the number of forget facts), got {text!r}")
    return values




class Scorer:
    """Answer LPs [seeds, pairs] of every fact set, once per distinct edited model (`key`)."""

    def __init__(self, s: _common.Setup, sets: dict):
        self.s, self.sets, self.cache = s, sets, {}
        self.base = self.scores(s.backbone)

    def scores(self, backbone) -> dict:
        return {name: self.s.lp(backbone, pairs) for name, pairs in self.sets.items()}

    def edited(self, key, make_backbone) -> dict:
        if key not in self.cache:
            self.cache[key] = self.scores(make_backbone())
        return self.cache[key]

    def row(self, ablation: str, variant: str, key, make_backbone, **details) -> dict:
        return {"ablation": ablation, "variant": variant, **details,
                **_common.lp_changes(self.base, self.edited(key, make_backbone))}


def memory_key(coordinate: api.Coordinate, alpha: float, lam: float, q: int | None, n: int,
               kind: str = "ridge") -> tuple:
    """What makes two memories of the forget facts equal (q = n and q = None both keep every
    coefficient), so equal memories are scored once."""
    return (kind, coordinate.layer, coordinate.module, coordinate.step, float(alpha), float(lam),
            None if q in (None, n) else int(q))


def tie_correlation(a_FKLM: np.ndarray, b_FKLM: np.ndarray) -> dict:
    """Pearson and Spearman correlation of the fact-averaged TIE maps (flattened [K·L·M])."""
    from scipy import stats

    a, b = np.asarray(a_FKLM).mean(axis=0).ravel(), np.asarray(b_FKLM).mean(axis=0).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"pearson": None, "spearman": None, "note": "a constant TIE map has no correlation"}
    return {"pearson": float(np.corrcoef(a, b)[0, 1]), "spearman": float(stats.spearmanr(a, b).statistic)}


def ablation_a(ctx) -> list[dict]:
    s, args, c = ctx["s"], ctx["args"], ctx["coordinate"]
    rows = [ctx["traced_row"]("a", "traced coordinate")]
    draws, details = [], []
    for i in range(args.random_draws):
        draw_seed = args.seed + i
        drawn = inference.random_coordinate(s.backbone.config.n_layers, c, draw_seed)

        def make(draw_seed=draw_seed):
            record = inference.random_memory(s.backbone, ctx["forget"], c, jax.random.key(args.seed),
                                             seed=draw_seed, alpha=args.alpha, lam=args.lam, q=args.q,
                                             noise_samples=args.noise_samples)
            return s.backbone.with_edits(record.memory)

        key = memory_key(drawn, args.alpha, args.lam, args.q, ctx["forget"].num_facts)
        rows.append(ctx["scorer"].row("a", f"random coordinate, draw {i}", key, make, coordinate=drawn.as_dict(),
                                      draw_seed=draw_seed, per_draw=True))
        draws.append(ctx["scorer"].cache[key])
        details.append(drawn.as_dict())
    mean_scores = {name: np.mean([d[name] for d in draws], axis=0) for name in draws[0]}
    per_draw = rows[1:]
    spread = {metric: {"std": float(np.std([r[metric]["mean"] for r in per_draw])),
                       "min": float(min(r[metric]["mean"] for r in per_draw)),
                       "max": float(max(r[metric]["mean"] for r in per_draw))}
              for metric in ("forget_drop", "retain_change")}
    rows.append({"ablation": "a", "variant": f"random coordinate (mean of {len(draws)} draws)", "coordinate": details,
                 "spread": spread, **_common.lp_changes(ctx["scorer"].base, mean_scores)})
    return rows


def ablation_b(ctx) -> tuple[list[dict], dict]:
    s, args, c, forget = ctx["s"], ctx["args"], ctx["coordinate"], ctx["forget"]
    config = tracing.TraceConfig(steps=args.trace_steps, noise_samples=args.noise_samples)
    traced = api.trace(s.backbone, forget, config, seed=args.seed,
                       progress=lambda xs: _common.progress(xs, "tracing the forget facts", "chunk"))
    per_fact = tracing.per_fact_coordinates(tracing.selection_grid(traced.result), config.modules)
    key = jax.random.key(args.seed)
    captured = {}
    for where in sorted(set(per_fact), key=lambda x: (x.layer, x.module, x.step)):
        # the whole set at each distinct coordinate: σ and every fact's noise as in the single memory
        captured[where] = mem.capture(s.backbone, forget.batch, where, key, noise_samples=args.noise_samples)
    groups: dict[tuple[int, str], list[int]] = {}
    for i, where in enumerate(per_fact):
        groups.setdefault((where.layer, where.module), []).append(i)
    memories, group_info = [], []
    for (layer, module), facts in sorted(groups.items()):
        keys = np.stack([captured[per_fact[i]].keys[i] for i in facts])      # one entry per fact, in order
        deltas = np.stack([captured[per_fact[i]].deltas[i] for i in facts])
        q = None if args.q is None else min(args.q, len(facts))
        memory, _ = mem.build(keys, deltas, layer=layer, module=module, alpha=args.alpha, lam=args.lam, q=q)
        memories.append(memory)
        group_info.append({"layer": layer, "module": module, "facts": len(facts),
                           "steps": sorted({per_fact[i].step for i in facts}), "q": q,
                           "fact_ids": [forget.wheres[i] for i in facts]})
    stack_key = ("stack", tuple((g["layer"], g["module"], tuple(g["fact_ids"])) for g in group_info),
                 tuple(per_fact[i].step for i in range(len(per_fact))), args.alpha, args.lam, args.q)
    rows = [ctx["traced_row"]("b", "single coordinate (traced)")]
    own = traced.coordinate
    if own != c:
        rows.append(ctx["scorer"].row("b", "single coordinate (forget facts' own trace)",
                                      memory_key(own, args.alpha, args.lam, args.q, forget.num_facts),
                                      lambda: s.backbone.with_edits(ctx["build"](own).memory),
                                      coordinate=own.as_dict()))
    rows.append(ctx["scorer"].row("b", f"per-fact coordinates ({len(memories)} memories)", stack_key,
                                  lambda: s.backbone.with_edits(*memories),
                                  coordinate=[{k: g[k] for k in ("layer", "module", "steps", "facts")}
                                              for g in group_info]))
    info = {"per_fact_coordinates": [w.as_dict() | {"fact_id": f} for w, f in zip(per_fact, forget.wheres)],
            "memories": group_info, "forget_trace_coordinate": own.as_dict(), "forget_trace_seconds": traced.seconds,
            "distinct_coordinates": len(captured)}
    return rows, info


def covariance_facts_disjoint_from_retain(args) -> list:
    """The --covariance-facts, refused when one of them is scored in RetainLP (C would then be fit
    on the very inputs whose LP the ablation measures)."""
    covariance_facts = api.load_facts(args.covariance_facts)
    retain_texts = {f.texts() for f in api.load_facts(args.retain)}
    shared = [f.where for f in covariance_facts if f.texts() in retain_texts]
    if shared:
        raise InputError(f"--covariance-facts must be disjoint from --retain (the RetainLP set); both hold "
                         f"{len(shared)} fact(s), e.g. {shared[0]}")
    return covariance_facts


def ablation_c(ctx) -> tuple[list[dict], dict]:
    s, args, c = ctx["s"], ctx["args"], ctx["coordinate"]
    covariance_facts = covariance_facts_disjoint_from_retain(args)
    tic = time.perf_counter()
    whitening, info = mem.retain_whitening(s.backbone, s.tokenizer, covariance_facts, c, pad_id=s.pad_id,
                                           shrinkage=args.covariance_shrinkage)
    info["seconds"] = time.perf_counter() - tic
    info["covariance_facts"] = args.covariance_facts

    def make():   # the traced memory's entries, solved with λ̃ C (the whitening M of C) instead of λ̃ I
        entries = mem.capture(s.backbone, ctx["forget"].batch, c, jax.random.key(args.seed),
                              noise_samples=args.noise_samples)
        memory, _ = mem.build(entries.keys, entries.deltas, layer=c.layer, module=c.module, alpha=args.alpha,
                              lam=args.lam, q=args.q, whitening=whitening)
        return s.backbone.with_edits(memory)

    rows = [ctx["traced_row"]("c", "ridge (λ̃ I)"),
            ctx["scorer"].row("c", "covariance-regularised (λ̃ C)",
                              memory_key(c, args.alpha, args.lam, args.q, ctx["forget"].num_facts,
                                         kind=f"covariance:{args.covariance_facts}"),
                              make, coordinate=c.as_dict())]
    return rows, info


def ablation_d(ctx) -> list[dict]:
    s, args, c = ctx["s"], ctx["args"], ctx["coordinate"]
    n = ctx["forget"].num_facts
    rows = []
    for q in q_sweep(args.q_sweep, n):
        rows.append(ctx["scorer"].row(
            "d", f"q = {q}" + (" (no sparsification)" if q == n else ""), memory_key(c, args.alpha, args.lam, q, n),
            lambda q=q: s.backbone.with_edits(mem.with_hyperparameters(ctx["traced"]().memory, q=q)),
            coordinate=c.as_dict(), q=q))
    return rows


def ablation_e(ctx) -> tuple[list[dict], dict]:
    s, args = ctx["s"], ctx["args"]
    facts = s.encode(args.trace_facts)
    traces = {}
    for mode in ("teacher", "propagated"):
        config = tracing.TraceConfig(steps=args.trace_steps, noise_samples=args.noise_samples, mode=mode)
        traces[mode] = api.trace(s.backbone, facts, config, seed=args.seed,
                                 progress=lambda xs, mode=mode: _common.progress(xs, f"tracing ({mode})", "chunk"))
    rows = []
    for mode, label in (("teacher", "teacher-forced TIE coordinate"), ("propagated", "propagated TIE coordinate")):
        where = traces[mode].coordinate
        key = memory_key(where, args.alpha, args.lam, args.q, ctx["forget"].num_facts)
        rows.append(ctx["scorer"].row("e", label, key,
                                      lambda where=where: s.backbone.with_edits(ctx["build"](where).memory),
                                      coordinate=where.as_dict()))
    info = {mode: {"coordinate": t.coordinate.as_dict(), "best_cell_tie": t.best_cell_tie(),
                   "total_effect": t.total_effect(), "seconds": t.seconds} for mode, t in traces.items()}
    info["tie_map_correlation"] = tie_correlation(traces["teacher"].result.tie, traces["propagated"].result.tie)
    info["same_coordinate"] = traces["teacher"].coordinate == traces["propagated"].coordinate
    info["trace_facts"] = list(facts.wheres)
    return rows, info


def figure(rows: list[dict], path) -> None:
    plt = _common.figure()
    shown = [r for r in rows if not r.get("per_draw")]
    draws = [r for r in rows if r.get("per_draw")]
    colours = {a: plt.get_cmap("tab10")(i) for i, a in enumerate(ABLATIONS)}
    y = np.arange(len(shown))[::-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.38 * len(shown) + 1.4), sharey=True)
    for ax, metric, title in ((axes[0], "forget_drop", "forget drop −ΔForgetLP (nats)"),
                              (axes[1], "retain_change", "ΔRetainLP (nats)")):
        means = np.array([r[metric]["mean"] for r in shown])
        err = np.zeros((2, len(shown)))
        for i, r in enumerate(shown):
            if r[metric].get("ci_low") is not None:
                err[:, i] = [r[metric]["mean"] - r[metric]["ci_low"], r[metric]["ci_high"] - r[metric]["mean"]]
        ax.barh(y, means, xerr=err, color=[colours[r["ablation"]] for r in shown], alpha=0.8, capsize=2)
        random_row = [i for i, r in enumerate(shown) if r["ablation"] == "a" and r["variant"].startswith("random")]
        if random_row and draws:
            ax.plot([d[metric]["mean"] for d in draws], [y[random_row[0]]] * len(draws), "k.", markersize=5,
                    label="single draws")
            ax.legend(fontsize=7)
        ax.axvline(0, color="grey", linewidth=0.6)
        ax.set_xlabel(title)
    axes[0].set_yticks(y, [f"{r['ablation']}: {r['variant']}" for r in shown], fontsize=7)
    fig.suptitle("ablations (mean and bootstrap 95 % CI over seeds)", fontsize=9)
    _common.save_figure(fig, path, dpi=130)


def where_text(coordinate) -> str:
    if isinstance(coordinate, dict):
        return f"L{coordinate['layer']} {coordinate['module']} k{coordinate['step']}"
    if isinstance(coordinate, list):
        return "; ".join(f"L{c['layer']} {c['module']}" + (f" k{c['step']}" if "step" in c else
                                                           f" k{c['steps']} ({c['facts']} facts)") for c in coordinate)
    return ""


def markdown(rows, infos, coordinate, args) -> str:
    c = coordinate
    lines = [f"# Ablations: {args.model}", "",
             f"Reference memory at layer {c.layer}, {c.module}, step {c.step}; α = {args.alpha:g}, λ = {args.lam:g}, "
             f"q = {args.q or 'n'}; {args.lp_seeds} seeds × {args.mc_samples} MC samples; mean [95 % CI] over seeds, "
             f"nats per answer.", "",
             "| ablation | variant | coordinate | forget drop | retain change |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ablation']} | {r['variant']} | {where_text(r.get('coordinate'))} | "
                     f"{_common.fmt(r['forget_drop'])} | {_common.fmt(r['retain_change'])} |")
    if "a" in infos:
        sp = infos["a"]
        lines += ["", f"a. random draws: forget drop std {sp['forget_drop']['std']:.2f} "
                      f"(range {sp['forget_drop']['min']:.2f} to {sp['forget_drop']['max']:.2f}), retain change std "
                      f"{sp['retain_change']['std']:.2f} (range {sp['retain_change']['min']:.2f} to "
                      f"{sp['retain_change']['max']:.2f})."]
    if "b" in infos:
        lines += ["", f"b. per-fact coordinates: {len(infos['b']['memories'])} memories over "
                      f"{infos['b']['distinct_coordinates']} distinct (layer, module, step) coordinates; the forget "
                      f"facts' own single coordinate is {where_text(infos['b']['forget_trace_coordinate'])}."]
    if "c" in infos:
        lines += ["", f"c. C from {infos['c']['covariance_facts']} ({infos['c']['tokens']} key tokens, shrinkage "
                      f"{infos['c']['shrinkage']:g}), disjoint from the RetainLP set {args.retain}."]
    if "e" in infos:
        e = infos["e"]
        corr = e["tie_map_correlation"]
        pearson = "n/a" if corr["pearson"] is None else f"{corr['pearson']:.3f}"
        spearman = "n/a" if corr["spearman"] is None else f"{corr['spearman']:.3f}"
        lines += ["", f"e. teacher-forced coordinate {where_text(e['teacher']['coordinate'])} (TIE "
                      f"{e['teacher']['best_cell_tie']:.2f}, {e['teacher']['seconds']:.0f} s), propagated "
                      f"{where_text(e['propagated']['coordinate'])} (TIE {e['propagated']['best_cell_tie']:.2f}, "
                      f"{e['propagated']['seconds']:.0f} s); TIE maps: Pearson {pearson}, Spearman {spearman}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0], "runs/ablations")
    _common.add_memory_arguments(p)
    p.add_argument("--only", default=",".join(ABLATIONS), help="comma-separated subset of a,b,c,d,e")
    p.add_argument("--random-draws", type=int, default=3, help="a: random coordinates drawn")
    p.add_argument("--covariance-facts", default="retain90[40:160]",
                   help="c: retain facts of the key covariance C (disjoint from --retain)")
    p.add_argument("--covariance-shrinkage", type=float, default=1e-2, help="c: C + s·(tr C / d_k) I")
    p.add_argument("--q-sweep", default=None, help="d: comma-separated q values (default 1, n//4, n//2, n)")
    # 8 MC samples (not 16) keep the defaults within ~10 minutes on 2 cores; RealAuthorLP is
    # optional (--real-authors SPEC) for the same reason
    p.set_defaults(mc_samples=8, real_authors="")
    args = p.parse_args()
    if args.quick:
        _quick.apply_quick(p, args, QUICK)   # options typed on the command line win
    with _common.experiment(args) as out:
        start = time.perf_counter()
        chosen = parse_only(args.only)
        if args.random_draws < 1:
            raise InputError(f"--random-draws must be >= 1, got {args.random_draws}")
        if "c" in chosen:   # fail before the model loads
            covariance_facts_disjoint_from_retain(args)
        s = _common.setup(args)
        seconds = {}
        coordinate, coordinate_info = _common.coordinate(s)
        seconds["trace"] = time.perf_counter() - start
        forget = s.encode(args.forget)
        mem.check_hyperparameters(args.alpha, args.lam, args.q, forget.num_facts)
        sets = {"forget": api.qa_pairs(s.tokenizer, forget.facts, "forget"),
                "retain": s.pairs(args.retain, "retain")}
        if args.real_authors:
            sets["real_authors"] = s.pairs(args.real_authors, "real_authors")
        tic = time.perf_counter()
        scorer = Scorer(s, sets)
        seconds["no_edit_scoring"] = time.perf_counter() - tic

        built = {}

        spec = api.MemorySpec(alpha=args.alpha, lam=args.lam, q=args.q, noise_samples=args.noise_samples)

        def build(where: api.Coordinate) -> mem.MemoryRecord:
            if where not in built:
                built[where] = api.build_memory(s.backbone, s.tokenizer, forget, where, spec, seed=args.seed)
            return built[where]

        def traced_row(ablation: str, variant: str) -> dict:
            return scorer.row(ablation, variant, memory_key(coordinate, args.alpha, args.lam, args.q, forget.num_facts),
                              lambda: s.backbone.with_edits(build(coordinate).memory), coordinate=coordinate.as_dict())

        ctx = {"s": s, "args": args, "coordinate": coordinate, "forget": forget, "scorer": scorer, "build": build,
               "traced": lambda: build(coordinate), "traced_row": traced_row}
        runners = {"a": ablation_a, "b": ablation_b, "c": ablation_c, "d": ablation_d, "e": ablation_e}
        rows, infos = [], {}
        for name in _common.progress(chosen, "ablations", "ablation"):
            tic = time.perf_counter()
            result = runners[name](ctx)
            new_rows, info = result if isinstance(result, tuple) else (result, None)
            rows += new_rows
            if info is not None:
                infos[name] = info
            if name == "a":
                infos["a"] = new_rows[-1]["spread"]
            seconds[f"ablation_{name}"] = time.perf_counter() - tic
        seconds["total"] = time.perf_counter() - start

        figure(rows, out / "ablations.png")
        (out / "results.md").write_text(markdown(rows, infos, coordinate, args))
        _common.write_json(out / "results.json", {
            "experiment": "ablations", "model": args.model, "fingerprint": s.backbone.fingerprint(),
            "seed": args.seed, "quick": args.quick, "ablations": {a: ABLATIONS[a] for a in chosen},
            "settings": {"alpha": args.alpha, "lam": args.lam, "q": args.q, "forget": args.forget,
                         "retain": args.retain, "real_authors": args.real_authors or None,
                         "trace_facts": args.trace_facts, "trace_steps": args.trace_steps,
                         "noise_samples": args.noise_samples, "mc_samples": args.mc_samples,
                         "lp_seeds": args.lp_seeds, "random_draws": args.random_draws,
                         "covariance_facts": args.covariance_facts, "covariance_shrinkage": args.covariance_shrinkage,
                         "q_sweep": args.q_sweep, "estimator": "mc_elbo"},
            "coordinate": coordinate_info, "forget_facts": list(forget.wheres),
            "no_edit": {name: _common.summary(values) for name, values in scorer.base.items()},
            "rows": rows, "details": infos, "distinct_models_scored": len(scorer.cache) + 1, "seconds": seconds,
        })
        for r in rows:
            if not r.get("per_draw"):
                print(f"{r['ablation']}: {r['variant']:45s} forget drop {_common.fmt(r['forget_drop']):>24s}  "
                      f"retain change {_common.fmt(r['retain_change']):>24s}")


if __name__ == "__main__":
    main()
