"""TIE grid throughput of the three methods (exact, atp, hybrid) measured side by side in one
run on the same facts: cells per second, the speed-up over exact, achieved FLOP/s as a fraction of
this machine's fp32 matmul peak (measured here), FLOPs done over the minimum each method needs,
and the one-cell-at-a-time jitted loop the vmapped grid replaces.

    python benchmarks/tie_grid.py                 # tofu-tiny-sized random LLaDA (d=256, 6 layers)
    python benchmarks/tie_grid.py --model tofu-tiny --data "forget01_subjects[:40]" --noise-samples 10
    python benchmarks/tie_grid.py --d-model 64 --layers 3 --quick

FLOPs are matmul FLOPs (2 per multiply-add). A backward pass counts twice its forward. The head
runs at the answer rows only (A of T positions) except in the clean run.

Absolute times on shared CPUs mean little; the printed ratios are the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import ports
from ports import Backbone, Transformer, TransformerConfig
from timerome_jax import api
from timerome_jax import tracing as tr
from timerome_jax.facts import fact_batch

METHODS = ("exact", "atp", "hybrid")


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


def patched_cell_flops(c: TransformerConfig, T: int, A: int, layers_N: np.ndarray, cfg: tr.TraceConfig) -> tuple[float, float]:
    """(done, minimal) FLOPs of patched cells whose patch layers are `layers_N`, run as
    `tracing._patched_readouts` runs them: sorted by layer, `cells_per_batch` at a time, each batch
    from its lowest window start (padding cells included). Minimal: each cell from its own start."""
    if len(layers_N) == 0:
        return 0.0, 0.0
    L, B = c.n_layers, min(cfg.cells_per_batch, len(layers_N))
    starts = np.sort(np.maximum(np.asarray(layers_N) - cfg.window // 2, 0))
    padded = np.concatenate([starts, np.repeat(starts[-1], (-len(starts)) % B)])
    lo = padded.reshape(-1, B).min(axis=1)
    done = B * float(np.sum(L - lo)) * layer_flops(c, T) + len(padded) * head_flops(c, A)
    minimal = float(np.sum(L - starts)) * layer_flops(c, T) + len(starts) * head_flops(c, A)
    return done, minimal


def grid_flops(c: TransformerConfig, T: int, A: int, facts: int, cfg: tr.TraceConfig,
               confirmed_layers: np.ndarray | None = None) -> tuple[float, float]:
    """(done, minimal) matmul FLOPs of one teacher-forced grid with `cfg.method`: the clean run,
    one corrupted forward per (fact, step, draw) (with its backward for atp / hybrid), and the
    patched cells (every cell for exact; for hybrid those at `confirmed_layers`, one entry per
    confirmed cell and draw)."""
    K, R, L, M = cfg.steps, cfg.noise_samples, c.n_layers, len(cfg.modules)
    corrupted = L * layer_flops(c, T) + head_flops(c, A)
    base = facts * K * forward_flops(c, T) + facts * K * R * corrupted * (1 if cfg.method == "exact" else 3)
    if cfg.method == "atp":
        return base, base
    layers = np.repeat(np.arange(L), facts * K * R * M) if cfg.method == "exact" else confirmed_layers
    done, minimal = patched_cell_flops(c, T, A, layers, cfg)
    return base + done, base + minimal


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


def benchmark_batch(args):
    """(backbone, FactBatch): an embedded or local model with data (--model), else random."""
    if args.model:
        backbone = ports.load_pretrained(args.model)
        return backbone, api.encode(backbone, api.tokenizer(backbone), api.load_facts(args.data)).batch
    bb = random_backbone(args.d_model, args.layers, args.heads, args.mlp, args.vocab)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, args.vocab - 2, args.prompt_len)) for _ in range(args.facts)]
    answers = [list(rng.integers(0, args.vocab - 2, args.answer_len)) for _ in range(args.facts)]
    return bb, fact_batch(prompts, answers, [(2, 6)] * args.facts, pad_id=args.vocab - 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="embedded name or checkpoint dir (default: a random LLaDA)")
    ap.add_argument("--data", default="forget01_subjects[:40]", help="facts traced with --model")
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
    ap.add_argument("--confirm-top", type=int, default=3, help="hybrid: columns confirmed per fact")
    ap.add_argument("--facts-per-chunk", type=int, default=4)
    ap.add_argument("--cells-per-batch", type=int, default=64)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--loop-cells", type=int, default=60, help="cells timed in the one-cell loop")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.d_model, args.layers, args.mlp, args.vocab, args.steps, args.loop_cells = 64, 3, 128, 384, 4, 20
    methods = [m.strip() for m in args.methods.split(",")]

    bb, batch = benchmark_batch(args)
    c = bb.config
    cfg = tr.TraceConfig(steps=args.steps, noise_samples=args.noise_samples, cells_per_batch=args.cells_per_batch,
                         confirm_top=args.confirm_top)
    key = jax.random.key(0)
    F, T = batch.num_facts, batch.input_ids_FT.shape[1]
    A = batch.answer_pos_FA.shape[1]
    M = len(cfg.modules)
    grid_cells = F * cfg.steps * cfg.noise_samples * c.n_layers * M
    peak = matmul_peak()
    warm = batch.take(np.arange(min(args.facts_per_chunk, F)))

    rows = {}
    for method in methods:   # compile on one chunk, then time the whole set once
        mcfg = dataclasses.replace(cfg, method=method)
        tr.trace(bb, warm, mcfg, key, facts_per_chunk=args.facts_per_chunk)
        start = time.perf_counter()
        traced = tr.trace(bb, batch, mcfg, key, facts_per_chunk=args.facts_per_chunk)
        seconds = time.perf_counter() - start
        confirmed = None
        if traced.result.confirmed is not None:   # patch layers of every confirmed cell and draw
            confirmed = np.repeat(np.nonzero(traced.result.confirmed)[2], cfg.noise_samples)
        done, minimal = grid_flops(c, T, A, F, mcfg, confirmed)
        rows[method] = (seconds, done, minimal, traced)

    # one cell at a time: the same per-cell forward, jitted once, called from Python
    states, masked, clean, _ = jax.jit(lambda b: tr.clean_run(bb, b.input_ids_FT[0], b.attention_mask_FT[0],
                                                              b.answer_mask_FT[0], b.subject_pos_FS[0], cfg.steps))(batch)
    sigma = tr.subject_embedding_std(bb, batch)
    noise = jax.random.normal(key, (batch.subject_pos_FS.shape[1], c.d_model)) * 3 * sigma

    @jax.jit
    def one_cell(k, layer, module):
        pos, valid = batch.subject_pos_FS[0], batch.subject_valid_FS[0]
        edits = (tr.noise_edit(pos, valid, noise), *tr.patch_edits(clean[k], pos, valid, layer, module, cfg.window))
        logits = bb.apply(states[k][None], batch.attention_mask_FT[0][None], edits=edits,
                          logit_rows_BA=tr.logit_rows(batch, 0, c.logit_shift)[None])[0]
        return tr.readout_at_answer(logits, batch, 0, masked[k])

    cells = [(k % cfg.steps, (k // cfg.steps) % c.n_layers, k % M) for k in range(args.loop_cells)]
    jax.block_until_ready(one_cell(*map(jnp.int32, cells[0])))
    start = time.perf_counter()
    for k, layer, module in cells:
        jax.block_until_ready(one_cell(jnp.int32(k), jnp.int32(layer), jnp.int32(module)))
    loop_rate = len(cells) / (time.perf_counter() - start)
    cell_flops = c.n_layers * layer_flops(c, T) + head_flops(c, A)

    print(f"device                 {jax.devices()[0].device_kind} ({jax.default_backend()}), {jax.device_count()} device(s)")
    print(f"model                  {args.model or 'random LLaDA'}: d={c.d_model} L={c.n_layers} F={c.mlp_hidden} "
          f"V={c.vocab_size}, T={T} tokens, answer rows A={A}")
    print(f"grid                   {F} facts x K={cfg.steps} x R={cfg.noise_samples} x L={c.n_layers} x M={M} = "
          f"{grid_cells} cells" + (f"; hybrid confirms {cfg.confirm_top} columns per fact" if "hybrid" in rows else ""))
    print(f"fp32 matmul peak       {peak / 1e9:,.1f} GFLOP/s (measured, 1536^3 matmul)")
    exact_seconds = rows["exact"][0] if "exact" in rows else None
    for method, (seconds, done, minimal, traced) in rows.items():
        rate = grid_cells / seconds
        speedup = f"{exact_seconds / seconds:.2f}x exact" if exact_seconds else "no exact run"
        print(f"{method:22s} {seconds:8.2f} s -> {rate:9,.0f} cells/s = {speedup}; "
              f"{done / seconds / 1e9:,.1f} GFLOP/s = {done / seconds / peak:.0%} of peak; "
              f"FLOPs done / minimal {done / minimal:.3f}; coordinate {traced.coordinate.layer},"
              f"{traced.coordinate.module},{traced.coordinate.step}")
    print(f"one-cell jitted loop   {loop_rate:,.0f} cells/s ({len(cells)} cells timed) = "
          f"{loop_rate * cell_flops / peak:.0%} of peak")
    if "exact" in rows:
        exact = rows["exact"][3].result.tie
        exact_per_fact = tr.per_fact_coordinates(exact, cfg.modules)
        for method, (_, _, _, traced) in rows.items():
            if method == "exact":
                continue
            if traced.result.estimated_tie is not None and method == "atp":
                a = tr.rank_agreement(exact, traced.result.estimated_tie, cfg.modules)
                print(f"atp vs exact           Spearman per fact: resid {a['spearman_resid']:.3f}, attn "
                      f"{a['spearman_attn']:.3f}, mlp {a['spearman_mlp']:.3f}, all cells {a['spearman_all_cells']:.3f}; "
                      f"top-1 cell {a['top1']:.2f}, top-5 overlap {a['top5_overlap']:.2f}")
            per_fact = tr.per_fact_coordinates(tr.selection_grid(traced.result), cfg.modules)
            c = tr.coordinate_agreement(exact_per_fact, per_fact, exact, cfg.modules)
            print(f"{method} coordinates{' ' * (11 - len(method))}fact-averaged "
                  f"{'same as' if traced.coordinate == rows['exact'][3].coordinate else 'differs from'} exact; "
                  f"per fact: same {c['same_coordinate']:.2f}, within 1% of the exact best {c['within_1%_of_exact_best']:.2f}")
        print(f"exact grid vs loop     {grid_cells / exact_seconds / loop_rate:.1f}x the loop's cells/s")


if __name__ == "__main__":
    main()
