"""Figure 3: sequential insertion. Facts enter one edit memory one at a time, for α ∈ {0.5, 1},
and after each insertion ForgetLP, the LP of the facts not inserted yet, RetainLP and
RealAuthorLP are measured against the unedited model.

    python experiments/sequential.py [--model tofu-tiny] [--alphas 0.5,1] [--every 10] [--quick] \\
        --out runs/sequential

What it does. The coordinate (ℓ*, m*, k*) is traced once on --trace-facts (or given with
--coordinate); the keys and deltas of every --forget fact are captured once at it
(`memory.capture`, seed --seed). The memory is then grown on the sequential path:
`memory.build` of the first fact, then `memory.insert` of each next fact in file order (one
Schur-complement update each, never a rebuild). λ̃ = λ · ‖k_1‖² is fixed by that first build (a
sequential memory knows no later keys); `key_scale_all_facts` records mean ‖k‖² over every fact
for comparison, and `sequential_vs_batch` checks that the final memory equals a batch build of
all facts with the same λ̃. Insertion does not depend on α, so one memory is grown and every α
reads it through `memory.with_hyperparameters`.

Measured after insertion n ∈ {1, every, 2·every, ..., N} (and N): with MC-ELBO (`Setup.lp`,
--mc-samples copies, --lp-seeds seeds; the masks depend on (seed, pair) only, so every step and
the unedited model are scored on the same masks):
* ForgetLP: mean answer LP over the n facts inserted so far (the paper's Fig. 3 metric), next to
  the unedited LP of the same n facts;
* spill-over control: mean LP of the N − n facts not inserted yet, edited vs unedited;
* RetainLP (--retain, default retain90[:40]) and RealAuthorLP (--real-authors).
Every number is a `_common.summary` (mean over pairs per seed, bootstrap 95 % CI over seeds);
changes vs no edit are paired per seed. `max_abs_retain_change` per α is the largest
|mean RetainLP change| over the measured steps (the paper's claim: within ~1 nat over 50
insertions).

The paper inserts 50 facts; the embedded model knows only the 40 forget01 facts (it was trained
on forget01 + retain90[:160]), so the default --forget is forget01_subjects (40 facts).

Cost. One measurement scores (N + |retain| + |real authors|) pairs × --lp-seeds × --mc-samples
sequences per α. Defaults (N = 40, 40 + 40 pairs, 5 seeds, 8 MC samples, --every 10: steps
1, 10, 20, 30, 40, two α, plus the unedited pass) score 11 × 4,800 = 52,800 sequences of ~100
tokens: ≈ 7 min at ≈ 8 ms a sequence (docs/evaluation.md: 7–10 ms on this 2-core CPU; a --quick
run on tofu-tiny measured 20 ms while a training job held both cores), plus tracing and capture
(≈ 1 min): ≈ 8–9 min on an idle machine. `--every 1` (every insertion: 81 passes) would take
about an hour, which is why it is not the default. results.json records the measured seconds
per scoring pass and per sequence.

The memory variants of `experiments/selectivity.py` (docs/memory.md) are options here too:
--capture-steps ('all' or '0,3,7': a fact's entries at several steps), --key-positions subject
(an entry per subject token) and --gate-rate R (with --gate-facts, default retain90[40:160]). A
fact's entries are inserted together. A gated memory's τ is re-calibrated on --gate-facts after
each measured insertion (`memory.retain_gate`, ~3 s), as a user would after appending; the
scores at that step use it.

Writes sequential.png (ForgetLP / RetainLP / RealAuthorLP vs inserted facts), results.json,
results.md.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from timerome_jax import api
from timerome_jax import memory as mem
from timerome_jax.errors import InputError

import _common
import _quick

QUICK = dict(trace_facts="forget01_subjects[:2]", trace_steps=2, noise_samples=2, forget="forget01_subjects[:3]",
             retain="retain90[:3]", real_authors="real_authors[:3]", mc_samples=2, lp_seeds=2)


def measured_steps(n_facts: int, every: int) -> list[int]:
    """Insertion counts after which the LPs are measured: 1, every, 2·every, ..., and N."""
    return sorted({1, n_facts} | set(range(every, n_facts + 1, every)))


def paired(edited_SP: np.ndarray, base_SP: np.ndarray, columns) -> dict | None:
    """Summaries of the edited LP and of its paired change vs no edit over `columns` (None if empty)."""
    columns = np.asarray(list(columns), int)
    if columns.size == 0:
        return None
    e, b = edited_SP[:, columns], base_SP[:, columns]
    return {"lp": _common.summary(e), "no_edit": _common.summary(b), "change": _common.summary(e - b)}


def plot(path, steps: list[dict], alphas: list[float], no_edit: dict, has_real: bool) -> None:
    plt = _common.figure()
    from matplotlib.ticker import MaxNLocator

    panels = [("forget", "ForgetLP (inserted facts)"), ("retain", "RetainLP")]
    if has_real:
        panels.append(("real_authors", "RealAuthorLP"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    x = np.array([s["inserted"] for s in steps])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def ribbon(ax, xs, rows, color, style, label):
        mean = np.array([r["mean"] for r in rows])
        ax.plot(xs, mean, style, color=color, marker="o", markersize=3, label=label)
        low = np.array([np.nan if r["ci_low"] is None else r["ci_low"] for r in rows])
        high = np.array([np.nan if r["ci_high"] is None else r["ci_high"] for r in rows])
        ax.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)

    for ax, (name, title) in zip(np.atleast_1d(axes), panels):
        for i, alpha in enumerate(alphas):
            rows = [s["alphas"][str(alpha)][name] for s in steps]
            ribbon(ax, x, [r["lp"] for r in rows], colors[i % len(colors)], "-", f"α = {alpha:g}")
            if name == "forget":  # spill-over: the facts not inserted yet, same α
                later = [(xi, s["alphas"][str(alpha)]["forget_not_inserted"]) for xi, s in zip(x, steps)]
                later = [(xi, r) for xi, r in later if r is not None]
                if later:
                    ribbon(ax, np.array([xi for xi, _ in later]), [r["lp"] for _, r in later],
                           colors[i % len(colors)], ":", f"α = {alpha:g}, not inserted yet")
        if name == "forget":
            ribbon(ax, x, [s["alphas"][str(alphas[0])]["forget"]["no_edit"] for s in steps], "black", "--",
                   "no edit (inserted facts)")
            later = [(xi, s["alphas"][str(alphas[0])]["forget_not_inserted"]) for xi, s in zip(x, steps)]
            later = [(xi, r["no_edit"]) for xi, r in later if r is not None]
            if later:
                ribbon(ax, np.array([xi for xi, _ in later]), [r for _, r in later], "grey", ":",
                       "no edit (not inserted yet)")
        else:
            level = no_edit[name]
            ax.axhline(level["mean"], color="black", linestyle="--", linewidth=1, label="no edit")
            if level["ci_low"] is not None:
                ax.axhspan(level["ci_low"], level["ci_high"], color="black", alpha=0.1, linewidth=0)
        ax.set_title(title)
        ax.set_xlabel("facts inserted")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    np.atleast_1d(axes)[0].set_ylabel("answer log-probability (nats)")
    for ax in np.atleast_1d(axes):
        ax.legend(fontsize=6)
    _common.save_figure(fig, path, dpi=120)


def describe(m: dict) -> str:
    """The memory variant in words (the paper's: last subject token at k*, no gate)."""
    parts = [f"{m['entries']} entries", f"keys at steps {','.join(map(str, m['capture_steps']))}",
             "every subject token" if m["key_positions"] == "subject" else "the last subject token"]
    if m["gate_rate"]:
        parts.append(f"gated at rate {m['gate_rate']:g} on {m['gate_facts']} (re-calibrated at each measurement)")
    return ", ".join(parts)


def markdown(results: dict) -> str:
    lines = ["# Sequential insertion (paper Fig. 3)", "",
             f"Model `{results['model']}` ({results['fingerprint']}), coordinate {results['coordinate']['coordinate']}, "
             f"{results['num_facts']} facts inserted one at a time; MC-ELBO {results['settings']['mc_samples']} samples, "
             f"{results['settings']['lp_seeds']} seeds, mean [95 % bootstrap CI] in nats per answer.", "",
             f"Memory: {describe(results['memory'])}.", "",
             "| inserted | α | ForgetLP (inserted) | no edit | not inserted yet: change | RetainLP change | "
             "RealAuthorLP change |", "|---|---|---|---|---|---|---|"]
    for s in results["steps"]:
        for alpha, r in s["alphas"].items():
            later = r["forget_not_inserted"]
            real = r.get("real_authors")
            lines.append(f"| {s['inserted']} | {alpha} | {_common.fmt(r['forget']['lp'])} | "
                         f"{_common.fmt(r['forget']['no_edit'])} | "
                         f"{'—' if later is None else _common.fmt(later['change'])} | "
                         f"{_common.fmt(r['retain']['change'])} | {'—' if real is None else _common.fmt(real['change'])} |")
    lines += ["", "| α | max \\|RetainLP change\\| (nats) | at inserted | within 1 nat |", "|---|---|---|---|"]
    for alpha, m in results["max_abs_retain_change"].items():
        lines.append(f"| {alpha} | {m['value']:.2f} | {m['at_inserted']} | {m['within_1_nat']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0], "runs/sequential")
    _common.add_memory_arguments(p)
    p.set_defaults(mc_samples=8)  # measured cost: 16 samples would double the ≈ 7 min of scoring
    p.add_argument("--alphas", default="0.5,1", help="comma-separated α values (one curve each)")
    p.add_argument("--every", type=int, default=10, help="measure after every EVERY insertions (and after 1 and N)")
    p.add_argument("--capture-steps", default=None, help="'all' or comma-separated steps (default: k* only)")
    p.add_argument("--key-positions", default="last", choices=mem.KEY_POSITIONS)
    p.add_argument("--gate-rate", type=float, default=None, help="gated memory, re-calibrated at each measurement")
    p.add_argument("--gate-facts", default="retain90[40:160]", help="retain facts that calibrate the gate")
    args = p.parse_args()
    if args.quick:
        _quick.apply_quick(p, args, dict(QUICK, every=1))
    start = time.perf_counter()
    with _common.experiment(args) as out:
        alphas = _common.parse_list(args.alphas, float, "--alphas", valid=lambda a: bool(np.isfinite(a) and a >= 0),
                                    must="finite numbers >= 0")
        if args.every < 1:
            raise InputError(f"--every must be >= 1, got {args.every}")
        if args.q is not None and args.q < 1:
            raise InputError(f"--q must be >= 1, got {args.q}")
        if args.gate_rate is not None:
            mem.check_gate_rate(args.gate_rate, "--gate-rate")
        s = _common.setup(args)
        t0 = time.perf_counter()
        coordinate, coordinate_info = _common.coordinate(s)
        coordinate_seconds = time.perf_counter() - t0
        forget = s.encode(args.forget)
        N = forget.num_facts
        t0 = time.perf_counter()
        capture_steps = api.MemorySpec(capture_steps=args.capture_steps).steps_for(coordinate)
        keys, deltas, rows = mem.capture(s.backbone, forget.batch, coordinate, jax.random.key(args.seed),
                                         steps=capture_steps, positions=args.key_positions,
                                         noise_samples=args.noise_samples, facts_per_chunk=8)
        entries_of_fact = [np.flatnonzero(rows == f) for f in range(N)]   # contiguous: fact-major
        gate_facts = api.load_facts(args.gate_facts) if args.gate_rate is not None else None
        capture_seconds = time.perf_counter() - t0

        # every scored pair in one list, so each scoring pass fills its calls across the sets
        sets = {"forget": api.qa_pairs(s.tokenizer, forget.facts, "forget"),
                "retain": s.pairs(args.retain, "retain")}
        if args.real_authors:
            sets["real_authors"] = s.pairs(args.real_authors, "real")
        pairs, columns, offset = [], {}, 0
        for name, items in sets.items():
            pairs += items
            columns[name] = np.arange(offset, offset + len(items))
            offset += len(items)
        scoring = []

        def score(backbone) -> np.ndarray:
            t = time.perf_counter()
            lp = s.lp(backbone, pairs)
            scoring.append(time.perf_counter() - t)
            return lp

        base = score(s.backbone)
        no_edit = {name: _common.summary(base[:, cols]) for name, cols in columns.items()}

        first = entries_of_fact[0]
        memory, key_scale = mem.build(keys[first], deltas[first], layer=coordinate.layer, module=coordinate.module,
                                      alpha=1.0, lam=args.lam)
        insert_seconds = [0.0]
        steps, want = [], set(measured_steps(N, args.every))
        for n in _common.progress(range(1, N + 1), "inserting", "fact"):
            if n > 1:
                new = entries_of_fact[n - 1]
                memory, seconds = _common.timed(mem.insert, memory, keys[new], deltas[new])
                insert_seconds.append(seconds)
            if n not in want:
                continue
            gated, gate_info = memory, None
            if gate_facts is not None:
                tau, gate_info = mem.retain_gate(s.backbone, s.tokenizer, gate_facts, memory, pad_id=s.pad_id,
                                                 rate=args.gate_rate)
                gated = mem.with_gate(memory, tau)
            row = {"inserted": n, "entries": memory.size, "capacity": memory.capacity, "alphas": {},
                   "gate": gate_info}
            for alpha in alphas:
                view = mem.with_hyperparameters(gated, alpha=alpha,
                                                q=None if args.q is None else min(args.q, memory.size))
                lp = score(s.backbone.with_edits(view))
                inserted, later = columns["forget"][:n], columns["forget"][n:]
                row["alphas"][str(alpha)] = {
                    "forget": paired(lp, base, inserted), "forget_not_inserted": paired(lp, base, later),
                    "retain": paired(lp, base, columns["retain"]),
                    "real_authors": paired(lp, base, columns["real_authors"]) if "real_authors" in columns else None}
            steps.append(row)

        batch, _ = mem.build(keys, deltas, layer=coordinate.layer, module=coordinate.module, alpha=1.0,
                             lam=args.lam, key_scale=key_scale, capacity=memory.capacity)
        readout_diff = float(np.max(np.abs(np.asarray(memory.readout) - np.asarray(batch.readout))))
        readout_scale = float(np.max(np.abs(np.asarray(batch.readout))))
        max_change = {}
        for alpha in alphas:
            changes = [(abs(st["alphas"][str(alpha)]["retain"]["change"]["mean"]), st["inserted"]) for st in steps]
            value, at = max(changes)
            max_change[str(alpha)] = {"value": value, "at_inserted": at, "within_1_nat": bool(value <= 1.0)}
        n_sequences = len(pairs) * args.lp_seeds * args.mc_samples
        warm = scoring[2:] if len(scoring) > 2 else scoring  # the first unedited and edited passes compile
        results = {
            "experiment": "sequential insertion (paper Fig. 3)", "model": args.model,
            "fingerprint": s.backbone.fingerprint(), "seed": args.seed,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "overwrite")},
            "alphas": alphas, "coordinate": coordinate_info, "num_facts": N, "facts": list(forget.wheres),
            "num_retain_pairs": len(sets["retain"]),
            "num_real_author_pairs": len(sets.get("real_authors", [])),
            "memory": {"capture_steps": list(capture_steps), "key_positions": args.key_positions,
                       "gate_rate": args.gate_rate, "gate_facts": args.gate_facts if args.gate_rate else None,
                       "entries": memory.size},
            "key_scale": key_scale, "key_scale_all_facts": float(np.mean(np.sum(np.asarray(keys, np.float64) ** 2, 1))),
            "sequential_vs_batch": {"readout_max_abs_diff": readout_diff, "readout_max_abs": readout_scale},
            "no_edit": no_edit, "measured_after": sorted(want), "steps": steps, "max_abs_retain_change": max_change,
            "seconds": {"coordinate": coordinate_seconds, "capture": capture_seconds,
                        "insert_total": float(sum(insert_seconds)), "insert_per_fact": insert_seconds,
                        "scoring_passes": scoring, "scoring_total": float(sum(scoring)),
                        "scoring_pass_warm_median": float(np.median(warm)),
                        "per_scored_sequence_warm": float(np.median(warm)) / n_sequences,
                        "total": time.perf_counter() - start},
            "sequences_per_scoring_pass": n_sequences,
        }
        _common.write_json(out / "results.json", results)
        (out / "results.md").write_text(markdown(results))
        plot(out / "sequential.png", steps, alphas, no_edit, "real_authors" in columns)
        for alpha, m in max_change.items():
            last = steps[-1]["alphas"][alpha]
            print(f"α = {alpha}: after {N} insertions ForgetLP {_common.fmt(last['forget']['lp'])} "
                  f"(no edit {_common.fmt(last['forget']['no_edit'])}); max |RetainLP change| {m['value']:.2f} nats "
                  f"(at {m['at_inserted']} facts)")


if __name__ == "__main__":
    main()
