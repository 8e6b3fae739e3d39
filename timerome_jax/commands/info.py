"""`timerome info --model M`: architecture, sizes and parameter count, without loading weights."""

from __future__ import annotations

import argparse

import ports
from ports import checkpoint


def register(sub, common) -> None:
    p = sub.add_parser("info", parents=[common], help="describe a checkpoint without loading it")
    p.add_argument("--model", required=True, help="checkpoint directory or embedded model name")
    p.add_argument("--verify", action="store_true",
                   help="also load every tensor and check it against the architecture")
    p.set_defaults(run=run)


def describe(model: str, verify: bool = False) -> str:
    model_dir = checkpoint.check_model_dir(ports.resolve_model_path(model))
    config = ports.parse_config(checkpoint.read_config_json(model_dir))
    family = ports.FAMILIES[config.family]
    if checkpoint.is_converted_dir(model_dir):
        fmt, files = "timerome convert output (orbax)", []
    else:
        files = checkpoint.safetensors_files(model_dir)
        fmt = f"Hugging Face safetensors, {len(files)} file(s)"
    n = ports.count_params(config)
    mlp = (f"{config.num_experts} experts x {config.mlp_hidden} (top-{config.experts_per_token})"
           if config.is_moe else f"{config.mlp_hidden} (SwiGLU)")
    lines = [
        f"model        {model_dir}",
        f"format       {fmt}",
        f"family       {config.family}: {family.description}",
        f"layers       {config.n_layers}    d_model {config.d_model}    vocab {config.vocab_size}",
        f"attention    {config.n_heads} heads ({config.n_kv_heads} kv), head_dim {config.head_dim}"
        f"{', q/k/v bias' if config.qkv_bias else ''}{', q/k RMSNorm' if config.qk_norm else ''}",
        f"mlp          {mlp}",
        f"rope theta   {config.rope_theta:g}    rms eps {config.norm_eps:g}    max length {config.max_seq_len}",
        f"mask token   {config.mask_token_id if config.mask_token_id is not None else '(from tokenizer)'}"
        f"    logit shift {config.logit_shift}    padding {config.padding}",
        f"parameters   {n:,} ({n / 1e9:.2f} B)",
    ]
    if verify:
        backbone = ports.load_pretrained(model_dir)
        lines.append(f"verified     all tensors present and shaped as the config says; dtype "
                     f"{backbone.dtype.__name__}; fingerprint {backbone.fingerprint()}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(describe(args.model, args.verify))
    return 0
