"""TIE grid throughput: the vmapped grid vs a jitted one-cell-at-a-time Python loop, measured in
one run, plus the grid's achieved FLOP/s as a fraction of this machine's fp32 matmul peak (also
measured here) and the ratio of FLOPs done to the minimal residual-grid work.

    python benchmarks/tie_grid.py                 # tofu-tiny-sized random LLaDA (d=256, 6 layers)
    python benchmarks/tie_grid.py --d-model 64 --layers 3 --quick

Absolute times on shared CPUs mean little; the printed ratios are the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ports import Backbone, Transformer, TransformerConfig
from timerome_jax import tracing as tr
from timerome_jax.facts import fact_batch


def random_backbone(d_model: int, layers: int, heads: int, mlp: int, vocab: int, seed: int = 0) -> Backbone:
    config = TransformerConfig(family="llada", vocab_size=vocab, d_model=d_model, n_layers=layers,
                               n_heads=heads, n_kv_heads=heads, head_dim=d_model // heads,
                               mlp_hidden=mlp, rope_theta=500000.0, norm_eps=1e-5, max_seq_len=512,
                               mask_token_id=vocab - 1, pad_token_id=vocab - 2)
    params = Transformer(config).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    return Backbone(config=config, params=params, mask_token_id=vocab - 1)


def layer_flops(c: TransformerConfig, tokens: int) -> float:
    """Matmul FLOPs of one block over `tokens` tokens (2 per multiply-add)."""
    proj = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    mlp = 3 * c.d_model * c.mlp_hidden
    attention = 2 * tokens * c.n_heads * c.head_dim
    return 2 * tokens * (proj + mlp + attention)


def head_flops(c: TransformerConfig, tokens: int) -> float:
    return 2 * tokens * c.d_model * c.vocab_size


def forward_flops(c: TransformerConfig, tokens: int) -> float:
    return c.n_layers * layer_flops(c, tokens) + head_flops(c, tokens)


def time_call(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(n: int = 1536, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(lambda a, b: a @ b)
    return 2 * n ** 3 / time_call(lambda: dot(a, b), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--facts", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--answer-len", type=int, default=24)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--noise-samples", type=int, default=2)
    ap.add_argument("--cells-per-batch", type=int, default=96)
    ap.add_argument("--loop-cells", type=int, default=60, help="cells timed in the one-cell loop")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.d_model, args.layers, args.mlp, args.vocab, args.steps, args.loop_cells = 64, 3, 128, 384, 4, 20

    bb = random_backbone(args.d_model, args.layers, args.heads, args.mlp, args.vocab)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, args.vocab - 2, args.prompt_len)) for _ in range(args.facts)]
    answers = [list(rng.integers(0, args.vocab - 2, args.answer_len)) for _ in range(args.facts)]
    batch = fact_batch(prompts, answers, [(2, 6)] * args.facts, pad_id=args.vocab - 2)
    sigma = tr.subject_embedding_std(bb, batch)
    cfg = tr.TraceConfig(steps=args.steps, noise_samples=args.noise_samples,
                         cells_per_batch=args.cells_per_batch)
    key = jax.random.key(0)
    c = bb.config
    M = len(cfg.modules)
    T = batch.input_ids_FT.shape[1]

    grid_cells = args.facts * cfg.steps * cfg.noise_samples * c.n_layers * M
    corrupted_cells = args.facts * cfg.steps * cfg.noise_samples
    clean_forwards = args.facts * cfg.steps
    full_cfg = dataclasses.replace(cfg, share_prefix=False)
    shared_seconds = time_call(lambda: tr.tie_grid(bb, batch, sigma, key, cfg).tie, repeats=2)
    full_seconds = time_call(lambda: tr.tie_grid(bb, batch, sigma, key, full_cfg).tie, repeats=2)

    # one cell at a time: the same per-cell forward, jitted once, called from Python
    states, masked, clean, _ = jax.jit(lambda b: tr.clean_run(bb, b.input_ids_FT[0], b.attention_mask_FT[0],
                                                              b.answer_mask_FT[0], b.subject_pos_FS[0], cfg.steps))(batch)
    noise = jax.random.normal(key, (batch.subject_pos_FS.shape[1], c.d_model)) * 3 * sigma

    @jax.jit
    def one_cell(k, layer, module):
        pos, valid = batch.subject_pos_FS[0], batch.subject_valid_FS[0]
        edits = (tr.noise_edit(pos, valid, noise), *tr.patch_edits(clean[k], pos, valid, layer, module, cfg.window))
        logits = bb.apply(states[k][None], batch.attention_mask_FT[0][None], edits=edits)[0]
        return tr.answer_readout(logits, batch.input_ids_FT[0], masked[k], c.logit_shift)

    cells = [(k % cfg.steps, (k // cfg.steps) % c.n_layers, k % M) for k in range(args.loop_cells)]
    jax.block_until_ready(one_cell(*map(jnp.int32, cells[0])))
    start = time.perf_counter()
    for k, layer, module in cells:
        jax.block_until_ready(one_cell(jnp.int32(k), jnp.int32(layer), jnp.int32(module)))
    loop_rate = len(cells) / (time.perf_counter() - start)

    T_flops = forward_flops(c, T)
    base = (clean_forwards + corrupted_cells) * T_flops
    columns = grid_cells // c.n_layers  # cells per patch layer
    starts = [max(0, layer - cfg.window // 2) for layer in range(c.n_layers)]
    shared_flops = base + columns * sum((c.n_layers - s) * layer_flops(c, T) + head_flops(c, T) for s in starts)
    full_flops = base + grid_cells * T_flops
    # the minimum: every patched cell must run the layers from its window upward and the head
    minimal_flops = shared_flops
    peak = matmul_peak()
    loop_fraction = loop_rate * T_flops / peak
    print(f"device                 {jax.devices()[0].device_kind} ({jax.default_backend()}), {jax.device_count()} device(s)")
    print(f"model                  d={c.d_model} L={c.n_layers} F={c.mlp_hidden} V={c.vocab_size}, T={T} tokens")
    print(f"grid                   {args.facts} facts x K={cfg.steps} x R={cfg.noise_samples} x L={c.n_layers} x M={M} = {grid_cells} cells")
    print(f"fp32 matmul peak       {peak / 1e9:,.1f} GFLOP/s (measured, 1536^3 matmul)")
    for name, seconds, flops in (("grid, cached prefix", shared_seconds, shared_flops),
                                 ("grid, full forwards", full_seconds, full_flops)):
        rate = grid_cells / seconds
        print(f"{name:22s} {seconds:.3f} s -> {rate:,.0f} cells/s = {rate / loop_rate:.1f}x the loop (target >= 5x); "
              f"{flops / seconds / 1e9:,.1f} GFLOP/s = {flops / seconds / peak:.0%} of peak (target >= 30%); "
              f"FLOPs done / minimal {flops / minimal_flops:.2f}")
    print(f"one-cell jitted loop   {loop_rate:,.0f} cells/s ({len(cells)} cells timed) = {loop_fraction:.0%} of peak, "
          f"so at equal FLOPs no grid can beat it by more than {1 / loop_fraction:.1f}x")


if __name__ == "__main__":
    main()
