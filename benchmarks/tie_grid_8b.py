"""TIE-grid throughput (cells/s) and model-FLOPs utilisation on an LLaDA-8B-shaped model.

The model is `ports.presets` LLaDA-8B-Base (32 layers, d=4096, 32 heads of 128, MLP 12288,
vocabulary 126464) with random weights in bf16, created directly on the device(s) (nothing is
downloaded, nothing passes through the host). Every shape can be reduced for a smoke run.

    python benchmarks/tie_grid_8b.py                          # the full 8B shape, one accelerator
    python benchmarks/tie_grid_8b.py --mesh dp8               # 8 devices, one fact per device
    python benchmarks/tie_grid_8b.py --mesh tp8               # 8 devices, parameters split 8 ways
    python benchmarks/tie_grid_8b.py --layers 2 --d-model 256 --mlp 688 --vocab 4096 \
        --steps 2 --noise-samples 1 --answer-len 8            # CPU smoke run (seconds)
    python benchmarks/tie_grid_8b.py ... --json out.json      # also write the numbers as JSON

Model FLOPs are the matmul FLOPs the grid needs (`tie_grid.grid_flops`): the clean forwards, the
corrupted forwards (with their backward for atp / hybrid), and for every patched cell the layers
from its window upward plus the head at the answer rows (the rest equals the corrupted run, which
is reused). `--methods exact,atp,hybrid` times each on the same facts. MFU divides
the achieved rate by the device's peak: the vendor's dense bf16 figure where the device kind is
known (table below), and always by a matmul peak measured here in the same dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tie_grid import METHODS, grid_flops, time_call  # noqa: E402

from ports import Backbone, Transformer, abstract_params, presets, sharding  # noqa: E402
from timerome_jax import distributed, tracing  # noqa: E402
from timerome_jax.facts import fact_batch  # noqa: E402

# Dense (no sparsity) bf16 peak FLOP/s per device from the vendors' data sheets, matched as a
# substring of `device.device_kind`, first match wins.
PEAK_BF16 = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),        # SXM / HBM3
    ("A100", 312.0e12),
    ("L4", 121.0e12),
    ("TPU v6 lite", 918.0e12),  # v6e
    ("TPU v5 lite", 197.0e12),  # v5e
    ("TPU v5", 459.0e12),       # v5p
    ("TPU v4", 275.0e12),
)


def vendor_peak(device_kind: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16 if name in device_kind), None)


def llada_8b_config(layers: int | None, d_model: int | None, mlp: int | None, vocab: int | None):
    """The released LLaDA-8B config, with any of its sizes reduced (head_dim stays 128)."""
    c = presets.released_config(presets.LLADA_8B_BASE)
    changes = {}
    if layers:
        changes["n_layers"] = layers
    if d_model:
        heads = max(1, d_model // c.head_dim)
        changes.update(d_model=d_model, n_heads=heads, n_kv_heads=heads)
    if mlp:
        changes["mlp_hidden"] = mlp
    if vocab:
        changes.update(vocab_size=vocab, mask_token_id=vocab - 1, pad_token_id=vocab - 2,
                       eos_token_id=vocab - 2)
    return c.replace(**changes)


def random_backbone_on_devices(config, dtype, mesh=None, rules=None, seed: int = 0) -> Backbone:
    """Random parameters initialised by a jitted program whose outputs already carry their final
    shardings: an 8B model never exists on the host or whole on one device."""
    module = Transformer(config, dtype=dtype, param_dtype=dtype)
    if mesh is None:
        out = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: out, abstract_params(config))
    else:
        shardings = sharding.param_shardings(config, mesh, rules)
    init = jax.jit(lambda key: module.init(key, jnp.zeros((1, 8), jnp.int32))["params"], out_shardings=shardings)
    params = jax.block_until_ready(init(jax.random.key(seed)))
    return Backbone(config=config, params=params, mask_token_id=config.mask_token_id, dtype=dtype)


def measured_matmul_peak(dtype, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul in `dtype` on the first device."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(lambda a, b: a @ b)
    return 2 * n ** 3 / time_call(lambda: dot(a, b), repeats)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="default 32 (LLaDA-8B)")
    ap.add_argument("--d-model", type=int, default=None, help="default 4096; heads = d / 128")
    ap.add_argument("--mlp", type=int, default=None, help="default 12288")
    ap.add_argument("--vocab", type=int, default=None, help="default 126464")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--mesh", default=None, help="dpN / tpN / dpNtpM (default: one device)")
    ap.add_argument("--facts", type=int, default=None, help="facts traced (default: one per data shard)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--answer-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="K")
    ap.add_argument("--noise-samples", type=int, default=2, help="R")
    ap.add_argument("--cells-per-batch", type=int, default=64)
    ap.add_argument("--methods", default="exact", help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--confirm-top", type=int, default=3, help="hybrid: columns confirmed per fact")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after the compiling one (best kept)")
    ap.add_argument("--matmul-size", type=int, default=None, help="default 8192 on accelerators, 1024 on CPU")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    dtype = jnp.dtype(args.dtype).type
    config = llada_8b_config(args.layers, args.d_model, args.mlp, args.vocab)
    profile = sharding.parse_profile(args.mesh) if args.mesh else None
    mesh = sharding.make_mesh(profile) if profile else None
    data = sharding.data_axis_size(mesh) if mesh else 1
    facts = args.facts or data
    if facts % data:
        raise SystemExit(f"--facts {facts} must be a multiple of the data axis ({data})")

    start = time.perf_counter()
    backbone = random_backbone_on_devices(config, dtype, mesh, profile.rules if profile else None)
    init_seconds = time.perf_counter() - start

    rng = np.random.default_rng(0)
    vocab_ok = config.vocab_size - 8
    prompts = [list(rng.integers(0, vocab_ok, args.prompt_len)) for _ in range(facts)]
    answers = [list(rng.integers(0, vocab_ok, args.answer_len)) for _ in range(facts)]
    batch = fact_batch(prompts, answers, [(2, 6)] * facts, pad_id=config.pad_token_id)
    sigma = tracing.subject_embedding_std(backbone, batch)
    key = jax.random.key(0)
    c = config
    T = args.prompt_len + args.answer_len
    L = c.n_layers
    device = jax.devices()[0]
    n_devices = mesh.size if mesh is not None else 1
    n = args.matmul_size or (1024 if device.platform == "cpu" else 8192)
    measured = measured_matmul_peak(dtype, n)
    vendor = vendor_peak(device.device_kind) if dtype == jnp.bfloat16 else None
    result = {
        "device_kind": device.device_kind, "platform": device.platform, "devices": n_devices,
        "mesh": profile.name if profile else None, "dtype": args.dtype,
        "model": {"n_layers": L, "d_model": c.d_model, "n_heads": c.n_heads, "mlp_hidden": c.mlp_hidden,
                  "vocab_size": c.vocab_size, "params": int(sum(x.size for x in jax.tree.leaves(backbone.params)))},
        "init_seconds": init_seconds, "matmul_peak_measured": measured, "matmul_size": n,
        "vendor_peak_per_device": vendor, "methods": {},
    }
    print(f"device        {device.device_kind} ({device.platform}) x {n_devices}"
          + (f", mesh {profile.name}" if profile else ""))
    print(f"model         LLaDA-8B shape: L={L} d={c.d_model} heads={c.n_heads} F={c.mlp_hidden} "
          f"V={c.vocab_size}, {result['model']['params'] / 1e9:.3f} B params in {args.dtype} "
          f"(random init {init_seconds:.1f} s)")
    print(f"matmul peak   {measured / 1e12:,.3f} TFLOP/s measured per device ({n}^3, {args.dtype})"
          + (f"; vendor {vendor / 1e12:,.1f} TFLOP/s" if vendor else "; no vendor figure for this device"))
    for method in (m.strip() for m in args.methods.split(",")):
        cfg = tracing.TraceConfig(steps=args.steps, noise_samples=args.noise_samples,
                                  cells_per_batch=args.cells_per_batch, method=method, confirm_top=args.confirm_top)
        run = lambda: distributed.map_chunks(tracing.tie_grid, batch, chunk_size=facts, before=(backbone,),  # noqa: E731
                                             after=(sigma, key), static={"config": cfg}, mesh=mesh)
        start = time.perf_counter()
        out = jax.block_until_ready(run())
        first_seconds = time.perf_counter() - start  # compile + one run
        seconds = time_call(run, args.repeats)
        M = len(cfg.modules)
        cells = facts * cfg.steps * cfg.noise_samples * L * M
        confirmed = None if out.confirmed is None else np.repeat(np.nonzero(out.confirmed)[2], cfg.noise_samples)
        flops, minimal = grid_flops(c, T, args.answer_len, facts, cfg, confirmed)
        achieved = flops / seconds
        row = {"grid": {"facts": facts, "steps": cfg.steps, "noise_samples": cfg.noise_samples, "layers": L,
                        "modules": M, "tokens": T, "cells": cells, "cells_per_batch": cfg.cells_per_batch},
               "compile_and_first_run_seconds": first_seconds, "seconds": seconds,
               "cells_per_second": cells / seconds, "model_flops": flops, "flops_done_over_minimal": flops / minimal,
               "achieved_flops_per_second": achieved,
               "mfu_vs_measured_matmul": achieved / (measured * n_devices),
               "mfu_vs_vendor_peak": achieved / (vendor * n_devices) if vendor else None}
        result["methods"][method] = row
        print(f"{method:7s} grid  {facts} fact(s) x K={cfg.steps} x R={cfg.noise_samples} x L={L} x M={M} = "
              f"{cells} cells, T={T}: {seconds:.3f} s (best of {args.repeats}; compile + first run "
              f"{first_seconds:.1f} s), {cells / seconds:,.1f} cells/s, {achieved / 1e12:,.3f} TFLOP/s, "
              f"MFU {row['mfu_vs_measured_matmul']:.1%} of measured"
              + (f", {row['mfu_vs_vendor_peak']:.1%} of vendor" if vendor else "")
              + f"; FLOPs done / minimal {row['flops_done_over_minimal']:.3f}")
    if "exact" in result["methods"]:
        for method, row in result["methods"].items():
            row["speedup_over_exact"] = result["methods"]["exact"]["seconds"] / row["seconds"]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
