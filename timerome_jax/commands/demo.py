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
from timerome_jax import data, metrics, tracing, workflow
from timerome_jax import memory as mem
from timerome_jax.commands.edit import parse_capture_steps
from timerome_jax.commands.trace import write_trace
from timerome_jax.tokenization import backbone_tokenizer, pad_token_id


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
    p.add_argument("--key-positions", choices=mem.KEY_POSITIONS, default=None,
                   help="read each fact's keys at its 'last' subject token (the paper's) or at every 'subject' token")
    p.add_argument("--sampler-steps", type=int, default=None, metavar="N",
                   help="also capture each fact in the greedy sampler's states before N evenly spread steps of "
                   "the demo's generation schedule (G=96, 48 steps, blocks of 32), so a gated memory also fires "
                   "while generating (default off; 8 with --selective)")
    p.add_argument("--mc-samples", type=int, default=16)
    p.add_argument("--show", type=int, default=3, help="forget questions whose answers are shown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write trace/, memory/ and demo.json here")
    p.set_defaults(run=run)


# the selective memory (docs/memory.md, docs/RESULTS.md §9): on tofu-tiny it removes ~78 nats of
# forget LP for under 1 nat of retain LP; the paper's memory (the other defaults) is not selective
SELECTIVE = {"alpha": 32.0, "capture_steps": "all", "key_positions": "subject", "gate_rate": 0.001, "sampler_steps": 8}
PAPER = {"alpha": 1.0, "capture_steps": None, "key_positions": "last", "gate_rate": None, "sampler_steps": None}
GENERATION = dict(gen_length=96, steps=48, block_length=32)   # the greedy answers of step 4


def run(args: argparse.Namespace) -> int:
    say = lambda text: print(text, flush=True)
    for name, value in (SELECTIVE if args.selective else PAPER).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.gate_rate is not None:
        mem.check_gate_rate(args.gate_rate, "--gate-rate")
    if args.capture_steps is not None:   # refuse a bad value before minutes of tracing
        parse_capture_steps(args.capture_steps, tracing.Coordinate(layer=0, step=0, module="resid", steps=args.steps))
    sampler_capture = None if args.sampler_steps is None else mem.SamplerCapture.evenly(args.sampler_steps, **GENERATION)
    backbone = ports.load_pretrained(args.model)
    tokenizer = backbone_tokenizer(backbone)
    pad = pad_token_id(tokenizer, backbone)
    config = tracing.TraceConfig(steps=args.steps, noise_samples=args.noise_samples)
    say(f"model {args.model}: {backbone.config.family}, {backbone.config.n_layers} layers, "
        f"{backbone.num_params():,} parameters")

    # 1. where does the fact live?
    traced_facts = workflow.encode(backbone, tokenizer, data.load_facts(args.trace_facts))
    traced = workflow.trace(backbone, traced_facts, config, seed=args.seed)
    result, coordinate, seconds = traced.result, traced.coordinate, traced.seconds
    best, gap = traced.best_cell_tie(), traced.total_effect()
    say(f"\n1. traced {traced_facts.num_facts} facts x {config.steps} steps x {backbone.config.n_layers} layers x "
        f"{len(config.modules)} modules x {config.noise_samples} noise draws in {seconds:.0f} s")
    say(f"   the facts live at layer {coordinate.layer}, module '{coordinate.module}', denoising step "
        f"{coordinate.step}: restoring it recovers {best:.2f} of the {gap:.2f} nats the corruption "
        f"removes ({best / gap:.0%})" if abs(gap) > 1e-9 else "   (the corruption changes nothing)")

    # 2. edit: one ridge memory over all forget facts at that coordinate
    forget = workflow.encode(backbone, tokenizer, data.load_facts(args.forget))
    steps = None if args.capture_steps is None else parse_capture_steps(args.capture_steps, coordinate)
    record = workflow.build_memory(backbone, forget, coordinate, alpha=args.alpha, lam=args.lam, q=args.q,
                                   seed=args.seed, noise_samples=args.noise_samples, facts_per_chunk=8,
                                   capture_steps=steps, key_positions=args.key_positions,
                                   sampler_capture=sampler_capture)
    gated = ""
    if args.gate_rate is not None:
        tau, info = workflow.retain_gate(backbone, tokenizer, data.load_facts(args.gate_facts), record.memory,
                                         rate=args.gate_rate)
        record = record.with_memory(mem.with_gate(record.memory, tau))
        gated = f", gated at cosine {tau:.5f} (edits {args.gate_rate:g} of {info['tokens']} {args.gate_facts} tokens)"
    memory, n, encoded, skipped = record.memory, forget.num_facts, forget.encoded, list(forget.skipped)
    edited = mem.attach(backbone, memory)
    along = "" if sampler_capture is None else (f" and at {len(sampler_capture.capture_steps)} steps of the "
                                                 f"greedy sampler's own trajectory")
    entries = "" if memory.size == n else (f", keys of the {args.key_positions} tokens at steps "
                                           f"{','.join(map(str, record.capture_steps))} of the trace{along}: "
                                           f"{memory.size} entries")
    kind = "the selective memory" if args.selective else "an edit memory"
    say(f"\n2. built {kind} of {n} facts (α={args.alpha:g}, λ={args.lam:g}, q={args.q or memory.size}{entries}{gated}); "
        f"{sum(x.nbytes for x in jax.tree.leaves(memory)):,} bytes, backbone weights untouched")

    # 3. what did the edit do? (same MC masks for both models)
    retain_facts = data.load_facts(args.retain)
    forget_pairs = workflow.qa_pairs(tokenizer, [e.fact for e in encoded], "forget")
    retain_pairs = workflow.qa_pairs(tokenizer, retain_facts, "retain")
    score = lambda bb, pairs: workflow.answer_lp(bb, pairs, seeds=[args.seed], pad_id=pad,
                                                 mc_samples=args.mc_samples)[0]
    lp = {name: (score(bb, forget_pairs).mean(), score(bb, retain_pairs).mean())
          for name, bb in (("no edit", backbone), ("TimeROME", edited))}
    say(f"\n3. answer log-probability (MC-ELBO, {args.mc_samples} samples, seed {args.seed}; nats per answer)")
    say(f"   {'':10s} {'ForgetLP':>10s} {'RetainLP':>10s}")
    for name, (f_lp, r_lp) in lp.items():
        say(f"   {name:10s} {f_lp:10.2f} {r_lp:10.2f}")
    say(f"   forget drop {lp['no edit'][0] - lp['TimeROME'][0]:.2f} nats, retain change "
        f"{lp['TimeROME'][1] - lp['no edit'][1]:+.2f} nats")

    # 4. answers before / after
    shown = encoded[: args.show]
    prompts = [p.prompt_ids for p in forget_pairs[: args.show]]
    gen = dict(**GENERATION, batch_size=8, pad_id=pad)
    before = metrics.generate_answers(backbone, tokenizer, prompts, **gen)
    after = metrics.generate_answers(edited, tokenizer, prompts, **gen)
    say("\n4. greedy answers before -> after the edit")
    for e, b, a in zip(shown, before, after):
        say(f"   Q: {e.fact.prompt}\n      before: {b}\n      after:  {a}")

    if args.out:
        summary = {"coordinate": coordinate.as_dict(), "trace_seconds": seconds, "best_cell_tie": best,
                   "total_effect_at_step": gap, "facts_in_memory": n, "skipped": skipped,
                   "forget_lp": {k: float(v[0]) for k, v in lp.items()},
                   "retain_lp": {k: float(v[1]) for k, v in lp.items()},
                   "answers": [{"question": e.fact.prompt, "before": b, "after": a}
                               for e, b, a in zip(shown, before, after)]}
        with atomic_directory(args.out) as tmp:
            (tmp / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
        trace_summary = {"coordinate": coordinate.as_dict(), "modules": list(config.modules),
                         "num_facts": traced_facts.num_facts}
        write_trace(f"{args.out}/trace", result, trace_summary)
        mem.save(record, f"{args.out}/memory")
        say(f"\nwrote {args.out}/demo.json, {args.out}/trace/, {args.out}/memory/")
    return 0
