"""`timerome edit`: build, extend or roll back an edit memory.

    timerome edit --facts F [--trace DIR | --coordinate L,MODULE,STEP] [--alpha --lam --q] --out MEM
    timerome edit --append MEM --facts F          # sequential insertion (incremental update)
    timerome edit --remove MEM --fact-ids ID ...  # roll back facts

Without --trace or --coordinate the facts are traced first (the trace options apply).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

import ports
from timerome_jax import memory as mem
from timerome_jax import data, pipeline, tracing, workflow
from timerome_jax.commands import _mesh
from timerome_jax.commands import trace as trace_cmd
from timerome_jax.errors import InputError
from timerome_jax.facts import read_facts
from timerome_jax.tokenization import backbone_tokenizer, pad_token_id


def register(sub, common) -> None:
    p = sub.add_parser("edit", parents=[common], help="build / append to / roll back an edit memory")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--append", metavar="MEMDIR", help="insert --facts into an existing memory")
    action.add_argument("--remove", metavar="MEMDIR", help="remove --fact-ids from an existing memory")
    p.add_argument("--fact-ids", nargs="+", default=None, help="with --remove: ids as printed by edit")
    trace_cmd.add_trace_arguments(p)
    _mesh.add_mesh_argument(p)
    p.set_defaults(facts=None)
    for action_ in p._actions:
        if action_.dest == "facts":
            action_.required = False
    source = p.add_mutually_exclusive_group()
    source.add_argument("--trace", metavar="DIR", help="use the coordinate in DIR/summary.json")
    source.add_argument("--coordinate", help="LAYER,MODULE,STEP, e.g. 3,mlp,1")
    p.add_argument("--alpha", type=float, default=1.0, help="scale α of the edit (>= 0)")
    p.add_argument("--lam", type=float, default=0.1, help="ridge λ (> 0; scale-free)")
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
    p.add_argument("--key-positions", choices=mem.KEY_POSITIONS, default="last",
                   help="where each fact's keys are read: its 'last' subject token (the paper's) or every "
                   "'subject' token, one entry each (docs/memory.md)")
    p.add_argument("--sampler-steps", type=int, default=None, metavar="N",
                   help="also capture each fact in the states of the unedited greedy sampler before N evenly "
                   "spread steps of the --gen-length/--gen-steps/--block-length schedule (use the one you "
                   "generate with), so a gated memory also fires during generation (docs/memory.md)")
    p.add_argument("--gen-length", type=int, default=96, help="with --sampler-steps: answer tokens G (default 96)")
    p.add_argument("--gen-steps", type=int, default=48, help="with --sampler-steps: sampler steps (default 48)")
    p.add_argument("--block-length", type=int, default=32,
                   help="with --sampler-steps: semi-autoregressive block length (default 32)")
    p.add_argument("--gate-rate", type=float, default=None, metavar="RATE",
                   help="gated memory: edit only tokens whose key is close to a stored key, with the cosine "
                   "threshold set so that this fraction of the --gate-facts tokens is still edited")
    p.add_argument("--gate-facts", metavar="FACTS", default=None,
                   help="retain facts that calibrate --gate-rate (a data selection or a JSONL file)")
    p.add_argument("--out", help="memory directory to write (atomic)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=run)


def parse_coordinate(text: str, n_layers: int, steps: int = 8) -> tracing.Coordinate:
    """LAYER,MODULE,STEP of a `steps`-step trajectory (the trace's K)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise InputError(f"--coordinate must be LAYER,MODULE,STEP, got {text!r}")
    try:
        layer, step = int(parts[0]), int(parts[2])
    except ValueError:
        raise InputError(f"--coordinate must be LAYER,MODULE,STEP with integers, got {text!r}") from None
    if parts[1] not in tracing.MODULES:
        raise InputError(f"unknown module {parts[1]!r} in --coordinate; choose from {', '.join(tracing.MODULES)}")
    if not 0 <= layer < n_layers:
        raise InputError(f"layer {layer} is outside 0..{n_layers - 1}")
    if not 0 <= step < steps:
        raise InputError(f"step {step} is outside 0..{steps - 1} (K = --steps {steps})")
    return tracing.Coordinate(layer, step, parts[1], steps)


def coordinate_from_trace(trace_dir: str, n_layers: int) -> tracing.Coordinate:
    path = Path(trace_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
        c = summary["coordinate"]
        steps = int(c.get("steps", summary.get("config", {}).get("steps", 8)))
        return parse_coordinate(f"{c['layer']},{c['module']},{c['step']}", n_layers, steps)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"cannot read a coordinate from {path}: {e}") from None


def parse_capture_steps(text: str | None, coordinate: tracing.Coordinate) -> tuple[int, ...]:
    if text is None:
        return (coordinate.step,)
    if text.strip() == "all":
        return tuple(range(coordinate.steps))
    try:
        steps = [int(t) for t in text.split(",")]
    except ValueError:
        raise InputError(f"--capture-steps must be comma-separated integers or 'all', got {text!r}") from None
    return workflow.check_capture_steps(coordinate, steps)


def sampler_capture_from_args(args: argparse.Namespace) -> mem.SamplerCapture | None:
    if args.sampler_steps is None:
        return None
    return mem.SamplerCapture.evenly(args.sampler_steps, gen_length=args.gen_length, steps=args.gen_steps,
                                     block_length=args.block_length)


def capture(backbone: ports.Backbone, encoded, pad_id: int, coordinate: tracing.Coordinate,
            args: argparse.Namespace, capture_steps: tuple[int, ...], positions: str = "last",
            sampler_capture: mem.SamplerCapture | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Memory entries of the encoded facts (`workflow.capture_at_steps`, on the --mesh when one is
    given): keys [E, d_k], deltas [E, d] and the fact (index into `encoded`) of each entry."""
    return workflow.capture_at_steps(
        backbone, pipeline.trace_batch(encoded, pad_id), coordinate, capture_steps, jax.random.key(args.seed),
        sampler_capture=sampler_capture, mesh=_mesh.mesh_from_args(args), noise_samples=args.noise_samples,
        noise_scale=args.noise_scale, facts_per_chunk=args.facts_per_chunk, positions=positions)


def _encode(backbone, path):
    facts = read_facts(path)
    tokenizer = backbone_tokenizer(backbone)
    encoded, skipped = pipeline.encode_for_tracing(tokenizer, facts, backbone.config.max_seq_len)
    if skipped:
        print(f"timerome edit: skipped {len(skipped)} fact(s) without a subject in the prompt", flush=True)
    return encoded, pad_token_id(tokenizer, backbone)


def run(args: argparse.Namespace) -> int:
    if args.remove:
        if not args.fact_ids:
            raise InputError("--remove needs --fact-ids")
        record = mem.load(args.remove)
        record = mem.remove_facts(record, args.fact_ids)
        mem.save(record, args.remove, overwrite=True)
        print(f"removed {len(args.fact_ids)} fact(s); {len(set(record.fact_ids))} remain in {args.remove}")
        return 0
    if not args.facts:
        raise InputError("--facts is required (the facts to edit)")
    backbone = _mesh.backbone_on_mesh(args, args.model)
    if args.append:
        record = mem.load(args.append, backbone)
        encoded, pad_id = _encode(backbone, args.facts)
        ids = [e.fact.where for e in encoded]
        duplicate = [i for i in ids if i in record.fact_ids]
        if duplicate:
            raise InputError(f"fact(s) already in the memory: {', '.join(duplicate[:5])}")
        keys, deltas, rows = capture(backbone, encoded, pad_id, record.coordinate, args, record.capture_steps,
                                     record.key_positions, record.sampler_capture)
        entries = tuple(ids[r] for r in rows)
        record = record.with_memory(mem.insert(record.memory, keys, deltas), fact_ids=record.fact_ids + entries)
        mem.save(record, args.append, overwrite=True)
        print(f"inserted {len(ids)} fact(s); the memory in {args.append} now holds {len(set(record.fact_ids))}")
        return 0
    if not args.out:
        raise InputError("--out is required when building a memory")
    if args.covariance is not None and (not np.isfinite(args.shrinkage) or args.shrinkage <= 0):
        raise InputError(f"--shrinkage must be a finite number > 0, got {args.shrinkage}")
    if (args.gate_rate is None) != (args.gate_facts is None):
        raise InputError("--gate-rate and --gate-facts go together (the rate is measured on those facts)")
    if args.gate_rate is not None:
        mem.check_gate_rate(args.gate_rate, "--gate-rate")
    mem.check_hyperparameters(args.alpha, args.lam, None, 1)
    sampler_capture = sampler_capture_from_args(args)
    encoded, pad_id = _encode(backbone, args.facts)
    encoded = encoded[: args.num_facts] if args.num_facts else encoded
    if args.coordinate:
        coordinate = parse_coordinate(args.coordinate, backbone.config.n_layers, args.steps)
    elif args.trace:
        coordinate = coordinate_from_trace(args.trace, backbone.config.n_layers)
    else:
        _, _, _, summary = trace_cmd.trace(args, backbone)
        c = summary["coordinate"]
        coordinate = tracing.Coordinate(c["layer"], c["step"], c["module"], c.get("steps", args.steps))
        print(f"traced: layer {coordinate.layer}, step {coordinate.step}, module {coordinate.module}")
    capture_steps = parse_capture_steps(args.capture_steps, coordinate)
    n_min = len(encoded) * (len(capture_steps) + len(sampler_capture.capture_steps if sampler_capture else ()))
    # the entries: exactly these with "last", at least with "subject"
    mem.check_hyperparameters(args.alpha, args.lam, args.q if args.key_positions == "last" else None, n_min)
    whitening = None
    if args.covariance:
        whitening, info = workflow.retain_whitening(backbone, backbone_tokenizer(backbone),
                                                    data.load_facts(args.covariance), coordinate,
                                                    shrinkage=args.shrinkage)
        print(f"covariance-regularised: C from {info['tokens']} tokens of {info['retain_facts']} retain facts")
    keys, deltas, rows = capture(backbone, encoded, pad_id, coordinate, args, capture_steps, args.key_positions,
                                 sampler_capture)
    mem.check_hyperparameters(args.alpha, args.lam, args.q, len(keys))
    memory, key_scale = mem.build(keys, deltas, layer=coordinate.layer, module=coordinate.module,
                                  alpha=args.alpha, lam=args.lam, q=args.q, whitening=whitening)
    if args.gate_rate is not None:
        gate, info = workflow.retain_gate(backbone, backbone_tokenizer(backbone), data.load_facts(args.gate_facts),
                                          memory, rate=args.gate_rate)
        memory = mem.with_gate(memory, gate)
        print(f"gated: cosine >= {gate:.4f} (edits {args.gate_rate:g} of {info['tokens']} tokens of "
              f"{info['retain_facts']} retain facts)")
    record = mem.MemoryRecord(memory, coordinate, args.lam, key_scale, tuple(encoded[r].fact.where for r in rows),
                              backbone.fingerprint(), capture_steps, args.key_positions, sampler_capture)
    mem.save(record, args.out, overwrite=args.overwrite)
    along = "" if sampler_capture is None else (
        f" and sampler steps {','.join(map(str, sampler_capture.capture_steps))} of G={sampler_capture.gen_length}")
    entries = "" if memory.size == len(encoded) else (
        f" ({memory.size} entries: steps {','.join(map(str, capture_steps))}{along}, {args.key_positions} tokens)")
    print(f"wrote an edit memory of {len(encoded)} fact(s){entries} at layer {coordinate.layer}, module "
          f"{coordinate.module}, step {coordinate.step} (α={args.alpha:g}, λ={args.lam:g}, "
          f"q={args.q or memory.size}) to {args.out}")
    return 0
