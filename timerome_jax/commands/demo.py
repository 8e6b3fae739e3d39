"""`timerome demo`: the paper's story in a few minutes on the embedded model, on held-out splits.

1. trace 8 of the forget facts: where does the fact live (layer, module, denoising step)?
2. build two edit memories of every forget fact at that coordinate (weights untouched): the
   recommended one (`MemorySpec.selective`, the configuration docs/RESULTS.md reports, gated on
   the split table's `retain_gate` facts) and, beside it for comparison, the paper's
   (DESIGN.md §3 as written);
3. measure the LP of the forget facts, of facts that resemble them (TOFU forget01's other author)
   and of retain facts with and without each memory (paired MC-ELBO masks);
4. show greedy answers before and after.

The defaults are the split table's test parts (`timerome_jax.splits`): forget `forget_b`, other
author `forget_a`, retain `retain_test`; the recommended configuration was chosen on `forget_a`
and `retain_tune` (docs/RESULTS.md), so nothing the demo scores was tuned on.
"""

from __future__ import annotations

import argparse
import json

import jax

import ports
from ports.fileio import atomic_directory
from timerome_jax import api, splits
from timerome_jax import memory as mem
from timerome_jax.commands.trace import MIN_EFFECT, progress, write_trace
from timerome_jax.memory import KEY_POSITIONS, MemorySpec
from timerome_jax.memory.spec import SELECTIVE_SCHEDULE


def register(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common], help="trace, edit and evaluate on the embedded model")
    p.add_argument("--model", default="tofu-tiny", help="checkpoint directory or embedded name")
    p.add_argument("--trace-facts", default="forget01_subjects[20:28]", help="data selection to trace")
    p.add_argument("--forget", default="forget01_subjects[20:40]",
                   help="data selection to forget (default forget01's second author, the split table's forget_b)")
    p.add_argument("--other", default="forget01_subjects[:20]",
                   help="facts like the forget ones that should stay (default forget01's first author; '' to skip)")
    p.add_argument("--retain", default="retain90[60:160]",
                   help="data selection whose LP should stay (default the split table's retain_test)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--noise-samples", type=int, default=3)
    p.add_argument("--alpha", type=float, default=None, help="scale α of the recommended memory (default the preset's)")
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--q", type=int, default=None)
    p.add_argument("--gate-rate", type=float, default=None,
                   help="gate the memory (docs/memory.md): edit only tokens whose key matches a stored key, "
                   "calibrated so that this fraction of the --gate-facts tokens is still edited")
    p.add_argument("--gate-facts", default="retain90[30:60]",
                   help="retain facts that calibrate the gate (default the split table's retain_gate)")
    p.add_argument("--capture-steps", default=None, metavar="STEPS",
                   help="'all' or comma-separated steps of the trajectory: store each fact's key and delta at "
                   "these steps (default: all; docs/memory.md)")
    p.add_argument("--key-positions", choices=KEY_POSITIONS, default=None,
                   help="read each fact's keys at its 'last' subject token (the paper's) or at every 'subject' token "
                   "(default)")
    p.add_argument("--sampler-steps", type=int, default=None, metavar="N",
                   help="also capture each fact in the greedy sampler's states before N evenly spread steps of "
                   "the demo's generation schedule (G=96, 48 steps, blocks of 32), so a gated memory also fires "
                   "while generating (default 8)")
    p.add_argument("--mc-samples", type=int, default=16)
    p.add_argument("--show", type=int, default=3, help="forget questions whose answers are shown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write trace/, memory/ and demo.json here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(run=run, outputs=(("out", "dir"),))


def run(args: argparse.Namespace) -> int:
    say = lambda text: print(text, flush=True)  # noqa: E731
    config = api.TraceConfig(steps=args.steps, noise_samples=args.noise_samples)
    spec = MemorySpec.from_flags(args, base=MemorySpec.selective())
    paper_spec = MemorySpec.paper(noise_samples=args.noise_samples)
    spec.steps_for(api.Coordinate(layer=0, step=0, module="resid", steps=args.steps))  # refuse bad steps before tracing
    sets = {"forget": api.load_facts(args.forget), "other": api.load_facts(args.other) if args.other else [],
            "retain": api.load_facts(args.retain)}
    gate_facts = None if spec.gate_rate is None else api.load_facts(args.gate_facts)
    splits.check_disjoint(**{name: facts for name, facts in sets.items() if facts},
                          **({"gate_facts": gate_facts} if gate_facts else {}))
    backbone = ports.load_pretrained(args.model)
    tokenizer = api.tokenizer(backbone)
    preset = mem.recommended(backbone)          # the model's tuned α, gate rate and coordinate, if it has them
    spec = MemorySpec.from_flags(args, base=preset.spec)
    say(f"model {args.model}: {backbone.config.family}, {backbone.config.n_layers} layers, "
        f"{backbone.num_params():,} parameters")

    # 1. where does the fact live?
    traced_facts = api.encode(backbone, tokenizer, api.load_facts(args.trace_facts))
    traced = api.trace(backbone, traced_facts, config, seed=args.seed, progress=progress("tracing", "chunk"))
    coordinate, best, gap = traced.coordinate, traced.best_cell_tie(), traced.total_effect()
    say(f"\n1. traced {traced_facts.num_facts} facts x {config.steps} steps x {backbone.config.n_layers} layers x "
        f"{len(config.modules)} modules x {config.noise_samples} noise draws in {traced.seconds:.0f} s")
    say(f"   the facts live at layer {coordinate.layer}, module '{coordinate.module}', denoising step "
        f"{coordinate.step}: restoring it recovers {best:.2f} of the {gap:.2f} nats the corruption "
        f"removes ({best / gap:.0%})" if gap > MIN_EFFECT else f"   warning: the corruption does not lower the answers' "
        f"log-probability (total effect {gap:.3f} nats): layer {coordinate.layer}, module '{coordinate.module}', "
        f"step {coordinate.step} is not a finding")

    # 2. edit: the recommended memory (at the model's recommended coordinate, if it has one) and the
    #    paper's (at the traced coordinate), of every forget fact
    forget = api.encode(backbone, tokenizer, sets["forget"])
    n = forget.num_facts
    site = api.Coordinate(**preset.coordinate) if preset.coordinate else coordinate
    records = {"recommended": api.build_memory(backbone, tokenizer, forget, site, spec, seed=args.seed,
                                               gate_facts=gate_facts, facts_per_chunk=8),
               "paper": api.build_memory(backbone, tokenizer, forget, coordinate, paper_spec, seed=args.seed,
                                         facts_per_chunk=8)}
    memory = records["recommended"].memory
    sampler = records["recommended"].sampler_capture
    along = "" if sampler is None else f" and at {len(sampler.capture_steps)} steps of the greedy sampler's own trajectory"
    entries = "" if memory.size == n else (f", keys of the {spec.key_positions} tokens at steps "
                                           f"{','.join(map(str, records['recommended'].capture_steps))} of the trace"
                                           f"{along}: {memory.size} entries")
    gated = "" if memory.gate is None else (f", gated at cosine {float(memory.gate):.5f} (edits {spec.gate_rate:g} of "
                                            f"the {args.gate_facts} tokens)")
    nbytes = lambda m: sum(x.nbytes for x in jax.tree.leaves(m))  # noqa: E731
    where = (f"at layer {site.layer}, module '{site.module}' ({preset.source})" if preset.coordinate
             else "at the traced coordinate")
    say(f"\n2. built the recommended memory of {n} facts {where} (α={spec.alpha:g}, λ={spec.lam:g}, "
        f"q={spec.q or memory.size}{entries}{gated}; {nbytes(memory):,} bytes) and, for comparison, the paper's "
        f"(one key per fact at the traced coordinate, α={paper_spec.alpha:g}, ungated; "
        f"{nbytes(records['paper'].memory):,} bytes); backbone weights untouched")

    # 3. what did the edits do? (the same MC masks for every model)
    models = {"no edit": backbone, **{name: backbone.with_edits(r.memory) for name, r in records.items()}}
    score = lambda bb, facts, tag: float(api.answer_lp(bb, tokenizer, facts, tag, seeds=[args.seed],  # noqa: E731
                                                       mc_samples=args.mc_samples)[0].mean())
    columns = [name for name in ("forget", "other", "retain") if sets[name]]
    lp = {model: {name: score(bb, sets[name], name) for name in columns} for model, bb in models.items()}
    titles = {"forget": "forget", "other": "other author", "retain": "retain"}
    say(f"\n3. answer log-probability (MC-ELBO, {args.mc_samples} samples, seed {args.seed}; nats per answer; "
        f"forget {args.forget}, {'other author ' + args.other + ', ' if args.other else ''}retain {args.retain})")
    say(f"   {'':12s} " + " ".join(f"{titles[c]:>13s}" for c in columns))
    for model, row in lp.items():
        say(f"   {model:12s} " + " ".join(f"{row[c]:13.2f}" for c in columns))
    for model in records:
        changes = ", ".join(f"{titles[c]} {lp[model][c] - lp['no edit'][c]:+.2f}" for c in columns[1:])
        say(f"   {model}: forget drop {lp['no edit']['forget'] - lp[model]['forget']:.2f} nats; change {changes} nats")

    # 4. answers before / after
    shown = forget.facts[: args.show]
    gen = dict(SELECTIVE_SCHEDULE, batch_size=8)
    answers = {model: api.generate(bb, tokenizer, shown, **gen) for model, bb in models.items()}
    say("\n4. greedy answers: no edit / recommended memory / paper's memory")
    for i, fact in enumerate(shown):
        say(f"   Q: {fact.prompt}\n      no edit:     {answers['no edit'][i]}\n      recommended: "
            f"{answers['recommended'][i]}\n      paper:       {answers['paper'][i]}")

    if args.out:
        summary = {"coordinate": coordinate.as_dict(), "trace_seconds": traced.seconds, "best_cell_tie": best,
                   "total_effect_at_step": gap, "facts_in_memory": n,
                   "warnings": [] if gap > MIN_EFFECT else ["the corruption does not lower the answers' log-probability"],
                   "sets": {"forget": args.forget, "other": args.other, "retain": args.retain,
                            "gate_facts": args.gate_facts if gate_facts else None},
                   "recommended_spec": {"coordinate": site.as_dict(), "source": preset.source, "alpha": spec.alpha, "lam": spec.lam, "gate_rate": spec.gate_rate,
                                        "key_positions": spec.key_positions,
                                        "capture_steps": list(records["recommended"].capture_steps),
                                        "entries": memory.size},
                   "lp": lp, "forget_lp": {k: v["forget"] for k, v in lp.items()},
                   "retain_lp": {k: v["retain"] for k, v in lp.items()},
                   "answers": [{"question": f.prompt, **{model: a[i] for model, a in answers.items()}}
                               for i, f in enumerate(shown)]}
        trace_summary = {"coordinate": coordinate.as_dict(), "modules": list(config.modules),
                         "num_facts": traced_facts.num_facts}
        with atomic_directory(args.out, overwrite=args.overwrite) as tmp:   # every part or none
            (tmp / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
            write_trace(tmp / "trace", traced.result, trace_summary)
            api.save_memory(records["recommended"], tmp / "memory")
            api.save_memory(records["paper"], tmp / "paper_memory")
        say(f"\nwrote {args.out}/demo.json, {args.out}/trace/, {args.out}/memory/ (recommended), "
            f"{args.out}/paper_memory/")
    return 0
