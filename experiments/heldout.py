"""The held-out protocol (issue #19): tune on one forget author, report on the other, both ways.

    python experiments/heldout.py [--model tofu-tiny] [--build-seeds 5] [--quick] --out runs/heldout

The split table (`timerome_jax.splits`) fixes every part. For each direction (tuning author T,
test author E) of `splits.FORGET_DIRECTIONS`:

1. **Tune.** The recommended memory (`MemorySpec.selective`: every step, every subject token,
   sampler entries, key-match gate) is built from T's facts (one build, seed --seed); its gate is
   calibrated on `retain_gate` at each --gate-rates; for each α of --alphas the forget drop is
   measured on T and the retain change on `retain_tune`. The chosen point is the largest forget
   drop whose mean retain change over the `retain_tune` facts is within --retain-tolerance nats
   and where no `retain_tune` fact loses more than 5 nats.
2. **Test.** With that (α, gate rate), memories are built from E's facts with --build-seeds noise
   seeds, beside the controls (each built with the same seeds):
   * `steering`: the same keys, read-out and gate, every stored value replaced by the mean δ
     (`baselines.mean_value_memory`): does the ridge solve matter, or only the gate?
   * `random_coordinate`: the same recommended memory at a random layer ≠ the traced one and a
     random module (`baselines.inference.random_coordinate`, drawn with the build seed);
   * `ungated`: the same memory without its retain-calibrated gate;
   * `paper`: DESIGN.md §3 as written (one key per fact at k*, α = 1, ungated).
   Scored: the forget drop on E, the change on T (the other author, which nothing in this
   direction's memory contains) and on `retain_test` (100 retain facts nothing is tuned or
   calibrated on: the seed's falsifier). Means with bootstrap 95 % CIs over facts × build seeds
   (`metrics.fact_bootstrap_ci`), the share of facts losing > 1 and > 5 nats and the worst five.

The falsifier of the seed, per direction: forget drop ≥ 40 nats on E while `retain_test` and T
each lose ≤ 5 nats on average. LP is the MC-ELBO with paired masks (--lp-seeds × --mc-samples).

Writes results.json (every row, the tuning grid, the chosen points, per-fact changes), results.md
(the split table, the tuning grid, the test and control tables, the verdicts) and edit_config.json
(the first direction's choice: copy it into the model directory and `timerome edit` / `demo` build
that configuration by default; `memory.recommended`).
"""

from __future__ import annotations

import time

import numpy as np

from timerome_jax import api, metrics, splits
from timerome_jax import baselines
from timerome_jax import memory as mem
from timerome_jax.baselines.inference import random_coordinate
from timerome_jax.errors import InputError

import _common
import _quick

QUICK = {"alphas": "4,16", "gate_rates": "0.01", "candidates": "", "build_seeds": 2, "lp_seeds": 2, "mc_samples": 2,
         "noise_samples": 2, "trace_steps": 2, "sampler_steps": 2, "gen_length": 32, "gen_steps": 16,
         "block_length": 32, "limit": 3}
# the test author's paraphrased questions, scored with the original answer (DESIGN: the memory is built from
# the original phrasings only): even rows were trained in both phrasings, odd rows in the original one only
PARAPHRASES = {"forget_a": {"paraphrase_twice": "forget01_paraphrased[0:20:2]", "paraphrase_once": "forget01_paraphrased[1:20:2]"},
               "forget_b": {"paraphrase_twice": "forget01_paraphrased[20:40:2]", "paraphrase_once": "forget01_paraphrased[21:40:2]"}}
CONTROLS = ("steering", "random_coordinate", "ungated", "paper")
# the seed's falsifier (docs/RESULTS.md)
FALSIFIER = _common.FALSIFIER


def part(role: str, limit: int | None):
    facts = api.load_facts(splits.selection(role))
    return facts[:limit] if limit else facts


def recommended_spec(args, alpha: float = 1.0, gate_rate: float | None = None) -> api.MemorySpec:
    """The recommended memory's spec at this α (ungated when gate_rate is None; the gate is then
    calibrated separately so its details are kept)."""
    sampler = mem.SamplerCapture.evenly(args.sampler_steps, gen_length=args.gen_length, steps=args.gen_steps,
                                        block_length=args.block_length)
    return api.MemorySpec.selective(alpha=alpha, lam=args.lam, gate_rate=gate_rate, sampler=sampler,
                                    noise_samples=args.noise_samples)


def gated(s, record, gate_facts, rate: float):
    gate, info = mem.retain_gate(s.backbone, s.tokenizer, gate_facts, record.memory, pad_id=s.pad_id, rate=rate)
    return mem.with_gate(record.memory, gate), info


def changes(s, base, memories, sets) -> dict:
    """Per-set LP change (edited − base) [builds, seeds, pairs] of each memory list."""
    return {name: np.stack([s.lp(s.backbone.with_edits(m), pairs) for m in memories]) - base[name][None]
            for name, pairs in sets.items()}


def over_facts(change_BSF: np.ndarray, labels=None) -> dict:
    """Mean and 95 % CI over facts × builds, per-seed means, and the tail of losses."""
    per_fact_BF = change_BSF.mean(axis=1)
    mean, low, high = metrics.fact_bootstrap_ci(per_fact_BF)
    return {"mean": mean, "ci_low": low, "ci_high": high,
            "per_seed": change_BSF.mean(axis=(0, 2)).tolist(),
            "per_fact": per_fact_BF.mean(axis=0).tolist(),
            "tail": metrics.loss_tail(per_fact_BF.mean(axis=0), labels)}


def tune(s, args, coordinates, tune_facts, sets, base, gate_facts) -> tuple[list[dict], dict | None]:
    rows = []
    for coordinate in coordinates:
        record = api.build_memory(s.backbone, s.tokenizer, tune_facts, coordinate, recommended_spec(args),
                                  seed=args.seed)
        for rate in args.gate_rate_list:
            memory, gate_info = gated(s, record, gate_facts, rate)
            for alpha in _common.progress(args.alpha_list, f"tune {label(coordinate)} rate {rate:g}", "α"):
                d = changes(s, base, [mem.with_hyperparameters(memory, alpha=alpha)], sets)
                rows.append({"coordinate": coordinate.as_dict(), "coordinate_label": label(coordinate),
                             "gate_rate": rate, "alpha": alpha, "gate": gate_info["gate"],
                             "forget_drop": over_facts(-d["forget"]),
                             "retain_change": over_facts(d["retain"], _common.fact_labels(args.sets["retain_tune"]))})
    ok = [r for r in rows if r["retain_change"]["mean"] >= -args.retain_tolerance
          and r["retain_change"]["tail"]["share_losing_over_5"] == 0]
    return rows, max(ok, key=lambda r: r["forget_drop"]["mean"], default=None)


def label(c) -> str:
    return f"L{c.layer} {c.module} k{c.step}"


def test(s, args, traced, test_facts, other_facts, chosen, sets, base, gate_facts) -> dict:
    """The recommended memory (at the chosen coordinate) and its controls, --build-seeds builds each,
    scored on `sets`; the paper's memory sits at the traced coordinate, as DESIGN.md §3 says."""
    alpha, rate = chosen["alpha"], chosen["gate_rate"]
    coordinate = api.Coordinate(**chosen["coordinate"])
    memories = {name: [] for name in ("recommended",) + tuple(args.control_list)}
    info = {name: [] for name in memories}
    for b in range(args.build_seeds):
        seed = args.seed + b
        record = api.build_memory(s.backbone, s.tokenizer, test_facts, coordinate, recommended_spec(args), seed=seed)
        memory, gate_info = gated(s, record, gate_facts, rate)
        memories["recommended"].append(mem.with_hyperparameters(memory, alpha=alpha))
        info["recommended"].append({"seed": seed, "entries": record.memory.size, "gate": gate_info})
        if "steering" in memories:
            memories["steering"].append(baselines.mean_value_memory(memories["recommended"][-1]))
            info["steering"].append({"seed": seed})
        if "ungated" in memories:
            memories["ungated"].append(mem.with_hyperparameters(record.memory, alpha=alpha))
            info["ungated"].append({"seed": seed})
        if "random_coordinate" in memories:
            where = random_coordinate(s.backbone.config.n_layers, coordinate, seed)
            other = api.build_memory(s.backbone, s.tokenizer, test_facts, where, recommended_spec(args), seed=seed)
            other_memory, other_gate = gated(s, other, gate_facts, rate)
            memories["random_coordinate"].append(mem.with_hyperparameters(other_memory, alpha=alpha))
            info["random_coordinate"].append({"seed": seed, "coordinate": where.as_dict(), "gate": other_gate})
        if "paper" in memories:
            paper = api.build_memory(s.backbone, s.tokenizer, test_facts, traced,
                                     api.MemorySpec.paper(lam=args.lam, noise_samples=args.noise_samples), seed=seed)
            memories["paper"].append(paper.memory)
            info["paper"].append({"seed": seed, "alpha": 1.0, "coordinate": traced.as_dict()})
    labels = {"retain": _common.fact_labels(args.sets["retain_test"]), "other_author": _common.fact_labels(other_facts),
              "forget": _common.fact_labels(test_facts.facts)}
    out = {}
    for name, ms in _common.progress(list(memories.items()), "test", "memory"):
        d = changes(s, base, ms, sets)
        out[name] = {"builds": info[name], "forget_drop": over_facts(-d["forget"], labels["forget"]),
                     "retain_change": over_facts(d["retain"], labels["retain"]),
                     "other_author_change": over_facts(d["other_author"], labels["other_author"]),
                     "alpha": 1.0 if name == "paper" else alpha, "gate_rate": None if name in ("ungated", "paper") else rate}
        for probe in PARAPHRASES["forget_a"]:
            out[name][f"{probe}_drop"] = over_facts(-d[probe])
        out[name]["falsifier"] = verdict(out[name])
    # greedy generation (the first build's recommended memory): LP can miss what the sampler does
    out["recommended"]["generation"] = generation(s, s.backbone.with_edits(memories["recommended"][0]), sets, args)
    return out


def generation(s, backbone, sets: dict, args) -> dict:
    """Greedy answers' ROUGE-L recall on each set: mean, the share reproduced (recall ≥ 0.9), per fact."""
    out = {}
    for name, pairs in sets.items():
        recall = _common.rouge_scores(s, backbone, pairs, args)
        out[name] = {"rouge_l": float(recall.mean()), "reproduced": float(np.mean(recall >= _common.REPRODUCED)),
                     "per_fact": recall.tolist()}
    return out


def no_edit_generation(s, pairs, test_role, tune_role, args, cache: dict) -> dict:
    """The unedited model's generation on the sets `test` scores; `cache` (one per run, set name ->
    result) keeps each set from being generated twice across directions."""
    names = {"forget": test_role, "retain": "retain_test", "other_author": tune_role,
             **{probe: f"{test_role}:{probe}" for probe in PARAPHRASES[test_role]}}
    for name in names.values():
        if name not in cache:
            cache[name] = generation(s, s.backbone, {name: pairs[name]}, args)[name]
    return {key: cache[name] for key, name in names.items()}


def verdict(row: dict) -> dict:
    checks = {"forget_drop": row["forget_drop"]["mean"] >= FALSIFIER["forget_drop"],
              "retain_test": row["retain_change"]["mean"] >= -FALSIFIER["retain_loss"],
              "other_author": row["other_author_change"]["mean"] >= -FALSIFIER["retain_loss"]}
    return {**checks, "passes": all(checks.values())}


def markdown(payload: dict) -> str:
    st = payload["settings"]
    lines = [*_common.page_header("Held-out protocol", payload),
             f"λ = {st['lam']:g}; {st['lp_seeds']} MC seeds × "
             f"{st['mc_samples']} MC-ELBO samples; {st['build_seeds']} build seeds at test; noise draws R = "
             f"{st['noise_samples']}. Changes in nats per answer; [95 % CI] over facts × build seeds.", "",
             "| role | selection |", "|---|---|"]
    lines += [f"| {role} | `{sel}` |" for role, sel in payload["splits"].items()]
    for d in payload["directions"]:
        tune_role, test_role = d["tune_author"], d["test_author"]
        lines += ["", f"## Tune on {tune_role}, report on {test_role}", "",
                  f"Tuning grid (memory from {tune_role}, gate on retain_gate, retain change on retain_tune):", "",
                  "| coordinate | gate rate | α | forget drop | retain_tune change | retain_tune > 1 / > 5 nats |",
                  "|---|---|---|---|---|---|"]
        for r in d["tuning"]:
            lines.append(f"| {r['coordinate_label']} | {r['gate_rate']:g} | {r['alpha']:g} | {_common.fmt(r['forget_drop'])} | "
                         f"{_common.fmt(r['retain_change'])} | {_common.fmt_tail(r['retain_change']['tail'])} |")
        if d["chosen"] is None:
            lines += ["", "No point of the grid is within the tolerance: nothing to test."]
            continue
        lines += ["", f"Traced coordinate {d['coordinate']['label']}. Chosen: {label(api.Coordinate(**d['chosen']['coordinate']))}, "
                  f"α = {d['chosen']['alpha']:g}, gate rate {d['chosen']['gate_rate']:g}.", "",
                  f"Test (memory from {test_role}; other author = {tune_role}):", "",
                  "| memory | α | forget drop | retain_test change | retain_test > 1 / > 5 nats | other author change | "
                  "other author > 5 nats | falsifier |", "|---|---|---|---|---|---|---|---|"]
        for name, r in d["results"].items():
            lines.append(f"| {name} | {r['alpha']:g} | {_common.fmt(r['forget_drop'])} | {_common.fmt(r['retain_change'])} | "
                         f"{_common.fmt_tail(r['retain_change']['tail'])} | {_common.fmt(r['other_author_change'])} | "
                         f"{r['other_author_change']['tail']['share_losing_over_5']:.0%} | "
                         f"{'passes' if r['falsifier']['passes'] else 'fails'} |")
        lines += ["", f"Paraphrase probe ({test_role}'s paraphrased questions scored with the original answer; the memory "
                  "holds the original phrasings only): forget drop on rows trained in both phrasings / in one:", "",
                  "| memory | drop, paraphrase trained | drop, paraphrase untrained |", "|---|---|---|"]
        lines += [f"| {name} | {_common.fmt(r['paraphrase_twice_drop'])} | {_common.fmt(r['paraphrase_once_drop'])} |"
                  for name, r in d["results"].items()]
        gen_edit, gen_base = d["results"]["recommended"]["generation"], d["no_edit_generation"]
        lines += ["", "Greedy generation (ROUGE-L recall, share reproduced at recall ≥ 0.9), no edit → recommended memory "
                  "(first build):", "", "| set | ROUGE-L | reproduced |", "|---|---|---|"]
        lines += [f"| {name} | {gen_base[name]['rouge_l']:.3f} → {gen_edit[name]['rouge_l']:.3f} | "
                  f"{gen_base[name]['reproduced']:.0%} → {gen_edit[name]['reproduced']:.0%} |" for name in gen_edit]
        worst = d["results"]["recommended"]["retain_change"]["tail"]["worst"]
        lines += ["", "Worst five retain_test facts under the recommended memory (change in nats):", ""]
        lines += [f"- {w['change']:.2f}: {w['fact']}" for w in worst]
    if payload["mean_over_directions"]:
        lines += ["", "## Mean over both directions", "", "| memory | forget drop | retain_test change | other author change |",
                  "|---|---|---|---|"]
        for name, r in payload["mean_over_directions"].items():
            lines.append(f"| {name} | {r['forget_drop']:.2f} | {r['retain_change']:.2f} | {r['other_author_change']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0], "runs/heldout")
    p.add_argument("--coordinate", default=None, help="LAYER,MODULE,STEP: skip tracing the tuning author")
    p.add_argument("--trace-steps", type=int, default=8, help="denoising steps K of the trace")
    p.add_argument("--noise-samples", type=int, default=3, help="noise draws R (trace and memory deltas)")
    p.add_argument("--candidates", default="2,resid,0;4,resid,0;6,attn,0",
                   help="';'-separated LAYER,MODULE,STEP the tuning step also tries besides the traced one ('' for none)")
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--alphas", default="16,64,256", help="α grid of the tuning step")
    p.add_argument("--gate-rates", default="0.001,0.01", help="gate rates of the tuning step")
    p.add_argument("--retain-tolerance", type=float, default=1.0,
                   help="tuning rule: mean retain_tune change ≥ −this, and no retain_tune fact losing > 5 nats")
    p.add_argument("--build-seeds", type=int, default=5, help="memories built per variant at test (noise seeds)")
    p.add_argument("--controls", default=",".join(CONTROLS), help=f"comma-separated, of {', '.join(CONTROLS)}")
    p.add_argument("--directions", default="ab,ba", help="'ab' tunes on forget_a and reports on forget_b; 'ba' the reverse")
    p.add_argument("--mc-samples", type=int, default=8, help="MC-ELBO samples per answer")
    p.add_argument("--lp-seeds", type=int, default=2, help="MC seeds")
    p.add_argument("--sampler-steps", type=int, default=8)
    p.add_argument("--gen-length", type=int, default=96)
    p.add_argument("--gen-steps", type=int, default=48)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="at most N facts per part (smoke runs)")
    args = p.parse_args()
    if args.quick:
        _quick.apply_quick(p, args, QUICK)
    with _common.experiment(args) as out:
        start = time.perf_counter()
        args.alpha_list = _common.parse_list(args.alphas, float, "--alphas", valid=_common.positive,
                                             must="finite numbers > 0", unique=True)
        args.gate_rate_list = _common.parse_list(args.gate_rates, float, "--gate-rates", valid=lambda v: 0 < v < 1,
                                                 must="fractions in (0, 1)", unique=True)
        args.control_list = [c.strip() for c in args.controls.split(",") if c.strip()]
        unknown = [c for c in args.control_list if c not in CONTROLS]
        if unknown:
            raise InputError(f"--controls: unknown {', '.join(unknown)}; choose from {', '.join(CONTROLS)}")
        if args.build_seeds < 1:
            raise InputError(f"--build-seeds must be >= 1, got {args.build_seeds}")
        if not np.isfinite(args.retain_tolerance) or args.retain_tolerance < 0:
            raise InputError(f"--retain-tolerance must be >= 0, got {args.retain_tolerance}")
        names = {"ab": ("forget_a", "forget_b"), "ba": ("forget_b", "forget_a")}
        directions = [d.strip() for d in args.directions.split(",") if d.strip()]
        if not directions or any(d not in names for d in directions):
            raise InputError(f"--directions must be ab, ba or ab,ba, got {args.directions!r}")
        roles = ("forget_a", "forget_b", "retain_tune", "retain_gate", "retain_test")
        splits.check_disjoint(**{role: splits.selection(role) for role in roles})
        args.sets = {role: part(role, args.limit) for role in roles}
        probes = {f"{author}:{probe}": api.load_facts(sel)[:args.limit // 2 + 1 if args.limit else None]
                  for author, table in PARAPHRASES.items() for probe, sel in table.items()}
        s = _common.setup(args)
        pairs = {role: api.qa_pairs(s.tokenizer, facts, role) for role, facts in args.sets.items()}
        pairs.update({name: api.qa_pairs(s.tokenizer, facts, name.split(":")[1]) for name, facts in probes.items()})
        base = {name: s.lp(s.backbone, pairs[name]) for name in ("forget_a", "forget_b", "retain_tune", "retain_test",
                                                                  *probes)}
        payload_directions, generated = [], {}
        coordinate_info = None
        for d in directions:
            tune_role, test_role = names[d]
            if args.coordinate:
                coordinate = api.Coordinate.parse(args.coordinate, s.backbone.config.n_layers, args.trace_steps)
                coordinate_info = {"coordinate": coordinate.as_dict(), "traced": False, "label": label(coordinate)}
            else:
                traced = api.trace(s.backbone, api.encode(s.backbone, s.tokenizer, args.sets[tune_role][:8]),
                                   api.TraceConfig(steps=args.trace_steps, noise_samples=args.noise_samples),
                                   seed=args.seed, progress=lambda xs: _common.progress(xs, "tracing", "chunk"))
                coordinate = traced.coordinate
                coordinate_info = {"coordinate": coordinate.as_dict(), "traced": True, "trace_facts": f"{tune_role}[:8]",
                                   "label": label(coordinate), "best_cell_tie": traced.best_cell_tie(),
                                   "total_effect": traced.total_effect()}
            tune_facts = api.encode(s.backbone, s.tokenizer, args.sets[tune_role])
            test_facts = api.encode(s.backbone, s.tokenizer, args.sets[test_role])
            gate_facts = args.sets["retain_gate"]
            tic = time.perf_counter()
            candidates = [coordinate] + [c for c in (api.Coordinate.parse(t, s.backbone.config.n_layers, args.trace_steps)
                                                     for t in args.candidates.split(";") if t.strip()) if c != coordinate]
            rows, chosen = tune(s, args, candidates, tune_facts,
                                {"forget": pairs[tune_role], "retain": pairs["retain_tune"]},
                                {"forget": base[tune_role], "retain": base["retain_tune"]}, gate_facts)
            tested = None
            if chosen is not None:
                tested = test(s, args, coordinate, test_facts, args.sets[tune_role], chosen,
                              {"forget": pairs[test_role], "retain": pairs["retain_test"],
                               "other_author": pairs[tune_role],
                               **{probe: pairs[f"{test_role}:{probe}"] for probe in PARAPHRASES[test_role]}},
                              {"forget": base[test_role], "retain": base["retain_test"], "other_author": base[tune_role],
                               **{probe: base[f"{test_role}:{probe}"] for probe in PARAPHRASES[test_role]}},
                              gate_facts)
            payload_directions.append({"tune_author": tune_role, "test_author": test_role, "coordinate": coordinate_info,
                                       "tuning": rows, "seconds": time.perf_counter() - tic,
                                       "chosen": None if chosen is None else {
                                           "coordinate": chosen["coordinate"], "alpha": chosen["alpha"],
                                           "gate_rate": chosen["gate_rate"]},
                                       "results": tested,
                                       "no_edit_generation": None if tested is None else
                                       no_edit_generation(s, pairs, test_role, tune_role, args, generated)})
        tested = [d["results"] for d in payload_directions if d["results"]]
        mean_over = {} if len(tested) < 2 else {
            name: {key: float(np.mean([t[name][key]["mean"] for t in tested]))
                   for key in ("forget_drop", "retain_change", "other_author_change")}
            for name in tested[0]}
        payload = {
            "experiment": "held-out protocol (tune on one author, report on the other)",
            "command": _common.command_line(), "model": args.model, "fingerprint": s.backbone.fingerprint(),
            "quick": args.quick, "seed": args.seed,
            "splits": {role: splits.selection(role) + (f" (first {args.limit})" if args.limit else "") for role in roles},
            "falsifier": FALSIFIER,
            "settings": {"alphas": args.alpha_list, "gate_rates": args.gate_rate_list, "lam": args.lam,
                         "retain_tolerance": args.retain_tolerance, "build_seeds": args.build_seeds,
                         "controls": args.control_list, "lp_seeds": args.lp_seeds, "mc_samples": args.mc_samples,
                         "noise_samples": args.noise_samples, "trace_steps": args.trace_steps,
                         "candidates": args.candidates, "sampler": {"steps": args.sampler_steps, "gen_length": args.gen_length,
                                     "gen_steps": args.gen_steps, "block_length": args.block_length},
                         "estimator": "mc_elbo"},
            "no_edit_lp": {role: _common.summary(v) for role, v in base.items()},
            "paraphrase_probes": PARAPHRASES,
            "directions": payload_directions, "mean_over_directions": mean_over,
            "seconds": time.perf_counter() - start,
        }
        _common.write_json(out / "results.json", payload)
        (out / "results.md").write_text(markdown(payload))
        first = payload_directions[0]
        if first["chosen"] is not None:   # the first direction's choice, as a model directory's edit_config.json
            _common.write_json(out / mem.EDIT_CONFIG_FILE, {
                **{k: first["chosen"][k] for k in ("alpha", "gate_rate", "coordinate")},
                "chosen_by": f"experiments/heldout.py, tuned on {first['tune_author']} and retain_tune "
                             f"({payload['fingerprint']}); {_common.command_line()}"})
        for d in payload_directions:
            if d["results"] is None:
                print(f"{d['tune_author']} -> {d['test_author']}: no tuning point within the tolerance")
                continue
            for name, r in d["results"].items():
                print(f"{d['tune_author']} -> {d['test_author']} {name}: forget drop {_common.fmt(r['forget_drop'])}, retain_test "
                      f"{_common.fmt(r['retain_change'])}, other author {_common.fmt(r['other_author_change'])} "
                      f"({'passes' if r['falsifier']['passes'] else 'fails'} the falsifier)")


if __name__ == "__main__":
    main()
