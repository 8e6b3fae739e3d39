"""Transfer: the forget01-tuned (α, λ, q) applied unchanged to TOFU forget05 / forget10 and to
every model given, with the forget drop and the retain change per suite and model (95 % CIs).

    python experiments/transfer.py [--models tofu-tiny,DIR,...] [--operating-points runs/pareto/results.json]
        [--points utility_safe] [--suites tofu-forget05,tofu-forget10] [--quick] --out runs/transfer

Per model: the coordinate is traced once on --trace-facts (forget01, as `timerome demo`). Per suite
and operating point: one edit memory (`api.build_memory`) over the suite's forget facts
(forget05 / forget10: 200 / 400 QA pairs, each with its packaged subject, `suites.forget_facts`).
α, λ, q are taken unchanged
from --operating-points (results.json of experiments/pareto.py, tuned on forget01; --points picks
which) or from --alpha / --lam / --q. The unedited and the edited
model are evaluated by `evaluate.evaluate_suite` (the code of `timerome eval`; same MC masks per
seed, so differences are paired; the retain twin is the forget-quality reference for tofu-tiny).

What the embedded model knows. TOFU's forget sets are nested: forget01 ⊂ forget05 ⊂ forget10 (the
last 40 QA pairs of forget05 and of forget10 are forget01, in the same order; checked on the
shipped data at run time and recorded as `data_check`). `tofu-tiny` was trained on forget01 +
retain90[:160] only, so of forget05 / forget10 it knows only the forget01 part; the other facts it
never saw. The forget split evaluated is therefore drawn half from the forget01 part and half from
the rest (`--limit`, in file order), and ForgetLP, unedited and edited, is reported on each part
separately (`subsets.in_forget01` / `subsets.outside_forget01`) as well as on the whole. On the
outside part a "forget drop" measures how far the edit pushes answers the model never learned, not
forgetting.

Other backbones: none with trained weights exists on this machine (the ported families' test
fixtures are random-weight checkpoints); pass real checkpoint directories with --models.

Writes results.json (`results`: one entry per model × suite × point), results.md (the command and
the table) and transfer.png (forget drop on both parts and retain change, with CI error bars).

Cost of the defaults on tofu-tiny (3 seeds, M=8, 10 QA pairs per split, memories over the 189 /
377 editable facts of forget05 / forget10, one operating point, one model), estimated from measured
pieces (docs/RESULTS_DRAFT_table.md): about 300 CPU-seconds, i.e. 3–5 minutes on an idle 2-core
CPU and about 10 minutes while a training run shares it; each further point adds one evaluation per
suite, each further model the whole again. --quick on tofu-tiny: 70 s (66 CPU-seconds), measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from timerome_jax import api, data, resources, suites
from timerome_jax import memory as mem
from timerome_jax.errors import InputError

import _common
import forget_table as table

QUICK = dict(seeds=2, mc_samples=2, limit=2, num_forget=2, num_retain=4, trace_facts="forget01_subjects[:2]",
             trace_steps=4, noise_samples=2, gen_length=32, gen_steps=8, block_length=32)
DEFAULTS = dict(seeds=3, mc_samples=8, limit=10, num_forget=None, num_retain=40, trace_facts="forget01_subjects[:8]",
                trace_steps=8, noise_samples=3, gen_length=96, gen_steps=48, block_length=32)
KNOWN = "forget01"
BACKBONES_NOTE = ("No other backbone with trained weights exists on this machine: the ported families' "
                  "test fixtures are random-weight checkpoints. Pass real checkpoint directories with --models.")


def pair_key(record: dict) -> tuple[str, str]:
    return record["question"], record["answer"]


def data_check() -> dict:
    """How forget01 / forget05 / forget10 nest in the shipped data (positions 0-based)."""
    splits = {name: [pair_key(r) for r in data.load_split(name)] for name in ("forget01", "forget05", "forget10")}
    out = {}
    for small, large in (("forget01", "forget05"), ("forget05", "forget10"), ("forget01", "forget10")):
        where = {k: i for i, k in enumerate(splits[large])}
        positions = [where.get(k) for k in splits[small]]
        found = [p for p in positions if p is not None]
        out[f"{small}_in_{large}"] = {
            "contained": len(found) == len(positions), "found": len(found), "of": len(positions),
            "positions": [min(found), max(found)] if found else None,
            "same_order": found == sorted(found)}
    perturbed = all(pair_key(a) == pair_key(b) for name in ("forget01", "forget05", "forget10")
                    for a, b in zip(data.load_split(name), data.load_split(f"{name}_perturbed")))
    out["perturbed_splits_align"] = perturbed
    return out


def stratified(inside: list[bool], n: int | None) -> list[int]:
    """Positions of n records: ⌈n/2⌉ from outside forget01 and ⌊n/2⌋ from inside, each the first in
    file order (topped up from the other part when one runs short); all when n is None. Nested:
    stratified(inside, a) ⊆ stratified(inside, b) for a ≤ b."""
    if n is None:
        return list(range(len(inside)))
    out_pos = [i for i, x in enumerate(inside) if not x]
    in_pos = [i for i, x in enumerate(inside) if x]
    k_out = min(len(out_pos), -(-n // 2))
    k_in = min(len(in_pos), n - k_out)
    k_out = min(len(out_pos), n - k_in)
    return sorted(out_pos[:k_out] + in_pos[:k_in])


def subset_summary(result: dict, mask: list[bool]) -> dict | None:
    """Per-seed mean LP over the forget items where `mask` holds, mean and CI; None when empty."""
    items = [it for it in result["items"] if it["split"] == "forget"]
    chosen = [np.asarray(it["lp_per_seed"]) for it, m in zip(items, mask) if m]
    if not chosen:
        return None
    return {**_common.summary(np.stack(chosen, axis=1)), "n": len(chosen)}


def subsets(base: dict, edited: dict, inside: list[bool]) -> dict:
    out = {}
    for name, mask in (("in_forget01", inside), ("outside_forget01", [not x for x in inside])):
        b, e = subset_summary(base, mask), subset_summary(edited, mask)
        if b is None:
            out[name] = None
            continue
        drop = _common.summary(np.asarray(b["per_seed"]) - np.asarray(e["per_seed"]))
        out[name] = {"n": b["n"], "unedited_lp": b, "edited_lp": e, "forget_drop": drop}
    return out


def eval_suite(name: str, chosen: list[int], num_retain: int, limit: int | None) -> suites.Suite:
    """The shipped suite with the forget split = the `chosen` records and the others cut to `limit`."""
    suite = suites.load_suite(name, num_retain=num_retain)
    return dataclasses.replace(
        suite, forget=[suite.forget[i] for i in chosen],
        retain=suite.retain[:limit], real_authors=suite.real_authors[:limit], world_facts=suite.world_facts[:limit],
        sources={**suite.sources, "forget": f"{suite.sources['forget']} at positions {chosen}"})


def run_model(model: str, args: argparse.Namespace, points: list[table.Point], suite_names: list[str]) -> list[dict]:
    margs = argparse.Namespace(**{**vars(args), "model": model})
    s = _common.setup(margs)
    evaluate = table.Evaluator.for_model(margs, model, s.tokenizer)
    with resources.Measure() as cost:
        coordinate, trace = _common.coordinate(s)
    trace["cost"] = cost.as_dict()
    known = {pair_key(r) for r in data.load_split(KNOWN)}
    out = []
    for name in suite_names:
        split = suites.SUITES[name].removesuffix("_perturbed")   # the plain split (forget05, forget10)
        facts = api.encode(s.backbone, s.tokenizer, suites.forget_facts(name))
        editable = [int(where.rsplit(":", 1)[1]) - 1 for where in facts.wheres]  # positions in the split
        records = data.load_split(split)
        inside = [pair_key(records[i]) in known for i in editable]
        evaluated = [editable[j] for j in stratified(inside, args.limit)]
        chosen = facts.take(stratified(inside, args.num_forget))
        suite = eval_suite(name, evaluated, args.num_retain, args.limit)
        base = evaluate(s.backbone, suite, f"{name} unedited")
        flags = [pair_key(records[i]) in known for i in evaluated]
        for point in points:
            mem.check_hyperparameters(point.alpha, point.lam, point.q, chosen.num_facts)
            edited, record, build = table.build_timerome(s.backbone, s.tokenizer, chosen, coordinate, point, args,
                                                         warm_up=False)
            result = evaluate(edited, suite, f"{name} {point.name}")
            out.append({
                "model": model, "fingerprint": s.backbone.fingerprint(), "suite": name, "point": point.name,
                "alpha": point.alpha, "lam": point.lam, "q": point.q, "covariance": point.covariance,
                "gate_rate": point.gate_rate, "capture_steps": point.capture_steps,
                "key_positions": point.key_positions,
                "source": point.source, "coordinate": coordinate.as_dict(), "trace": trace,
                "facts_in_memory": len(set(record.fact_ids)), "memory_entries": record.memory.size,
                "evaluated_forget_positions": evaluated, "evaluated_in_forget01": flags,
                "reference": evaluate.reference_name, "no_reference_reason": evaluate.reason,
                "unedited": table.metric_entries(base), "edited": table.metric_entries(result),
                **table.differences(base, result), "subsets": subsets(base, result, flags),
                "build_cost": build, "eval_cost": {"unedited": base["cost"], "edited": result["cost"]},
            })
    return out


def markdown(payload: dict) -> str:
    f = table.fmt
    st = payload["settings"]
    out = ["# Transfer: forget01-tuned (α, λ, q) on other forget sets and models", "", "```", payload["command"],
           "```", "", f"Seeds {st['seeds']}, MC-ELBO M={st['mc_samples']}, forget split: {st['limit'] or 'all'} "
           f"QA pairs per suite (half from forget01, half from the rest), other splits {st['limit'] or 'all'} "
           f"each. LPs in nats per answer; mean [95 % bootstrap CI] over seeds; differences paired per seed.", "",
           "What tofu-tiny knows: " + payload["known_facts_note"], "", BACKBONES_NOTE, ""]
    out.append("| model | suite | point (α, λ, q) | facts in memory | ForgetLP unedited → edited | forget drop | "
               "drop on forget01 part | drop on the rest | retain change | forget quality | model utility | build |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in payload["results"]:
        sub = r["subsets"]
        part = lambda k: "–" if sub[k] is None else f"{f(sub[k]['forget_drop'])} (n={sub[k]['n']})"
        q = r["q"] if r["q"] is not None else "n"
        out.append(f"| {r['model']} | {r['suite']} | {r['point']} ({r['alpha']:g}, {r['lam']:g}, {q}) | "
                   f"{r['facts_in_memory']} | {f(r['unedited']['forget_lp'])} → {f(r['edited']['forget_lp'])} | "
                   f"{f(r['forget_drop'])} | {part('in_forget01')} | {part('outside_forget01')} | "
                   f"{f(r['retain_change'])} | {f(r['edited']['forget_quality'], '.3g')} | "
                   f"{f(r['edited']['model_utility'], '.3g')} | {r['build_cost']['seconds']:.1f} s |")
    out += ["", "ForgetLP on each part (unedited → edited):", ""]
    out.append("| model | suite | point | forget01 part | the rest |")
    out.append("|---|---|---|---|---|")
    for r in payload["results"]:
        sub = r["subsets"]
        part = lambda k: "–" if sub[k] is None else f"{f(sub[k]['unedited_lp'])} → {f(sub[k]['edited_lp'])}"
        out.append(f"| {r['model']} | {r['suite']} | {r['point']} | {part('in_forget01')} | "
                   f"{part('outside_forget01')} |")
    out += ["", "Build: the memory's capture and solve in this process (the first build of a shape includes "
            "compilation).", "", f"Total wall-clock of this run: {payload['seconds']:.0f} s.", ""]
    return "\n".join(out)


def known_facts_note(check: dict) -> str:
    c5, c10 = check["forget01_in_forget05"], check["forget01_in_forget10"]
    nested = c5["contained"] and check["forget05_in_forget10"]["contained"]
    where = lambda c: "nowhere" if c["positions"] is None else f"positions {c['positions'][0]}–{c['positions'][1]}"
    return (f"forget01 ⊂ forget05 ⊂ forget10 in the shipped TOFU data ({'yes' if nested else 'NO'}): "
            f"forget01 is at {where(c5)} of forget05 and {where(c10)} of forget10 (0-based). tofu-tiny was "
            "trained on forget01 + retain90[:160] only, so it knows the forget01 part and never saw the rest: "
            "its unedited LP on the rest is already that of unknown facts, and a drop there is not forgetting.")


def figure(payload: dict, path) -> None:
    results = payload["results"]
    labels = [f"{Path(r['model']).name or r['model']} · {r['suite'].replace('tofu-', '')} · {r['point']}"
              for r in results]
    empty = {"mean": None, "ci_low": None, "ci_high": None}
    part = lambda r, k: empty if r["subsets"][k] is None else r["subsets"][k]["forget_drop"]
    table.bar_figure(labels, [("forget drop, forget01 part", [part(r, "in_forget01") for r in results]),
                              ("forget drop, outside forget01 (unseen by tofu-tiny)",
                               [part(r, "outside_forget01") for r in results]),
                              ("retain change", [r["retain_change"] for r in results])],
                     path, f"forget01-tuned configuration, unchanged (mean and 95 % CI over "
                     f"{len(payload['settings']['seeds'])} seeds)")


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0], "runs/transfer")
    p.add_argument("--models", default=None, help="comma-separated models (checkpoint dirs or embedded names; "
                   "default: --model)")
    p.add_argument("--suites", default="tofu-forget05,tofu-forget10", help="comma-separated suites")
    p.add_argument("--points", default="utility_safe", help="with --operating-points: which points to transfer "
                   "(comma-separated: utility_safe, max_forget)")
    p.add_argument("--num-forget", type=int, default=None, help="facts in each memory: N, half from forget01 "
                   "(default: every fact of the suite)")
    table.add_evaluation_arguments(p)
    args = p.parse_args()
    table.resolve(args, QUICK, DEFAULTS)
    command = _common.command_line()
    with _common.experiment(args) as out:
        start = time.perf_counter()
        table.check_evaluation_arguments(args)
        suite_names = [x.strip() for x in args.suites.split(",") if x.strip()]
        if not suite_names:
            raise InputError("--suites names no suite")
        for name in suite_names:
            suites.check_suite(name)
        if args.num_forget is not None and (args.num_forget < 1 or args.limit is None or args.limit > args.num_forget):
            raise InputError("--num-forget must be >= 1 and >= --limit, so that every evaluated forget pair is edited")
        models = [m.strip() for m in (args.models or args.model).split(",") if m.strip()]
        points = table.operating_points(args, tuple(x.strip() for x in args.points.split(",") if x.strip()))
        check = data_check()
        results = []
        for model in _common.progress(models, "models", "model"):
            results += run_model(model, args, points, suite_names)
        payload = {
            "experiment": "transfer (one forget01-tuned configuration on other forget sets and models)",
            "command": command, "models": models, "suites": suite_names, "quick": bool(args.quick),
            "seed": args.seed, "data_check": check, "known_facts_note": known_facts_note(check),
            "backbones_note": BACKBONES_NOTE,
            "settings": {"seeds": list(range(args.seeds)), "mc_samples": args.mc_samples, "limit": args.limit,
                         "num_forget": args.num_forget, "num_retain": args.num_retain,
                         "generation": {"gen_length": args.gen_length, "steps": args.gen_steps,
                                        "block_length": args.block_length},
                         "trace": {"facts": args.trace_facts, "steps": args.trace_steps,
                                   "noise_samples": args.noise_samples, "coordinate": args.coordinate}},
            "operating_points": [dataclasses.asdict(p) for p in points],
            "device": resources.device_description(), "results": results,
            "seconds": time.perf_counter() - start,
        }
        _common.write_json(out / "results.json", payload)
        text = markdown(payload)
        (out / "results.md").write_text(text)
        figure(payload, out / "transfer.png")
        print(text)


if __name__ == "__main__":
    main()
