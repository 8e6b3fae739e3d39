"""`timerome edit`: build, extend or roll back an edit memory.

    timerome edit --facts F [--trace DIR | --coordinate L,MODULE,STEP] [--paper] [--alpha --lam --q] --out MEM
    timerome edit --append MEM --facts F          # sequential insertion (incremental update)
    timerome edit --remove MEM --fact-ids ID ...  # roll back facts
    timerome edit --rewrite --facts CASES [--rewrite-method optimised|in_context] --out MEM

Without tuning flags the memory is the recommended one (`MemorySpec.selective`, the configuration
docs/RESULTS.md reports: keys at every step of every subject token and along the sampler, gated on
retain facts; its gate is calibrated on --gate-facts, by default the split table's `retain_gate`
part), with the α, gate rate and coordinate of the model directory's `edit_config.json` when it
has one (`memory.recommended`; the embedded models do: chosen on their tuning split by
experiments/heldout.py); --paper builds DESIGN.md §3's memory as written (one key per fact at the
traced k*, α = 1, ungated).
Explicit flags override either. Without --trace or --coordinate the facts are traced first (the
trace options apply). With
--rewrite, --facts holds rewrite cases (EasyEdit's JSON array, JSONL with the same fields, or a
packaged selection such as counterfact[:40]); the traced facts are then the old ones (prompt ->
ground_truth), and the memory stores values that make the model answer target_new, one per
subject token, gated as the recommended memory is (`MemorySpec.rewriting`, docs/rewrite.md).
--append into a rewrite memory takes --rewrite too.
"""

from __future__ import annotations

import argparse

from timerome_jax import api
from timerome_jax.commands import trace as trace_cmd
from timerome_jax.commands._mesh import Placement, add_mesh_argument
from timerome_jax.errors import InputError
from timerome_jax import rewrite, splits
from timerome_jax import memory as mem
from timerome_jax.memory import KEY_POSITIONS, VALUE_METHODS, MemorySpec


def register(sub, common) -> None:
    p = sub.add_parser("edit", parents=[common], help="build / append to / roll back an edit memory")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--append", metavar="MEMDIR", help="insert --facts into an existing memory")
    action.add_argument("--remove", metavar="MEMDIR", help="remove --fact-ids from an existing memory")
    p.add_argument("--fact-ids", nargs="+", default=None, help="with --remove: ids as printed by edit")
    trace_cmd.add_trace_arguments(p)
    add_mesh_argument(p)
    p.set_defaults(facts=None)
    for action_ in p._actions:
        if action_.dest == "facts":
            action_.required = False
    source = p.add_mutually_exclusive_group()
    source.add_argument("--trace", metavar="DIR", help="use the coordinate in DIR/summary.json")
    source.add_argument("--coordinate", help="LAYER,MODULE,STEP, e.g. 3,mlp,1")
    p.add_argument("--paper", action="store_true",
                   help="the paper's memory (DESIGN.md §3: one key per fact at k*, α = 1, λ = 0.1, ungated) instead of "
                   "the recommended selective one")
    p.add_argument("--alpha", type=float, default=None,
                   help="scale α of the edit (>= 0; default: the recommended memory's, 1 with --paper or --rewrite)")
    p.add_argument("--lam", type=float, default=None, help="ridge λ (> 0; scale-free; default 0.1, 1e-4 with --rewrite)")
    p.add_argument("--q", type=int, default=None, help="keep the q largest coefficients (1..n; default n)")
    p.add_argument("--covariance", metavar="FACTS", default=None,
                   help="covariance-regularised memory: replace λ̃ I by λ̃ C, C the second moment of the "
                   "keys over these retain facts (a data selection such as 'retain90[:40]' or a JSONL file)")
    p.add_argument("--shrinkage", type=float, default=1e-2,
                   help="with --covariance: C + shrinkage · (tr C / d_k) I (default 0.01)")
    p.add_argument("--capture-steps", default=None, metavar="STEPS",
                   help="capture each fact at these steps of the K-step trajectory ('0,3,7' or 'all'; "
                   "default: the coordinate's step k*): one entry per fact and step, so the memory also "
                   "matches the fact later in denoising")
    p.add_argument("--key-positions", choices=KEY_POSITIONS, default=None,
                   help="where each fact's keys are read: its 'last' subject token (the paper's) or every "
                   "'subject' token, one entry each (default: 'subject'; 'last' with --paper; docs/memory.md)")
    p.add_argument("--sampler-steps", type=int, default=None, metavar="N",
                   help="also capture each fact in the states of the unedited greedy sampler before N evenly "
                   "spread steps of the --gen-length/--gen-steps/--block-length schedule (use the one you "
                   "generate with), so a gated memory also fires during generation (default 8; none with "
                   "--paper; docs/memory.md)")
    p.add_argument("--gen-length", type=int, default=96, help="with --sampler-steps: answer tokens G (default 96)")
    p.add_argument("--gen-steps", type=int, default=48, help="with --sampler-steps: sampler steps (default 48)")
    p.add_argument("--block-length", type=int, default=32,
                   help="with --sampler-steps: semi-autoregressive block length (default 32)")
    p.add_argument("--gate-rate", type=float, default=None, metavar="RATE",
                   help="gated memory: edit only tokens whose key is close to a stored key, with the cosine "
                   "threshold set so that this fraction of the --gate-facts tokens is still edited")
    p.add_argument("--gate-facts", metavar="FACTS", default=None,
                   help="retain facts that calibrate the gate (a data selection or a JSONL file; default the split "
                   f"table's retain_gate part, {splits.selection('retain_gate')}); they must not hold a fact of --facts")
    p.add_argument("--rewrite", action="store_true",
                   help="rewrite facts instead of forgetting them: --facts holds EasyEdit/CounterFact cases "
                   "(prompt, subject, target_new, ground_truth, ...)")
    p.add_argument("--rewrite-method", choices=VALUE_METHODS, default=None,
                   help="with --rewrite: 'optimised' values (ROME-style, default) or 'in_context' (gradient-free)")
    p.add_argument("--rewrite-steps", type=int, default=None, help="with --rewrite: optimiser steps (default 100)")
    p.add_argument("--rewrite-lr", type=float, default=None, help="with --rewrite: Adam learning rate (default 0.5)")
    p.add_argument("--kl-weight", type=float, default=None,
                   help="with --rewrite: weight β of the KL term on '{subject} is' (default 0.0625)")
    p.add_argument("--out", help="memory directory to write (atomic)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=run, outputs=(("out", "dir"), ("append", "update"), ("remove", "update")))


def coordinate(args: argparse.Namespace, backbone, placement: Placement, records) -> api.Coordinate:
    """--coordinate, the coordinate of --trace DIR, or a fresh trace of the facts."""
    n_layers = backbone.config.n_layers
    if args.coordinate:
        return api.Coordinate.parse(args.coordinate, n_layers, args.steps)
    if args.trace:
        return api.Coordinate.from_trace(args.trace, n_layers)
    _, traced, _ = trace_cmd.trace(args, backbone, placement, records)
    c = traced.coordinate
    print(f"traced: layer {c.layer}, step {c.step}, module {c.module}")
    return c


def report(stage: str, info: dict) -> None:
    if stage == "rewrite":
        if info:
            nll = info["target_nll_per_token"]
            print(f"rewrite values optimised: new object −log p per token {min(nll):.3f}..{max(nll):.3f} "
                  f"(mean {sum(nll) / len(nll):.3f})")
    elif stage == "covariance":
        print(f"covariance-regularised: C from {info['tokens']} tokens of {info['retain_facts']} retain facts")
    else:
        print(f"gated: cosine >= {info['gate']:.4f} (edits {info['rate']:g} of {info['tokens']} tokens of "
              f"{info['retain_facts']} retain facts)")


def base_spec(args: argparse.Namespace) -> MemorySpec:
    """The preset explicit flags override: a rewrite memory's, the paper's (--paper) or the recommended one."""
    if args.rewrite:
        return MemorySpec.rewriting()
    return MemorySpec.paper() if args.paper else MemorySpec.selective()


def run(args: argparse.Namespace) -> int:
    if args.remove:
        if not args.fact_ids:
            raise InputError("--remove needs --fact-ids")
        record = api.load_memory(args.remove).remove_facts(args.fact_ids)
        api.save_memory(record, args.remove, overwrite=True)
        print(f"removed {len(args.fact_ids)} fact(s); {len(set(record.fact_ids))} remain in {args.remove}")
        return 0
    if not args.facts:
        raise InputError("--facts is required (the facts to edit)")
    trace_cmd.check_trace_arguments(args)
    if args.paper and args.rewrite:
        raise InputError("--paper and --rewrite: a rewrite memory has its own preset (docs/rewrite.md); drop --paper")
    rewrite_flags = [f"--{n.replace('_', '-')}" for n in ("rewrite_method", "rewrite_steps", "rewrite_lr", "kl_weight")
                     if getattr(args, n) is not None]
    if rewrite_flags and not args.rewrite:
        raise InputError(f"{', '.join(rewrite_flags)} apply to rewrites only: add --rewrite")
    cases = None
    if args.rewrite:
        if args.num_facts is not None and args.num_facts < 1:
            raise InputError(f"--num-facts must be >= 1, got {args.num_facts}")
        cases = rewrite.load_cases(args.facts)[:args.num_facts]
        rewrite.check_distinct(cases)
        records = [c.fact() for c in cases]
    else:
        records = trace_cmd.read_facts(args)
    placement = Placement.from_args(args)
    if args.append:
        backbone = placement.load(args.model)
        record = api.load_memory(args.append, backbone)
        if (record.rewrite is not None) != args.rewrite:
            raise InputError(f"{args.append} is a {'rewrite' if record.rewrite is not None else 'forgetting'} memory: "
                             f"{'add' if record.rewrite is not None else 'drop'} --rewrite")
        if rewrite_flags:
            raise InputError(f"{', '.join(rewrite_flags)}: an appended rewrite is computed as the memory's own were")
        tokenizer = api.tokenizer(backbone)
        facts = trace_cmd.encode_facts(args, backbone, tokenizer, records, "edit")
        record = api.extend_memory(backbone, record, facts, seed=args.seed, noise_samples=args.noise_samples,
                                   noise_scale=args.noise_scale, facts_per_chunk=args.facts_per_chunk,
                                   mesh=placement.mesh, tokenizer=tokenizer)
        api.save_memory(record, args.append, overwrite=True)
        print(f"inserted {facts.num_facts} fact(s) ({', '.join(facts.ids[:5])}{' ...' if facts.num_facts > 5 else ''}); "
              f"the memory in {args.append} now holds {len(set(record.fact_ids))}")
        return 0
    if not args.out:
        raise InputError("--out is required when building a memory")
    spec = MemorySpec.from_flags(args, base=base_spec(args))
    if spec.gate_rate is None and args.gate_facts is not None:
        raise InputError("--gate-facts calibrates a gate: add --gate-rate (the paper's memory is ungated)")
    if spec.gate_rate is not None and args.gate_facts is None:
        args.gate_facts = splits.selection("retain_gate")
    if args.rewrite and any(c.ground_truth is None for c in cases) and not (args.coordinate or args.trace):
        missing = next(c for c in cases if c.ground_truth is None)
        raise InputError(f"{missing.where}: no ground_truth, so the old fact cannot be traced; give one or pass "
                         f"--coordinate / --trace")
    gate_facts = None if spec.gate_rate is None else api.load_facts(args.gate_facts)
    if gate_facts is not None:
        splits.check_disjoint(facts=records, gate_facts=gate_facts)
    covariance_facts = None if args.covariance is None else api.load_facts(args.covariance)
    backbone = placement.load(args.model)
    tokenizer = api.tokenizer(backbone)
    suggested = None
    if not (args.paper or args.rewrite):   # the model's own tuned values (its edit_config.json), if it has them
        preset = mem.recommended(backbone)
        spec = MemorySpec.from_flags(args, base=preset.spec)
        if preset.source:
            suggested = preset.coordinate
            print(f"recommended configuration from {preset.source}")
    facts = trace_cmd.encode_facts(args, backbone, tokenizer, records, "edit")
    if suggested is not None and not (args.coordinate or args.trace):
        where = api.Coordinate(**suggested)
        print(f"coordinate: layer {where.layer}, step {where.step}, module {where.module} (the model's edit config)")
    else:
        where = coordinate(args, backbone, placement,
                           [c.fact(target=c.ground_truth) for c in cases] if args.rewrite else records)
    record = api.build_memory(backbone, tokenizer, facts, where, spec, seed=args.seed, gate_facts=gate_facts,
                              covariance_facts=covariance_facts, facts_per_chunk=args.facts_per_chunk,
                              mesh=placement.mesh, report=report)
    api.save_memory(record, args.out, overwrite=args.overwrite)
    memory, steps, sampler = record.memory, record.capture_steps, record.sampler_capture
    along = "" if sampler is None else (
        f" and sampler steps {','.join(map(str, sampler.capture_steps))} of G={sampler.gen_length}")
    entries = "" if memory.size == facts.num_facts else (
        f" ({memory.size} entries: steps {','.join(map(str, steps))}{along}, {spec.key_positions} tokens)")
    kind = f"rewrite memory ({record.rewrite.method} values)" if args.rewrite else "edit memory"
    print(f"wrote a{'n' if kind[0] == 'e' else ''} {kind} of {facts.num_facts} fact(s){entries} at layer {where.layer}, module "
          f"{where.module}, step {where.step} (α={spec.alpha:g}, λ={spec.lam:g}, "
          f"q={spec.q or memory.size}) to {args.out}")
    shown = ", ".join(f"{f.id} ({f.where})" for f in facts.facts[:5])
    print(f"fact ids, for --remove --fact-ids: {shown}{' ...' if facts.num_facts > 5 else ''}")
    return 0
