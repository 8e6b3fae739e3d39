"""`timerome convert --model DIR --out DIR`: HF safetensors -> orbax parameter directory."""

from __future__ import annotations

import argparse

import ports

DTYPES = ("float32", "bfloat16", "float16")


def register(sub, common) -> None:
    p = sub.add_parser("convert", parents=[common],
                       help="convert a Hugging Face checkpoint into an orbax parameter directory")
    p.add_argument("--model", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="cast parameters (default: keep the checkpoint's dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(run=run, outputs=(("out", "dir"),))


def run(args: argparse.Namespace) -> int:
    out = ports.convert(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)
    backbone = ports.load_pretrained(out)
    print(f"wrote {out} ({backbone.config.family}, {backbone.num_params():,} parameters, "
          f"{backbone.dtype.__name__}, fingerprint {backbone.fingerprint()})")
    return 0
