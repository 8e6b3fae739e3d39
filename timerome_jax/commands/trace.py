"""`timerome trace`: the TIE grid over a fact file, with heatmaps and the selected coordinate."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import ports
from ports.fileio import atomic_directory
from timerome_jax import api, tracing
from timerome_jax.commands._mesh import Placement, add_mesh_argument
from timerome_jax.errors import InputError
from timerome_jax.plots import tie_heatmaps

DEFAULT_MODEL = "tofu-tiny"
# a total effect (clean − corrupted answer log-probability) below this many nats is no effect: the
# corruption does not change what the model answers, so no cell can be said to carry the fact
MIN_EFFECT = 1e-3


def register(sub, common) -> None:
    p = sub.add_parser("trace", parents=[common], help="diffusion-time causal tracing (TIE grid)")
    add_trace_arguments(p)
    add_mesh_argument(p)
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(run=run, outputs=(("out", "dir"),))


def add_trace_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or embedded name")
    p.add_argument("--facts", required=True, help="JSONL facts (question/answer or prompt/subject/target)")
    p.add_argument("--num-facts", type=int, default=None, help="trace the first N usable facts")
    p.add_argument("--steps", type=int, default=8, help="denoising steps K")
    p.add_argument("--noise-samples", type=int, default=10, help="noise draws R")
    p.add_argument("--noise-scale", type=float, default=3.0, help="ν: noise std in units of σ")
    p.add_argument("--modules", default=None,
                   help="comma-separated: resid, attn, mlp (default all three; 'mlp' for `edit --rewrite`, as ROME)")
    p.add_argument("--window", type=int, default=1, help="consecutive layers restored")
    p.add_argument("--mode", choices=("teacher", "propagated"), default="teacher")
    p.add_argument("--method", choices=("exact", "atp", "hybrid"), default="exact",
                   help="exact: patch every cell; atp: attribution-patching estimate of every cell (one "
                        "backward per fact, step and draw); hybrid: atp, then each fact's --confirm-top best "
                        "(layer, module) columns patched exactly")
    p.add_argument("--confirm-top", type=int, default=3, help="hybrid: columns confirmed exactly per fact")
    p.add_argument("--k-min", type=int, default=0, help="coordinate averages TIE over steps >= k-min")
    p.add_argument("--facts-per-chunk", type=int, default=4)
    p.add_argument("--cells-per-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def trace_config(args: argparse.Namespace) -> tracing.TraceConfig:
    # rewrites trace the MLP sites, as ROME locates the MLP that recalls the old object
    default = "mlp" if getattr(args, "rewrite", False) else "resid,attn,mlp"
    modules = tuple(m.strip() for m in (args.modules or default).split(",") if m.strip())
    return tracing.TraceConfig(steps=args.steps, noise_samples=args.noise_samples, noise_scale=args.noise_scale,
                               modules=modules, window=args.window, mode=args.mode,
                               cells_per_batch=args.cells_per_batch, method=args.method,
                               confirm_top=args.confirm_top)


def read_facts(args: argparse.Namespace) -> list[api.Fact]:
    """The --facts records, checked with --num-facts before any model is loaded."""
    if getattr(args, "num_facts", None) is not None and args.num_facts < 1:
        raise InputError(f"--num-facts must be >= 1, got {args.num_facts}")
    return api.read_facts(args.facts)


def encode_facts(args: argparse.Namespace, backbone: ports.Backbone, tokenizer, records, command: str) -> api.Facts:
    """The --facts of a command, encoded, cut to --num-facts."""
    facts = api.encode(backbone, tokenizer, records)
    return facts.take(range(min(args.num_facts, facts.num_facts))) if getattr(args, "num_facts", None) else facts


def progress(desc: str, unit: str):
    from tqdm import tqdm

    return lambda items: tqdm(items, desc=desc, unit=unit, file=sys.stderr, leave=False)


def check_trace_arguments(args: argparse.Namespace) -> tracing.TraceConfig:
    if args.facts_per_chunk < 1:
        raise InputError("--facts-per-chunk must be >= 1")
    return trace_config(args)


def trace(args: argparse.Namespace, backbone: ports.Backbone, placement: Placement, records):
    """Run the grid over the --facts `records`; returns (facts, traced, summary dict)."""
    config = check_trace_arguments(args)
    facts = encode_facts(args, backbone, api.tokenizer(backbone), records, "trace")
    traced = api.trace(backbone, facts, config, seed=args.seed, k_min=args.k_min,   # per data shard on a mesh
                       facts_per_chunk=args.facts_per_chunk, mesh=placement.mesh, progress=progress("tracing", "chunk"))
    result, coordinate = traced.result, traced.coordinate
    per_fact = tracing.per_fact_coordinates(tracing.selection_grid(result), config.modules, args.k_min)
    mi = config.modules.index(coordinate.module)
    gap_K = (result.clean_lp - result.corrupted_lp).mean(axis=0)
    best_K = result.tie[:, :, coordinate.layer, mi].mean(axis=0)
    warnings = []
    if not all(np.isfinite(x).all() for x in (result.tie, result.clean_lp, result.corrupted_lp)):
        warnings.append("the grid holds non-finite values (NaN or inf): the coordinate is not a finding")
    if not gap_K[coordinate.step] > MIN_EFFECT:
        warnings.append(f"the corruption does not lower the answers' log-probability at step {coordinate.step} "
                        f"(total effect {gap_K[coordinate.step]:.4f} nats <= {MIN_EFFECT}): the model does not use the "
                        "subject to answer, so the coordinate is not a finding")
    summary = {
        "coordinate": coordinate.as_dict(), "warnings": warnings,
        "per_fact_coordinates": [c.as_dict() | _cell_values(result, f, c, config.modules)
                                 for f, c in enumerate(per_fact)],
        "num_facts": facts.num_facts, "shape": list(result.tie.shape),
        "modules": list(config.modules), "seconds": round(traced.seconds, 3), "sigma": traced.sigma,
        "total_effect_by_step": gap_K.tolist(), "best_cell_tie_by_step": best_K.tolist(),
        "best_cell_tie": float(best_K[coordinate.step]),
        "total_effect_at_best_step": float(gap_K[coordinate.step]),
        "best_cell_share_of_total_effect": float(best_K[coordinate.step] / gap_K[coordinate.step])
        if gap_K[coordinate.step] > MIN_EFFECT else None,
        "facts": [{"where": f.where, "subject": s} for f, s in zip(facts.facts, facts.subjects)],
        "method": config.method,
        "settings": {"model": str(args.model), "fingerprint": backbone.fingerprint(), "steps": config.steps,
                     "noise_samples": config.noise_samples, "noise_scale": config.noise_scale,
                     "window": config.window, "mode": config.mode, "k_min": args.k_min, "seed": args.seed,
                     "method": config.method} | ({"confirm_top": config.confirm_top} if config.method == "hybrid" else {}),
    }
    if result.estimated_tie is not None:   # the estimate beside what the exact grid confirmed
        summary["coordinate"] |= {
            "estimated_tie": float(result.estimated_tie[:, coordinate.step, coordinate.layer, mi].mean())}
    if result.confirmed is not None:
        confirmed = np.asarray(result.confirmed)
        summary["coordinate"]["confirmed_facts"] = int(confirmed[:, coordinate.step, coordinate.layer, mi].sum())
        summary["confirmed_cells_per_fact"] = int(confirmed[0].sum())
    return facts, traced, summary


def _cell_values(result: tracing.TraceResult, f: int, c: tracing.Coordinate, modules) -> dict:
    """A per-fact coordinate's TIE (exact where computed) and, for atp / hybrid, its estimate."""
    cell = (f, c.step, c.layer, modules.index(c.module))
    out = {"tie": float(result.tie[cell])}
    if result.estimated_tie is not None:
        out["estimated_tie"] = float(result.estimated_tie[cell])
    if result.confirmed is not None:
        out["confirmed"] = bool(result.confirmed[cell])
    return out


def write_trace(out_dir, result: tracing.TraceResult, summary: dict, overwrite: bool = False) -> None:
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        arrays = {"tie": result.tie, "clean_lp": result.clean_lp, "corrupted_lp": result.corrupted_lp,
                  "patched_lp": result.patched_lp, "modules": np.asarray(summary["modules"])}
        for name in ("tie_by_readout", "estimated_tie", "confirmed"):
            if getattr(result, name) is not None:
                arrays[name] = getattr(result, name)
        np.savez(tmp / "tie.npz", **arrays)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        tie_heatmaps(result.tie.mean(axis=0), summary["modules"], tmp, num_facts=summary["num_facts"],
                     coordinate=summary["coordinate"])


def run(args: argparse.Namespace) -> int:
    check_trace_arguments(args)
    records = read_facts(args)
    placement = Placement.from_args(args)
    _, traced, summary = trace(args, placement.load(args.model), placement, records)
    write_trace(args.out, traced.result, summary, overwrite=args.overwrite)
    c = summary["coordinate"]
    share = summary["best_cell_share_of_total_effect"]
    for warning in summary["warnings"]:
        print(f"timerome trace: warning: {warning}", file=sys.stderr)
    print(f"traced {summary['num_facts']} facts ({summary['method']}) in {summary['seconds']:.1f} s; coordinate: layer {c['layer']}, "
          f"step {c['step']}, module {c['module']}; TIE there {summary['best_cell_tie']:.3f} nats of a total "
          f"effect of {summary['total_effect_at_best_step']:.3f}"
          + (f" ({share:.0%})" if share is not None else "") + f"; wrote {args.out}")
    return 0
