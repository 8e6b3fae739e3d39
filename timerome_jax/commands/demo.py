"""`timerome demo`: the paper's story in a couple of minutes on the embedded model.

1. trace 8 TOFU forget01 facts: where does the fact live (layer, module, denoising step)?
2. build an edit memory from every forget01 fact at that coordinate (weights untouched): the
   paper's, or with --selective the selective memory of docs/memory.md (keys at every step of
   every subject token, key-match gate);
3. measure ForgetLP and RetainLP with and without it (paired MC-ELBO keys);
4. show greedy answers before and after the edit.
"""

from __future__ import annotations

import argparse
import json

import jax

import ports
from ports.fileio import atomic_directory
from timerome_jax import api
from timerome_jax.commands.trace import MIN_EFFECT, progress, write_trace
from timerome_jax.memory import KEY_POSITIONS, MemorySpec
from timerome_jax.memory.spec import SELECTIVE_SCHEDULE


def register(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common], help="trace, edit and evaluate on the embedded model")
    p.add_argument("--model", default="tofu-tiny", help="checkpoint directory or embedded name")
    p.add_argument("--trace-facts", default="forget01_subjects[:8]", help="data selection to trace")
    p.add_argument("--forget", default="forget01_subjects", help="data selection to forget")
    p.add_argument("--retain", default="retain90[:40]", help="data selection whose LP should stay")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--noise-samples", type=int, default=3)
    p.add_argument("--selective", action="store_true",
                   help="the selective memory of docs/memory.md instead of the paper's: keys at every denoising "
                   "step of every subject token, gated at rate 0.001, α = 32 (explicit flags still win)")
    p.add_argument("--alpha", type=float, default=None, help="scale of the edit (default 1; 32 with --selective)")
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--q", type=int, default=None)
    p.add_argument("--gate-rate", type=float, default=None,
                   help="gate the memory (docs/memory.md): edit only tokens whose key matches a stored key, "
                   "calibrated so that this fraction of the --gate-facts tokens is still edited")
    p.add_argument("--gate-facts", default="retain90[40:160]", help="retain facts that calibrate the gate")
    p.add_argument("--capture-steps", default=None, metavar="STEPS",
                   help="'all' or comma-separated steps of the trajectory: store each fact's key and delta at "
                   "these steps (default: the traced step only; docs/memory.md)")
    p.add_argument("--key-positions", choices=KEY_POSITIONS, default=None,
                   help="read each fact's keys at its 'last' subject token (the paper's) or at every 'subject' token")
    p.add_argument("--sampler-steps", type=int, default=None, metavar="N",
                   help="also capture each fact in the greedy sampler's states before N evenly spread steps of "
                   "the demo's generation schedule (G=96, 48 steps, blocks of 32), so a gated memory also fires "
                   "while generating (default off; 8 with --selective)")
    p.add_argument("--mc-samples", type=int, default=16)
    p.add_argument("--show", type=int, default=3, help="forget questions whose answers are shown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write trace/, memory/ and demo.json here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(run=run, outputs=(("out", "dir"),))


def run(args: argparse.Namespace) -> int:
    say = lambda text: print(text, flush=True)  # noqa: E731
    config = api.TraceConfig(steps=args.steps, noise_samples=args.noise_samples)
    spec = MemorySpec.from_flags(args, base=MemorySpec.selective() if args.selective else MemorySpec.paper())
    spec.steps_for(api.Coordinate(layer=0, step=0, module="resid", steps=args.steps))  # refuse bad steps before tracing
    gate_facts = None if spec.gate_rate is None else api.load_facts(args.gate_facts)
    backbone = ports.load_pretrained(args.model)
    tokenizer = api.tokenizer(backbone)
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

    # 2. edit: one ridge memory over all forget facts at that coordinate
    forget = api.encode(backbone, tokenizer, api.load_facts(args.forget))
    record = api.build_memory(backbone, tokenizer, forget, coordinate, spec, seed=args.seed, gate_facts=gate_facts,
                              facts_per_chunk=8)
    memory, n = record.memory, forget.num_facts
    edited = backbone.with_edits(memory)
    sampler = record.sampler_capture
    along = "" if sampler is None else f" and at {len(sampler.capture_steps)} steps of the greedy sampler's own trajectory"
    entries = "" if memory.size == n else (f", keys of the {spec.key_positions} tokens at steps "
                                           f"{','.join(map(str, record.capture_steps))} of the trace{along}: "
                                           f"{memory.size} entries")
    gated = "" if memory.gate is None else (f", gated at cosine {float(memory.gate):.5f} (edits {spec.gate_rate:g} of "
                                            f"the {args.gate_facts} tokens)")
    kind = "the selective memory" if args.selective else "an edit memory"
    say(f"\n2. built {kind} of {n} facts (α={spec.alpha:g}, λ={spec.lam:g}, q={spec.q or memory.size}{entries}{gated}); "
        f"{sum(x.nbytes for x in jax.tree.leaves(memory)):,} bytes, backbone weights untouched")

    # 3. what did the edit do? (same MC masks for both models)
    retain = api.load_facts(args.retain)
    score = lambda bb, facts, tag: api.answer_lp(bb, tokenizer, facts, tag, seeds=[args.seed],  # noqa: E731
                                                 mc_samples=args.mc_samples)[0]
    lp = {name: (score(bb, forget.facts, "forget").mean(), score(bb, retain, "retain").mean())
          for name, bb in (("no edit", backbone), ("TimeROME", edited))}
    say(f"\n3. answer log-probability (MC-ELBO, {args.mc_samples} samples, seed {args.seed}; nats per answer)")
    say(f"   {'':10s} {'ForgetLP':>10s} {'RetainLP':>10s}")
    for name, (f_lp, r_lp) in lp.items():
        say(f"   {name:10s} {f_lp:10.2f} {r_lp:10.2f}")
    say(f"   forget drop {lp['no edit'][0] - lp['TimeROME'][0]:.2f} nats, retain change "
        f"{lp['TimeROME'][1] - lp['no edit'][1]:+.2f} nats")

    # 4. answers before / after
    shown = forget.facts[: args.show]
    gen = dict(SELECTIVE_SCHEDULE, batch_size=8)
    before, after = (api.generate(bb, tokenizer, shown, **gen) for bb in (backbone, edited))
    say("\n4. greedy answers before -> after the edit")
    for fact, b, a in zip(shown, before, after):
        say(f"   Q: {fact.prompt}\n      before: {b}\n      after:  {a}")

    if args.out:
        summary = {"coordinate": coordinate.as_dict(), "trace_seconds": traced.seconds, "best_cell_tie": best,
                   "total_effect_at_step": gap, "facts_in_memory": n,
                   "warnings": [] if gap > MIN_EFFECT else ["the corruption does not lower the answers' log-probability"],
                   "forget_lp": {k: float(v[0]) for k, v in lp.items()},
                   "retain_lp": {k: float(v[1]) for k, v in lp.items()},
                   "answers": [{"question": f.prompt, "before": b, "after": a} for f, b, a in zip(shown, before, after)]}
        trace_summary = {"coordinate": coordinate.as_dict(), "modules": list(config.modules),
                         "num_facts": traced_facts.num_facts}
        with atomic_directory(args.out, overwrite=args.overwrite) as tmp:   # all three parts or none
            (tmp / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
            write_trace(tmp / "trace", traced.result, trace_summary)
            api.save_memory(record, tmp / "memory")
        say(f"\nwrote {args.out}/demo.json, {args.out}/trace/, {args.out}/memory/")
    return 0
