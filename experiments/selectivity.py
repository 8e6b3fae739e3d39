"""Selectivity of the edit memory: which variant lowers the forget answers and leaves retain alone.

    python experiments/selectivity.py [--model tofu-tiny] [--quick] --out runs/selectivity

Why: on the embedded model the paper's memory (key at k*, added at every token) costs the retain
set 0.6–0.9 nats per nat of forget drop at every α (docs/RESULTS_v3.md). Two causes are measurable:
(1) the key of a fact at its last subject token moves as the answer is revealed (bidirectional
attention), so the key stored at step k* no longer matches the fact's own forwards later in
denoising; (2) the ridge read-out c(x) = G⁻¹Kᵀx responds to every token, retain ones included.
The variants address them one at a time (`api.build_memory`, `memory.with_gate`):

* paper: one key per fact at k* (DESIGN §3), applied at every token.
* multistep: one key and delta per fact at each step in --capture-steps of the K-step trajectory.
* gated: the paper's keys, term added only where the token's key has cosine ≥ τ with its nearest
  stored key; τ = the (1 − r) quantile over the tokens of --gate-facts (retain facts disjoint from
  the scored --retain set), so a fraction r of retain tokens is still edited (`memory.retain_gate`).
* multistep+gated: both.
* subject+gated, multistep+subject+gated: one entry per subject token instead of the last one.
* multistep+subject+sampler+gated: also entries in the unedited greedy sampler's states before
  --sampler-steps steps of the --gen-length/--gen-steps/--block-length schedule (the one the ROUGE
  generations use) (`memory.SamplerCapture`): the tracer's states alone match a minority of a
  generation's subject keys.
* covariance / covariance+gated: the covariance-regularised memory (λ̃ C, C over the --gate-facts
  tokens), alone and gated; its match is measured between whitened keys, which removes the
  direction every residual-stream key shares.

Each variant is built at the traced coordinate and at every --extra-coordinates, and swept over
--alphas (α = 0 is the unedited model). For each point: forget drop ForgetLP(no edit) −
ForgetLP(edit) and retain change RetainLP(edit) − RetainLP(no edit), nats per answer, MC-ELBO with
paired masks over --lp-seeds seeds, bootstrap 95 % CIs over seeds and, over facts and the
--build-seeds memories (noise seeds) of each variant, the forget drop and retain change, with the
retain change's tail: the share of retain facts losing more than 1 and 5 nats, and at each safe point
the worst five facts with their questions (`_common.lp_changes`). Per variant and
coordinate, the "safe" point is the largest forget drop whose mean retain change is within
--retain-tolerance nats; its greedy generations (with the first build's memory) give ROUGE-L recall
on forget and retain.

`operating_points` in results.json (utility_safe: the largest forget drop within the tolerance over
every variant, coordinate and α; max_forget: the largest forget drop) have the shape of pareto.py's,
so `forget_table.py --operating-points runs/selectivity/results.json` evaluates them.

Writes results.json, results.md and selectivity.png (forget drop vs retain change per variant).
"""

from __future__ import annotations

import time

import numpy as np

from timerome_jax import api
from timerome_jax import memory as mem
from timerome_jax.errors import InputError

import _common
import _quick

QUICK = {"forget": "forget01_subjects[:3]", "retain": "retain90[:3]", "trace_facts": "forget01_subjects[:3]",
         "gate_facts": "retain90[3:6]", "trace_steps": 2, "noise_samples": 2, "mc_samples": 2, "lp_seeds": 2,
         "alphas": "1,2", "gen_length": 32, "gen_steps": 16, "block_length": 32, "extra_coordinates": "",
         "sampler_steps": 2}
VARIANTS = ("paper", "multistep", "gated", "multistep+gated", "covariance", "covariance+gated", "subject+gated",
            "multistep+subject+gated", "multistep+subject+sampler+gated")


REPRODUCED = _common.REPRODUCED


def rouge_scores(s: _common.Setup, backbone, facts, args) -> np.ndarray:
    return _common.rouge_scores(s, backbone, facts, args)


def generation(s: _common.Setup, backbone, sets, args) -> dict:
    """Mean ROUGE-L recall on forget and retain, and the share of answers each set still reproduces."""
    forget, retain = (rouge_scores(s, backbone, sets[name], args) for name in ("forget", "retain"))
    return {"rouge_forget": float(forget.mean()), "rouge_retain": float(retain.mean()),
            "reproduced_forget": float(np.mean(forget >= REPRODUCED)),
            "reproduced_retain": float(np.mean(retain >= REPRODUCED))}


def parse_variants(text: str) -> list[str]:
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise InputError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    return variants


def build_variants(s: _common.Setup, forget, coordinate, args, seed: int) -> dict[str, tuple[mem.MemoryRecord, dict]]:
    steps = api.MemorySpec(capture_steps=args.capture_steps).steps_for(coordinate)
    gate_facts = api.load_facts(args.gate_facts)
    out = {}
    for variant in args.variant_list:
        tic = time.perf_counter()
        multi = variant.startswith("multistep")
        covariance = variant.startswith("covariance")
        # the memory ungated; the gate is calibrated below, so that its calibration details are kept
        spec = api.MemorySpec(alpha=1.0, lam=args.lam, noise_samples=args.noise_samples,
                              capture_steps=steps if multi else None, key_positions=key_positions(variant),
                              sampler=sampler_capture(variant, args))
        record = api.build_memory(s.backbone, s.tokenizer, forget, coordinate, spec, seed=seed,
                                  covariance_facts=gate_facts if covariance else None)
        info = {"capture_steps": list(record.capture_steps), "key_positions": record.key_positions,
                "entries": record.memory.size, "covariance": covariance,
                "sampler_capture": None if record.sampler_capture is None else record.sampler_capture.as_dict()}
        if variant.endswith("gated"):
            gate, gate_info = mem.retain_gate(s.backbone, s.tokenizer, gate_facts, record.memory, pad_id=s.pad_id,
                                              rate=args.gate_rate)
            record = record.with_memory(mem.with_gate(record.memory, gate))
            info["gate"] = gate_info
        info["build_seconds"] = time.perf_counter() - tic
        out[variant] = (record, info)
    return out


def key_positions(variant: str) -> str:
    return "subject" if "subject" in variant.split("+") else "last"


def sampler_capture(variant: str, args) -> mem.SamplerCapture | None:
    if "sampler" not in variant.split("+"):
        return None
    return mem.SamplerCapture.evenly(args.sampler_steps, gen_length=args.gen_length, steps=args.gen_steps,
                                     block_length=args.block_length)


def variant_config(variant: str, args) -> dict:
    """The memory options of a variant, in the operating-point form forget_table.py reads."""
    along = sampler_capture(variant, args)
    return {"covariance": args.gate_facts if variant.startswith("covariance") else None,
            "capture_steps": args.capture_steps if variant.startswith("multistep") else None,
            "key_positions": key_positions(variant),
            "sampler_capture": None if along is None else along.as_dict(),
            "gate_rate": args.gate_rate if variant.endswith("gated") else None,
            "gate_facts": args.gate_facts if variant.endswith("gated") else None}


def operating_points(rows: list[dict], args) -> dict:
    """utility_safe: the largest mean forget drop over every variant, coordinate and α whose mean
    retain change is within --retain-tolerance (no edit, α = 0, when none is); max_forget: the
    largest mean forget drop. Shaped like pareto.py's, for forget_table.py --operating-points."""
    def entry(r):
        return {"alpha": r["alpha"], "lam": args.lam, "q": None, "variant": r["variant"],
                "coordinate": r["coordinate"], **variant_config(r["variant"], args),
                "forget_drop": r["forget_drop"], "retain_change": r["retain_change"], "is_no_edit": False}

    within = [r for r in rows if abs(r["retain_change"]["mean"]) <= args.retain_tolerance]
    safe = max(within, key=lambda r: r["forget_drop"]["mean"], default=None)
    no_edit = {"alpha": 0.0, "lam": args.lam, "q": None, "variant": "paper", "is_no_edit": True,
               **variant_config("paper", args)}
    return {"utility_safe": {**(entry(safe) if safe else no_edit), "retain_tolerance": args.retain_tolerance},
            "max_forget": entry(max(rows, key=lambda r: r["forget_drop"]["mean"]))}


def figure(rows: list[dict], tolerance: float, path) -> None:
    plt = _common.figure()
    coordinates = sorted({r["coordinate_label"] for r in rows})
    fig, axes = plt.subplots(1, len(coordinates), figsize=(5.2 * len(coordinates), 4.2), squeeze=False)
    for ax, label in zip(axes[0], coordinates):
        ax.axhspan(-tolerance, tolerance, color="tab:green", alpha=0.08)
        ax.axhline(0, color="grey", linewidth=0.6)
        for variant in sorted({r["variant"] for r in rows}, key=VARIANTS.index):
            curve = sorted((r for r in rows if r["coordinate_label"] == label and r["variant"] == variant),
                           key=lambda r: r["alpha"])
            ax.plot([0] + [r["forget_drop"]["mean"] for r in curve], [0] + [r["retain_change"]["mean"] for r in curve],
                    marker="o", markersize=3.5, label=variant)
        ax.set_title(f"memory at {label}", fontsize=9)
        ax.set_xlabel("forget drop (nats per answer)")
        ax.set_ylabel("retain change (nats per answer)")
        ax.legend(fontsize=7)
    _common.save_figure(fig, path, dpi=130)


def markdown(payload: dict) -> str:
    st = payload["settings"]
    lines = [*_common.page_header("Memory selectivity", payload),
             f"{payload['num_forget']} forget facts, retain `{st['retain']}`; gate calibrated on `{st['gate_facts']}` "
             f"at rate {st['gate_rate']:g}; λ = {st['lam']:g}; {st['lp_seeds']} seeds × {st['mc_samples']} MC "
             f"samples; {st['build_seeds']} build seed(s) per variant; mean [95 % CI] over MC seeds, and for "
             "the retain change also over facts and builds, nats per answer.", "",
             "No edit: ROUGE-L recall forget "
             f"{payload['no_edit']['rouge_forget']:.3f}, retain {payload['no_edit']['rouge_retain']:.3f}; answers "
             f"reproduced (recall ≥ {REPRODUCED:g}) forget {payload['no_edit']['reproduced_forget']:.0%}, retain "
             f"{payload['no_edit']['reproduced_retain']:.0%}.", "",
             "| coordinate | variant | α | forget drop | retain change | retain change, CI over facts | "
             "retain facts losing (nats) | retain / forget |", "|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        ratio = -r["retain_change"]["mean"] / r["forget_drop"]["mean"] if r["forget_drop"]["mean"] > 0 else float("nan")
        lines.append(f"| {r['coordinate_label']} | {r['variant']} | {r['alpha']:g} | {_common.fmt(r['forget_drop'])} | "
                     f"{_common.fmt(r['retain_change'])} | {_common.fmt(r['retain_change_over_facts'])} | "
                     f"{_common.fmt_tail(r['retain_tail'])} | {ratio:.2f} |")
    lines += ["", f"Safe points (largest forget drop with |retain change| ≤ {st['retain_tolerance']:g} nats):", "",
              "| coordinate | variant | α | forget drop | retain change | ROUGE-L forget | ROUGE-L retain | "
              "reproduced forget | reproduced retain |", "|---|---|---|---|---|---|---|---|---|"]
    for p in payload["safe_points"]:
        if p["alpha"] is None:
            lines.append(f"| {p['coordinate_label']} | {p['variant']} | none within tolerance | | | | | | |")
            continue
        lines.append(f"| {p['coordinate_label']} | {p['variant']} | {p['alpha']:g} | {_common.fmt(p['forget_drop'])} | "
                     f"{_common.fmt(p['retain_change'])} | {p['rouge_forget']:.3f} | {p['rouge_retain']:.3f} | "
                     f"{p['reproduced_forget']:.0%} | {p['reproduced_retain']:.0%} |")
    for p in payload["safe_points"]:
        if p["alpha"] is not None:
            lines += ["", f"Worst five retain facts, {p['coordinate_label']} {p['variant']} α = {p['alpha']:g} "
                      "(change in nats):", ""]
            lines += [f"- {w['change']:.2f}: {w['fact']}" for w in p["retain_tail"]["worst"]]
    lines += ["", "Operating points (all variants): " + "; ".join(
        f"{name}: {p['variant']} α={p['alpha']:g}" for name, p in payload["operating_points"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0], "runs/selectivity")
    _common.add_memory_arguments(p)
    p.add_argument("--alphas", default="0.5,1,2,4,8", help="comma-separated α values (> 0)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--capture-steps", default="all", help="steps of the multistep variants ('all' or '0,3,7')")
    p.add_argument("--gate-facts", default="retain90[40:160]",
                   help="retain facts that calibrate the gate (keep them apart from --retain)")
    p.add_argument("--gate-rate", type=float, default=0.001, help="share of gate-fact tokens still edited")
    p.add_argument("--build-seeds", type=int, default=1,
                   help="memories built per variant with noise seeds --seed, --seed+1, ...; rows average them "
                   "and the over-facts CIs resample them (issue #19 asks for >= 5)")
    p.add_argument("--extra-coordinates", default="2,resid,0",
                   help="';'-separated LAYER,MODULE,STEP besides the traced one ('' for none)")
    p.add_argument("--retain-tolerance", type=float, default=1.0, help="safe: |mean retain change| ≤ this")
    p.add_argument("--gen-length", type=int, default=96)
    p.add_argument("--gen-steps", type=int, default=48)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--sampler-steps", type=int, default=8,
                   help="sampler variant: capture at this many evenly spread steps of the generation schedule")
    p.set_defaults(mc_samples=8, real_authors="")
    args = p.parse_args()
    if args.quick:
        _quick.apply_quick(p, args, QUICK)
    with _common.experiment(args) as out:
        start = time.perf_counter()
        alphas = _common.parse_list(args.alphas, float, "--alphas", valid=_common.positive, unique=True,
                                    must="finite numbers > 0 (α = 0 is the no-edit row)")
        args.variant_list = parse_variants(args.variants)
        mem.check_gate_rate(args.gate_rate, "--gate-rate")
        if args.build_seeds < 1:
            raise InputError(f"--build-seeds must be >= 1, got {args.build_seeds}")
        if not np.isfinite(args.retain_tolerance) or args.retain_tolerance < 0:
            raise InputError(f"--retain-tolerance must be >= 0, got {args.retain_tolerance}")
        s = _common.setup(args)
        traced, coordinate_info = _common.coordinate(s)
        coordinates = [traced] + [api.Coordinate.parse(c, s.backbone.config.n_layers, args.trace_steps)
                                  for c in args.extra_coordinates.split(";") if c.strip()]
        forget = s.encode(args.forget)
        retain_facts = api.load_facts(args.retain)
        sets = {"forget": api.qa_pairs(s.tokenizer, forget.facts, "forget"),
                "retain": api.qa_pairs(s.tokenizer, retain_facts, "retain")}
        labels = {"retain": _common.fact_labels(retain_facts)}
        base = {name: s.lp(s.backbone, pairs) for name, pairs in sets.items()}
        no_edit = {**generation(s, s.backbone, sets, args),
                   **{name: _common.summary(v) for name, v in base.items()}}
        rows, safe_points, builds = [], [], []
        for coordinate in coordinates:
            label = f"L{coordinate.layer} {coordinate.module} k{coordinate.step}"
            # one memory per build seed (its noise draws); every row averages them, CIs resample them
            by_seed = [build_variants(s, forget, coordinate, args, seed=args.seed + b) for b in range(args.build_seeds)]
            for variant in args.variant_list:
                records = [variants[variant][0] for variants in by_seed]
                record = records[0]
                builds += [{"coordinate": coordinate.as_dict(), "variant": variant, "build_seed": args.seed + b,
                            **variants[variant][1]} for b, variants in enumerate(by_seed)]
                curve = []
                for alpha in _common.progress(alphas, f"{label} {variant}", "α"):
                    edited = {name: np.stack([s.lp(s.backbone.with_edits(mem.with_hyperparameters(r.memory, alpha=alpha)),
                                                   pairs) for r in records])
                              for name, pairs in sets.items()}
                    row = {"coordinate": coordinate.as_dict(), "coordinate_label": label, "variant": variant,
                           "alpha": alpha, **_common.lp_changes(base, edited, labels)}
                    rows.append(row)
                    curve.append(row)
                within = [r for r in curve if abs(r["retain_change"]["mean"]) <= args.retain_tolerance]
                best = max(within, key=lambda r: r["forget_drop"]["mean"], default=None)
                point = {"coordinate_label": label, "variant": variant, "alpha": None}
                if best is not None:
                    edited = s.backbone.with_edits(mem.with_hyperparameters(record.memory, alpha=best["alpha"]))
                    point = {**point, "alpha": best["alpha"], "forget_drop": best["forget_drop"],
                             "retain_change": best["retain_change"], "retain_tail": best["retain_tail"],
                             **generation(s, edited, sets, args)}
                safe_points.append(point)
        payload = {
            "experiment": "selectivity (memory variants)", "command": _common.command_line(),
            "model": args.model, "fingerprint": s.backbone.fingerprint(), "quick": args.quick, "seed": args.seed,
            "num_forget": forget.num_facts, "forget_facts": list(forget.wheres),
            "settings": {"alphas": alphas, "lam": args.lam, "retain": args.retain, "gate_facts": args.gate_facts,
                         "gate_rate": args.gate_rate, "capture_steps": args.capture_steps, "variants": args.variant_list,
                         "sampler_steps": args.sampler_steps,
                         "retain_tolerance": args.retain_tolerance, "lp_seeds": args.lp_seeds,
                         "build_seeds": args.build_seeds,
                         "mc_samples": args.mc_samples, "noise_samples": args.noise_samples,
                         "trace_facts": args.trace_facts, "trace_steps": args.trace_steps, "estimator": "mc_elbo",
                         "generation": {"gen_length": args.gen_length, "steps": args.gen_steps,
                                        "block_length": args.block_length}},
            "coordinate": coordinate_info, "no_edit": no_edit, "builds": builds, "rows": rows,
            "safe_points": safe_points, "operating_points": operating_points(rows, args),
            "seconds": time.perf_counter() - start,
        }
        _common.write_json(out / "results.json", payload)
        (out / "results.md").write_text(markdown(payload))
        figure(rows, args.retain_tolerance, out / "selectivity.png")
        for p_ in safe_points:
            if p_["alpha"] is not None:
                print(f"{p_['coordinate_label']} {p_['variant']}: α={p_['alpha']:g} forget drop "
                      f"{_common.fmt(p_['forget_drop'])}, retain {_common.fmt(p_['retain_change'])}, "
                      f"ROUGE-L forget {p_['rouge_forget']:.3f} (reproduced {p_['reproduced_forget']:.0%})")


if __name__ == "__main__":
    main()
