"""`timerome trace`: the TIE grid over a fact file, with heatmaps and the selected coordinate."""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

import ports
from ports.fileio import atomic_directory
from timerome_jax import pipeline, tracing
from timerome_jax.commands import _mesh
from timerome_jax.errors import InputError
from timerome_jax.facts import read_facts
from timerome_jax.plots import tie_heatmaps
from timerome_jax.tokenization import backbone_tokenizer, pad_token_id

DEFAULT_MODEL = "tofu-tiny"


def register(sub, common) -> None:
    p = sub.add_parser("trace", parents=[common], help="diffusion-time causal tracing (TIE grid)")
    add_trace_arguments(p)
    _mesh.add_mesh_argument(p)
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(run=run)


def add_trace_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or embedded name")
    p.add_argument("--facts", required=True, help="JSONL facts (question/answer or prompt/subject/target)")
    p.add_argument("--num-facts", type=int, default=None, help="trace the first N usable facts")
    p.add_argument("--steps", type=int, default=8, help="denoising steps K")
    p.add_argument("--noise-samples", type=int, default=10, help="noise draws R")
    p.add_argument("--noise-scale", type=float, default=3.0, help="ν: noise std in units of σ")
    p.add_argument("--modules", default="resid,attn,mlp", help="comma-separated: resid, attn, mlp")
    p.add_argument("--window", type=int, default=1, help="consecutive layers restored")
    p.add_argument("--mode", choices=("teacher", "propagated"), default="teacher")
    p.add_argument("--k-min", type=int, default=0, help="coordinate averages TIE over steps >= k-min")
    p.add_argument("--facts-per-chunk", type=int, default=4)
    p.add_argument("--cells-per-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def trace_config(args: argparse.Namespace) -> tracing.TraceConfig:
    modules = tuple(m.strip() for m in args.modules.split(",") if m.strip())
    return tracing.TraceConfig(steps=args.steps, noise_samples=args.noise_samples, noise_scale=args.noise_scale,
                               modules=modules, window=args.window, mode=args.mode,
                               cells_per_batch=args.cells_per_batch)


def trace(args: argparse.Namespace, backbone: ports.Backbone | None = None):
    """Run the grid; returns (backbone, encoded facts, result, summary dict)."""
    config = trace_config(args)
    if args.num_facts is not None and args.num_facts < 1:
        raise InputError(f"--num-facts must be >= 1, got {args.num_facts}")
    if args.facts_per_chunk < 1:
        raise InputError("--facts-per-chunk must be >= 1")
    facts = read_facts(args.facts)
    mesh = _mesh.mesh_from_args(args)
    backbone = backbone or _mesh.backbone_on_mesh(args, args.model)
    tokenizer = backbone_tokenizer(backbone)
    encoded, skipped = pipeline.encode_for_tracing(tokenizer, facts, backbone.config.max_seq_len)
    if skipped:
        print(f"timerome trace: skipped {len(skipped)} fact(s) whose question does not name its subject: "
              f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", file=sys.stderr)
    encoded = encoded[: args.num_facts] if args.num_facts else encoded
    batch = pipeline.trace_batch(encoded, pad_token_id(tokenizer, backbone))
    progress = _progress("tracing", unit="chunk")
    if mesh is None:
        result, sigma, seconds = pipeline.run_grid(backbone, batch, jax.random.key(args.seed), config,
                                                   args.facts_per_chunk, progress)
    else:  # --facts-per-chunk then counts facts per data shard
        from timerome_jax import distributed

        result, sigma, seconds = distributed.run_grid(backbone, batch, jax.random.key(args.seed), config,
                                                      mesh, args.facts_per_chunk, progress)
    coordinate = tracing.select_coordinate(result.tie, config.modules, args.k_min)
    per_fact = tracing.per_fact_coordinates(result.tie, config.modules, args.k_min)
    mi = config.modules.index(coordinate.module)
    gap_K = (result.clean_lp - result.corrupted_lp).mean(axis=0)
    best_K = result.tie[:, :, coordinate.layer, mi].mean(axis=0)
    summary = {
        "coordinate": coordinate.as_dict(),
        "per_fact_coordinates": [c.as_dict() for c in per_fact],
        "num_facts": len(encoded), "skipped_facts": skipped, "shape": list(result.tie.shape),
        "modules": list(config.modules), "seconds": round(seconds, 3), "sigma": sigma,
        "total_effect_by_step": gap_K.tolist(), "best_cell_tie_by_step": best_K.tolist(),
        "best_cell_tie": float(best_K[coordinate.step]),
        "total_effect_at_best_step": float(gap_K[coordinate.step]),
        "best_cell_share_of_total_effect": float(best_K[coordinate.step] / gap_K[coordinate.step])
        if abs(gap_K[coordinate.step]) > 1e-9 else None,
        "facts": [{"where": e.fact.where, "subject": e.subject} for e in encoded],
        "settings": {"model": str(args.model), "fingerprint": backbone.fingerprint(), "steps": config.steps,
                     "noise_samples": config.noise_samples, "noise_scale": config.noise_scale,
                     "window": config.window, "mode": config.mode, "k_min": args.k_min, "seed": args.seed},
    }
    return backbone, encoded, result, summary


def write_trace(out_dir, result: tracing.TraceResult, summary: dict, overwrite: bool = False) -> None:
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        arrays = {"tie": result.tie, "clean_lp": result.clean_lp, "corrupted_lp": result.corrupted_lp,
                  "patched_lp": result.patched_lp, "modules": np.asarray(summary["modules"])}
        if result.tie_by_readout is not None:
            arrays["tie_by_readout"] = result.tie_by_readout
        np.savez(tmp / "tie.npz", **arrays)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        tie_heatmaps(result.tie.mean(axis=0), summary["modules"], tmp, num_facts=summary["num_facts"],
                     coordinate=summary["coordinate"])


def _progress(desc: str, unit: str):
    from tqdm import tqdm

    return lambda items: tqdm(items, desc=desc, unit=unit, file=sys.stderr, leave=False)


def run(args: argparse.Namespace) -> int:
    _, _, result, summary = trace(args)
    write_trace(args.out, result, summary, overwrite=args.overwrite)
    c = summary["coordinate"]
    share = summary["best_cell_share_of_total_effect"]
    print(f"traced {summary['num_facts']} facts in {summary['seconds']:.1f} s; coordinate: layer {c['layer']}, "
          f"step {c['step']}, module {c['module']}; TIE there {summary['best_cell_tie']:.3f} nats of a total "
          f"effect of {summary['total_effect_at_best_step']:.3f}"
          + (f" ({share:.0%})" if share is not None else "") + f"; wrote {args.out}")
    return 0
