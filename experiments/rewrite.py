"""Rewrite edits on CounterFact: the memory's two value methods, batch and sequential editing, and
the baselines, tuned on one part of the cases and reported on another (docs/rewrite.md).

    python experiments/rewrite.py [--model tofu-tiny] [--tune counterfact[:40]] \\
        [--test counterfact[40:80]] [--pool counterfact[40:400]] [--quick] --out runs/rewrite

1. Coordinate: the old facts of --tune (prompt -> ground truth) are traced over the MLP sites, as
   ROME edits the MLP with the largest indirect effect (or --coordinate).
2. Tuning on --tune only: every memory configuration of the grid (site: the traced one and
   --candidates × value method × α × λ; values at every subject token, gated at --gate-rate on
   --gate-facts, as `MemorySpec.rewriting()`) and every FT-L learning rate is scored on the tune
   cases; the one with the best mean of rewrite_acc and locality is kept. Nothing below is chosen
   on --test or --pool; the script refuses overlapping sets (`splits.check_disjoint`).
3. Test (--test): the chosen memory (one batch of all test cases), the other value method and the
   chosen one with a single value at the last subject token (ROME's position), in-context
   editing, FT-L at the chosen rate on the traced layer's MLP, and the MEMIT-style weight update
   at the traced MLP site from the chosen value method's keys and values, with MEMIT's λ̃ C
   regulariser (C: the key second moment of --covariance-facts; without C the update equals the
   ungated memory exactly, tested); every metric with a bootstrap CI over cases.
   rephrase_acc is split by whether the model was trained on the rephrase (even case ids for the
   v4 embedded models: docs/embedded_model.md).
4. Batch sizes (--batch-sizes, from --pool in order): one memory of n cases, metrics over those n.
5. Sequential (--sequential N from --pool): the cases enter one memory one at a time
   (`api.extend_memory`), measured every --every insertions: locality over the inserted cases
   and rewrite_acc of the first 10 inserted.

Writes results.json (every number, with the split it came from and the command) and results.md.
"""

from __future__ import annotations

import itertools
import time

from timerome_jax import api, baselines, rewrite, splits
from timerome_jax.memory import MemorySpec, RewriteValues

import _common
import _quick

QUICK = {"tune": "counterfact[:4]", "test": "counterfact[4:8]", "pool": "counterfact[4:16]", "batch_sizes": "1,4",
         "sequential": 4, "every": 2, "covariance_facts": "retain90[160:164]", "alphas": "1", "lams": "0.01", "ft_lrs": "5e-4",
         "value_steps": 5, "candidates": "", "trace_steps": 4, "noise_samples": 2, "mc_samples": 4}


def case_id(case) -> int | None:
    """The CounterFact case_id of a packaged case ('counterfact:N' is row N - 1)."""
    where = case.where
    return int(where.split(":")[1]) - 1 if where.startswith("counterfact:") else None


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0], "runs/rewrite")
    p.add_argument("--tune", default=splits.selection("rewrite_tune"), help="cases every choice is made on")
    p.add_argument("--test", default=splits.selection("rewrite_test"), help="cases the comparison is reported on")
    p.add_argument("--pool", default="counterfact[40:400]", help="cases of the batch-size and sequential runs")
    p.add_argument("--batch-sizes", default="1,10,100,360")
    p.add_argument("--sequential", type=int, default=100, help="cases inserted one at a time")
    p.add_argument("--every", type=int, default=10, help="measure the sequential run every N insertions")
    p.add_argument("--coordinate", default=None, help="LAYER,MODULE,STEP: skip tracing (the weight baselines' site)")
    p.add_argument("--candidates", default="0,resid,0;2,resid,0",
                   help="further sites the memory is tuned over ('LAYER,MODULE,STEP;...'; '' for the traced one only)")
    p.add_argument("--gate-rate", type=float, default=0.001, help="the memories' gate rate")
    p.add_argument("--gate-facts", default=splits.selection("retain_gate"), help="retain facts the gate is calibrated on")
    p.add_argument("--trace-steps", type=int, default=8)
    p.add_argument("--noise-samples", type=int, default=3)
    p.add_argument("--alphas", default="1,2")
    p.add_argument("--lams", default="0.01,0.1")
    p.add_argument("--value-steps", type=int, default=100, help="Adam steps of the optimised values")
    p.add_argument("--ft-lrs", default="1e-4,5e-4,2e-3", help="FT-L learning-rate sweep")
    p.add_argument("--ft-steps", type=int, default=25)
    p.add_argument("--ft-bound", type=float, default=5e-4)
    p.add_argument("--covariance-facts", default="retain90[160:200]",
                   help="text whose key second moment C regularises the MEMIT-style update (no scored set)")
    p.add_argument("--mc-samples", type=int, default=16, help="MC-ELBO copies of the likelihood scores")
    args = p.parse_args()
    if args.quick:
        _quick.apply_quick(p, args, QUICK)
    with _common.experiment(args) as out:
        floats = {flag: _common.parse_list(getattr(args, flag.lstrip("-").replace("-", "_")), float, flag,
                                           valid=_common.positive, must="finite numbers > 0")
                  for flag in ("--alphas", "--lams", "--ft-lrs")}
        s = _common.setup(args)
        bb, tok = s.backbone, s.tokenizer
        tune, test, pool = (rewrite.load_cases(spec) for spec in (args.tune, args.test, args.pool))
        splits.check_disjoint(tune=tune, test=test)
        splits.check_disjoint(tune=tune, pool=pool)
        gate_facts = api.load_facts(args.gate_facts)
        start = time.perf_counter()
        if args.coordinate:
            where = api.Coordinate.parse(args.coordinate, bb.config.n_layers, args.trace_steps)
        else:
            old = api.encode(bb, tok, [c.fact(target=c.ground_truth) for c in tune])
            where = api.trace(bb, old, api.TraceConfig(steps=args.trace_steps, noise_samples=args.noise_samples,
                                                       modules=("mlp",)), seed=args.seed).coordinate
        sites = [where] + [c for c in (api.Coordinate.parse(t, bb.config.n_layers, args.trace_steps)
                                       for t in args.candidates.split(";") if t.strip()) if c != where]
        print(f"traced: layer {where.layer}, {where.module}; tuned over "
              + ", ".join(f"{c.layer},{c.module}" for c in sites))

        def score(model, cases, prefix=None):
            rows = rewrite.case_metrics(model, bb, tok, cases, pad_id=s.pad_id, seeds=(args.seed,),
                                        mc_samples=args.mc_samples, prefix=prefix)
            return rows, rewrite.summarise(rows)

        def memory(cases, spec, site):
            facts = api.encode(bb, tok, [c.fact() for c in cases])
            gate = None if spec.gate_rate is None else gate_facts
            return api.build_memory(bb, tok, facts, site, spec, seed=args.seed, gate_facts=gate)

        def spec_of(method, alpha, lam, **changes):
            return MemorySpec.rewriting(alpha=alpha, lam=lam, gate_rate=args.gate_rate,
                                        rewrite=RewriteValues(method=method, steps=args.value_steps), **changes)

        def goal(summary):
            return (summary["rewrite_acc"]["mean"] + summary.get("locality", {"mean": 1.0})["mean"]) / 2

        # 2. tuning, on --tune only
        grid = []
        for site, method, alpha, lam in itertools.product(sites, ("optimised", "in_context"), floats["--alphas"],
                                                          floats["--lams"]):
            _, summ = score(bb.with_edits(memory(tune, spec_of(method, alpha, lam), site).memory), tune)
            grid.append({"site": site.as_dict(), "method": method, "alpha": alpha, "lam": lam, "tune": summ,
                         "goal": goal(summ)})
            print(f"tune {site.layer},{site.module} {method} α={alpha:g} λ={lam:g}: rewrite_acc "
                  f"{summ['rewrite_acc']['mean']:.3f}, locality {summ.get('locality', {'mean': float('nan')})['mean']:.3f}")
        best = max(grid, key=lambda g: g["goal"])
        chosen_site = api.Coordinate(**best["site"])
        tune_facts = api.encode(bb, tok, [c.fact() for c in tune])
        ft_grid = []
        for lr in floats["--ft-lrs"]:
            tuned, losses = baselines.fine_tune_site(bb, tok, tune_facts, where.layer, where.module, steps=args.ft_steps,
                                                     learning_rate=lr, norm_bound=args.ft_bound, seed=args.seed)
            _, summ = score(tuned, tune)
            ft_grid.append({"learning_rate": lr, "tune": summ, "goal": goal(summ), "loss": losses.tolist()})
        ft_best = max(ft_grid, key=lambda g: g["goal"])

        # 3. test: every method at its tuned setting
        chosen = spec_of(best["method"], best["alpha"], best["lam"])
        other = spec_of("in_context" if best["method"] == "optimised" else "optimised", best["alpha"], best["lam"])
        last_token = chosen.replace(key_positions="last")
        test_record = memory(test, chosen, chosen_site)
        test_facts = api.encode(bb, tok, [c.fact() for c in test])
        # MEMIT-style: keys and values of the chosen method at the traced MLP site, λ̃ C regularised with
        # the keys of --covariance-facts, written into W (a weight update is neither gated nor sparse)
        linear = api.build_memory(bb, tok, test_facts, where, chosen.replace(gate_rate=None), seed=args.seed,
                                  covariance_facts=api.load_facts(args.covariance_facts))
        methods = {
            f"memory ({best['method']})": score(bb.with_edits(test_record.memory), test),
            f"memory ({other.rewrite.method})": score(bb.with_edits(memory(test, other, chosen_site).memory), test),
            f"memory ({best['method']}, last subject token)": score(
                bb.with_edits(memory(test, last_token, chosen_site).memory), test),
            "in-context (IKE)": score(bb, test, prefix=baselines.in_context_prefix),
            "FT-L": score(baselines.fine_tune_site(bb, tok, test_facts, where.layer, where.module, steps=args.ft_steps,
                                                   learning_rate=ft_best["learning_rate"], norm_bound=args.ft_bound,
                                                   seed=args.seed)[0], test),
            "MEMIT-style weights": score(baselines.weight_edit(bb, linear.memory), test),
            "unedited": score(bb, test),
        }
        by_rephrase = {}
        for name, (rows, _) in methods.items():
            parity = {"trained": [], "untrained": []}
            for case, row in zip(test, rows):
                if row["rephrase_acc"] is not None and case_id(case) is not None:
                    parity["trained" if case_id(case) % 2 == 0 else "untrained"].append(row)
            by_rephrase[name] = {k: rewrite.summarise(v).get("rephrase_acc") for k, v in parity.items() if v}

        # 4. batch sizes and 5. sequential, from --pool
        batches = []
        for n in (int(x) for x in args.batch_sizes.split(",") if x):
            cases = pool[:n]
            if n == 1:   # ten single-case memories, pooled
                rows = [r for c in pool[:10] for r in score(bb.with_edits(memory([c], chosen, chosen_site).memory), [c])[0]]
                summ = rewrite.summarise(rows)
            else:
                _, summ = score(bb.with_edits(memory(cases, chosen, chosen_site).memory), cases)
            batches.append({"edits": n, "cases_scored": 10 if n == 1 else len(cases), "metrics": summ})
        seq_cases = pool[:args.sequential]
        seq_facts = api.encode(bb, tok, [c.fact() for c in seq_cases])
        record = memory(seq_cases[:1], chosen, chosen_site)
        sequential = []
        for n in range(1, len(seq_cases) + 1):
            if n > 1:
                record = api.extend_memory(bb, record, seq_facts.take([n - 1]), seed=args.seed, tokenizer=tok)
            if n == 1 or n % args.every == 0 or n == len(seq_cases):
                edited = bb.with_edits(record.memory)
                _, inserted = score(edited, seq_cases[:n])
                _, first = score(edited, seq_cases[:10])
                sequential.append({"inserted": n, "locality_inserted": inserted.get("locality"),
                                   "rewrite_acc_inserted": inserted["rewrite_acc"],
                                   "rewrite_acc_first_10": first["rewrite_acc"]})

        results = {"experiment": "rewrite", "command": _common.command_line(), "model": args.model,
                   "fingerprint": bb.fingerprint(), "coordinate": where.as_dict(),
                   "splits": {"tune": args.tune, "test": args.test, "pool": args.pool},
                   "gate": {"rate": args.gate_rate, "facts": args.gate_facts},
                   "tuning": {"grid": grid, "chosen": {k: best[k] for k in ("site", "method", "alpha", "lam")},
                              "ft_l": ft_grid, "ft_l_chosen": ft_best["learning_rate"]},
                   "test": {name: summ for name, (_, summ) in methods.items()},
                   "test_rephrase_by_training": by_rephrase,
                   "test_cases": {name: rows for name, (rows, _) in methods.items()},
                   "batch_sizes": batches, "sequential": sequential, "seconds": time.perf_counter() - start}
        _common.write_json(out / "results.json", results)
        metric = lambda summ, k: "–" if k not in summ else _common.fmt(summ[k])  # noqa: E731
        lines = [f"Rewrites at layer {chosen_site.layer} ({chosen_site.module}; weight baselines at the traced "
                 f"layer {where.layer} {where.module}); tuned on {args.tune} "
                 f"({best['method']}, α={best['alpha']:g}, λ={best['lam']:g}; FT-L lr {ft_best['learning_rate']:g}), "
                 f"reported on {args.test}: mean [95 % bootstrap CI over cases]", "",
                 "| method | " + " | ".join(rewrite.METRICS) + " |", "|---" * (len(rewrite.METRICS) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(metric(summ, k) for k in rewrite.METRICS) + " |"
                  for name, (_, summ) in methods.items()]
        lines += ["", f"Batch sizes ({args.pool}):", ""]
        lines += [f"- {b['edits']} edits: " + ", ".join(f"{k} {metric(b['metrics'], k)}" for k in
                                                        ("rewrite_acc", "locality", "efficacy_score"))
                  for b in batches]
        lines += ["", "Sequential: " + "; ".join(
            f"n={r['inserted']}: locality {metric({'x': r['locality_inserted']}, 'x') if r['locality_inserted'] else '–'}"
            f", first-10 rewrite_acc {r['rewrite_acc_first_10']['mean']:.2f}" for r in sequential)]
        (out / "results.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
