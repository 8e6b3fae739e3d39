"""Edit-memory costs, measured side by side in one run:

* forward latency with vs without a memory (target: overhead <= 3 %),
* build time (capture excluded) for 10, 100 and 1000 facts (target: 100x the facts <= 20x the time),
  in the dual form and in the form `memory.build` picks ("auto": primal once the capacity passes
  the key width), interleaved,
* bytes the memory adds (model weights are untouched).

    python benchmarks/memory_overhead.py [--model tofu-tiny | --random] [--facts N --module mlp --gate 0.999]

`--facts` is the number of memory entries (a selective memory of 40 facts, keys at 8 steps of
every subject token, has ~1,300); `--gate` adds the key-match gate (its cost does not depend on
the threshold: every token's cosine with every stored key is computed).

With `--random` (default when the embedded model is absent) a tofu-tiny-sized random LLaDA is used.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import ports
from timerome_jax import memory as mem

from tie_grid import random_backbone, time_call


def build_seconds(n: int, key_dim: int, value_dim: int, repeats: int = 5) -> dict[str, float]:
    """Best-of-`repeats` build time per form ("dual", "auto"), the two measured alternately."""
    rng = np.random.default_rng(n)
    keys = rng.normal(size=(n, key_dim)).astype(np.float32)
    deltas = rng.normal(size=(n, value_dim)).astype(np.float32)
    best = {"dual": float("inf"), "auto": float("inf")}
    for form in best:                                   # compile this capacity in each form
        jax.block_until_ready(mem.build(keys, deltas, layer=0, module="mlp", alpha=1.0, lam=0.1, form=form)[0])
    for _ in range(repeats):
        for form in best:
            start = time.perf_counter()
            m, _ = mem.build(keys, deltas, layer=0, module="mlp", alpha=1.0, lam=0.1, form=form)
            jax.block_until_ready(m)
            best[form] = min(best[form], time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tofu-tiny")
    ap.add_argument("--random", action="store_true", help="use a random tofu-tiny-sized model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--facts", type=int, default=40, help="memory entries for the latency test")
    ap.add_argument("--module", default="resid", choices=("mlp", "attn", "resid"),
                    help="site of the memory; its key width d_k sets the build cost (default resid: the traced "
                    "site of tofu-tiny, d_k = 256; mlp has d_k = 512)")
    ap.add_argument("--gate", type=float, default=None, help="gate the memory at this cosine")
    args = ap.parse_args()
    try:
        bb = random_backbone(256, 6, 4, 512, 2048) if args.random else ports.load_pretrained(args.model)
    except ports.UserError:
        bb = random_backbone(256, 6, 4, 512, 2048)
    c = bb.config
    ids = jnp.asarray(np.random.default_rng(0).integers(2, c.vocab_size, (args.batch, args.tokens)), jnp.int32)
    rng = np.random.default_rng(1)
    key_dim = c.mlp_hidden if args.module == "mlp" else c.d_model
    memory, _ = mem.build(rng.normal(size=(args.facts, key_dim)), rng.normal(size=(args.facts, c.d_model)),
                          layer=c.n_layers // 2, module=args.module, alpha=1.0, lam=0.1)
    if args.gate is not None:
        memory = mem.with_gate(memory, args.gate)
    plain = jax.jit(lambda bb, ids: bb.apply(ids))
    edited = jax.jit(lambda bb, m, ids: bb.apply(ids, edits=(m,)))
    # interleave the two measurements so machine noise hits both alike
    t_plain, t_edit = [], []
    jax.block_until_ready(plain(bb, ids)); jax.block_until_ready(edited(bb, memory, ids))
    for _ in range(15):
        t_plain.append(time_call(lambda: plain(bb, ids), 3))
        t_edit.append(time_call(lambda: edited(bb, memory, ids), 3))
    p, e = float(np.median(t_plain)), float(np.median(t_edit))
    builds = {n: build_seconds(n, key_dim, c.d_model) for n in (10, 100, 1000)}
    forms = {n: mem.ridge._form_for(mem.ridge._capacity_for(n), key_dim) for n in builds}
    added = sum(x.nbytes for x in jax.tree.leaves(memory))
    weights = sum(x.nbytes for x in jax.tree.leaves(bb.params))
    print(f"device            {jax.devices()[0].device_kind}")
    print(f"model             {c.family} d={c.d_model} L={c.n_layers} F={c.mlp_hidden}; batch {args.batch} x {args.tokens} tokens")
    gated = "" if args.gate is None else f", gated at {args.gate:g}"
    print(f"forward           unedited {p * 1e3:.2f} ms, edited ({args.facts} entries, {args.module} layer "
          f"{int(memory.layer)}{gated}) "
          f"{e * 1e3:.2f} ms: overhead {100 * (e / p - 1):+.1f}% (target <= 3%; medians of 15 interleaved bests)")
    for form, label in (("dual", "dual form"), ("auto", "auto form")):
        picked = "" if form == "dual" else " (" + ", ".join(f"{forms[n]}" for n in builds) + ")"
        print(f"build, {label}   (d_k = {key_dim}) " + ", ".join(f"{n} facts {t[form] * 1e3:.1f} ms" for n, t in builds.items())
              + f"{picked}: 100x facts cost {builds[1000][form] / builds[10][form]:.1f}x the time (target <= 20x)")
    print(f"bytes added       {added:,} bytes for {args.facts} entries (capacity {memory.capacity}, {memory.form} "
          f"form); weights {weights:,} bytes, unchanged")


if __name__ == "__main__":
    main()
