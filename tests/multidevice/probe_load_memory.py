"""Peak host memory of loading / converting a large synthetic multi-shard checkpoint.

Run as a script (never collected by pytest): each measurement needs a fresh process, because
the peak is VmHWM of this process's own address space (`ru_maxrss` would not do: Linux
carries it across fork+exec, so a child of a large pytest process would report the parent's size).

    python tests/multidevice/probe_load_memory.py write DIR [--d-model 1024 --layers 4 ...]
    python tests/multidevice/probe_load_memory.py measure DIR {load,convert,load_mesh} [--out OUT]

`measure` prints one JSON line: param_bytes (sum of the loaded leaves' nbytes), baseline_bytes
(RSS after imports and backend start-up, before loading), peak_bytes (VmHWM at the end),
and extra_over_params = (peak - baseline) / param_bytes - 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from timerome_jax import resources

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "llada"


def write_checkpoint(out: Path, d_model: int, layers: int, mlp: int, vocab: int, heads: int,
                     shards: int, seed: int = 0) -> int:
    """An LLaDA-format checkpoint with random float32 weights split over `shards` files (with
    model.safetensors.index.json). Returns the number of parameter bytes."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((FIXTURE / "config.json").read_text())
    config.update(d_model=d_model, n_layers=layers, mlp_hidden_size=mlp, vocab_size=vocab,
                  embedding_size=vocab, n_heads=heads, n_kv_heads=heads, mask_token_id=vocab - 4,
                  eos_token_id=vocab - 6, pad_token_id=vocab - 6)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(seed)
    prefix = "model.transformer."
    shapes = {prefix + "wte.weight": (vocab, d_model), prefix + "ln_f.weight": (d_model,),
              prefix + "ff_out.weight": (vocab, d_model)}
    for i in range(layers):
        b = f"{prefix}blocks.{i}."
        shapes.update({b + "attn_norm.weight": (d_model,), b + "ff_norm.weight": (d_model,),
                       b + "q_proj.weight": (d_model, d_model), b + "k_proj.weight": (d_model, d_model),
                       b + "v_proj.weight": (d_model, d_model), b + "attn_out.weight": (d_model, d_model),
                       b + "ff_proj.weight": (mlp, d_model), b + "up_proj.weight": (mlp, d_model),
                       b + "ff_out.weight": (d_model, mlp)})
    keys = list(shapes)
    per_shard = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: rng.random(shapes[k], dtype=np.float32) * 0.02 for k in keys[s * per_shard:(s + 1) * per_shard]}
        total += sum(v.nbytes for v in part.values())
        save_file(part, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        del part
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(model_dir: Path, what: str, out: Path | None) -> dict:
    import jax
    import jax.numpy as jnp

    import ports
    if what == "load_mesh":
        from ports import sharding

    jnp.zeros(8).block_until_ready()  # start the backend before the baseline
    baseline = _rss_bytes()
    if what == "load":
        backbone = ports.load_pretrained(model_dir)
    elif what == "load_mesh":
        mesh = sharding.make_mesh("tp")
        backbone = ports.load_pretrained(model_dir, mesh=mesh, rules=sharding.rules_for("tp"))
    elif what == "convert":
        ports.convert(model_dir, out)
        backbone = None
    else:
        raise SystemExit(f"unknown measurement {what!r}")
    peak = resources.host_peak_rss_bytes()
    if backbone is not None:
        jax.block_until_ready(backbone.params)
        param_bytes = sum(x.nbytes for x in jax.tree.leaves(backbone.params))
    else:
        param_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    peak = resources.host_peak_rss_bytes()
    return {"what": what, "devices": jax.device_count(), "param_bytes": param_bytes,
            "baseline_bytes": baseline, "peak_bytes": peak,
            "extra_over_params": (peak - baseline) / param_bytes - 1}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("dir", type=Path)
    w.add_argument("--d-model", type=int, default=1024)
    w.add_argument("--layers", type=int, default=4)
    w.add_argument("--mlp", type=int, default=4096)
    w.add_argument("--vocab", type=int, default=8192)
    w.add_argument("--heads", type=int, default=8)
    w.add_argument("--shards", type=int, default=6)
    m = sub.add_parser("measure")
    m.add_argument("dir", type=Path)
    m.add_argument("what", choices=("load", "convert", "load_mesh"))
    m.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.cmd == "write":
        total = write_checkpoint(args.dir, args.d_model, args.layers, args.mlp, args.vocab, args.heads,
                                 args.shards)
        print(json.dumps({"param_bytes": total}))
    else:
        print(json.dumps(measure(args.dir, args.what, args.out)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
