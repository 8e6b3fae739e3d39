"""Sampler tokens/s and answer log-likelihood evaluations/s on the CPU: one batched call versus a
loop over one prompt at a time, measured side by side in the same run.

    .venv/bin/python benchmarks/diffusion_throughput.py [--model tests/fixtures/llada] [--pairs 8]

Both sides are compiled before timing (every prompt length of the loop included), so the ratio is
steady-state throughput; compile times are printed separately. Each timing is the best of
`--repeats` runs. Prompts and answers are random token ids of varying lengths (seeded).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import ports  # noqa: E402
from timerome_jax import likelihood, sampler  # noqa: E402
from timerome_jax.tokenization import pad_left, pad_right  # noqa: E402


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def timed_first_call(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tests/fixtures/llada")
    parser.add_argument("--pairs", type=int, default=8, help="prompts / QA pairs per batch")
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--mc-samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    backbone = ports.load_pretrained(args.model)
    rng = np.random.default_rng(args.seed)
    special = {backbone.mask_token_id, backbone.config.eos_token_id, backbone.config.pad_token_id}
    ordinary = np.array([t for t in range(backbone.config.vocab_size) if t not in special])
    prompts = [rng.choice(ordinary, rng.integers(4, 21)).tolist() for _ in range(args.pairs)]
    answers = [rng.choice(ordinary, rng.integers(4, 17)).tolist() for _ in range(args.pairs)]
    pad = int(backbone.config.pad_token_id or 0)
    keys = jax.random.split(jax.random.key(args.seed), args.pairs)

    print(f"model {args.model} ({backbone.config.family}, {backbone.num_params():,} parameters), "
          f"device {jax.devices()[0].platform}, {os.cpu_count()} CPU cores")
    real = sum(map(len, prompts)) + sum(map(len, answers))
    padded = args.pairs * (max(map(len, prompts)) + max(map(len, answers)))
    print(f"{args.pairs} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"answers of {min(map(len, answers))}-{max(map(len, answers))} tokens "
          f"(padding: the batch computes {padded / real:.2f}x the real prompt+answer tokens); "
          f"best of {args.repeats}\n")
    rows = []

    # ------------------------------------------------------------------ sampler
    schedule = dict(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length)
    ids, mask = pad_left(prompts, pad)

    def batched_sample():
        return sampler.sample_jit(backbone, ids, mask, keys, **schedule)

    singles = [pad_left([p], pad) for p in prompts]

    def looped_sample():
        return [sampler.sample_jit(backbone, i, m, keys[n:n + 1], **schedule)
                for n, (i, m) in enumerate(singles)]

    compile_b, compile_l = timed_first_call(batched_sample), timed_first_call(looped_sample)
    t_b, t_l = best_time(batched_sample, args.repeats), best_time(looped_sample, args.repeats)
    tokens = args.pairs * args.gen_length
    rows.append((f"sampler (G={args.gen_length}, K={args.steps}, block {args.block_length})",
                 "tokens/s", tokens / t_b, tokens / t_l, compile_b, compile_l))

    # ------------------------------------------------------------------ likelihoods
    a_ids, a_mask = pad_right(answers, pad)
    single_pairs = [(*pad_left([p], pad), *pad_right([a], pad)) for p, a in zip(prompts, answers)]
    for method in likelihood.METHODS:
        kw = dict(method=method, mc_samples=args.mc_samples, batch_size=args.batch_size)

        def batched_ll(kw=kw):
            return likelihood.answer_log_likelihood_jit(backbone, ids, mask, a_ids, a_mask, keys, **kw)

        def looped_ll(kw=kw):
            return [likelihood.answer_log_likelihood_jit(backbone, *pair, keys[n:n + 1], **kw)
                    for n, pair in enumerate(single_pairs)]

        compile_b, compile_l = timed_first_call(batched_ll), timed_first_call(looped_ll)
        np.testing.assert_allclose(np.asarray(batched_ll()),
                                   np.concatenate([np.asarray(x) for x in looped_ll()]),
                                   rtol=1e-4, atol=1e-3)
        t_b, t_l = best_time(batched_ll, args.repeats), best_time(looped_ll, args.repeats)
        label = f"log-likelihood {method}" + (f" (M={args.mc_samples})" if method == "mc_elbo" else "")
        rows.append((label, "evals/s", args.pairs / t_b, args.pairs / t_l, compile_b, compile_l))

    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'unit':8}  {'batched':>10}  {'one-at-a-time':>13}  {'ratio':>6}  "
          f"{'compile b / loop (s)':>20}")
    for label, unit, batched, looped, compile_b, compile_l in rows:
        print(f"{label:{width}}  {unit:8}  {batched:10.1f}  {looped:13.1f}  {batched / looped:5.1f}x"
              f"  {compile_b:9.1f} / {compile_l:.1f}")


if __name__ == "__main__":
    main()
