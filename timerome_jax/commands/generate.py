"""`timerome generate --model M (--prompt TEXT | --facts FILE.jsonl) --out FILE.jsonl`.

Runs the masked-diffusion sampler (`timerome_jax.sampler`) on every prompt and writes one JSON object
per line, in input order: `prompt`, `text` (the generated answer only, cut at the first
end-of-text/pad token, special tokens removed), `token_ids` (the generated ids before that token) and
`answer` when the fact has one.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax

import ports
from timerome_jax import facts as facts_io
from timerome_jax import memory as mem
from timerome_jax import sampler, tokenization
from timerome_jax.errors import InputError


def register(sub, common) -> None:
    p = sub.add_parser("generate", parents=[common],
                       help="generate answers with the masked-diffusion sampler")
    p.add_argument("--model", required=True, help="checkpoint directory (with tokenizer files) or "
                   "embedded model name")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--facts", help="JSONL file with question/answer or prompt/subject/target "
                        "records")
    p.add_argument("--gen-length", type=int, default=128, help="answer tokens G (default 128)")
    p.add_argument("--steps", type=int, default=128, help="denoising steps K (default 128)")
    p.add_argument("--block-length", type=int, default=32,
                   help="semi-autoregressive block length; must divide G (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="Gumbel temperature; 0 = greedy")
    p.add_argument("--remasking", default="low_confidence",
                   help=f"which proposals to reveal first: {' | '.join(sampler.REMASKING)}")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (temperature > 0, random remasking)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per sampler call (default 8)")
    p.add_argument("--memory", default=None, help="edit memory directory: generate with it injected")
    p.add_argument("--out", required=True, help="output JSONL file (written atomically)")
    p.set_defaults(run=run)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write all records or nothing (a temporary file renamed into place)."""
    if path.is_dir():
        raise InputError(f"--out {path} is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    sampler.reveal_counts(args.gen_length, args.steps, args.block_length)
    sampler.check_remasking(args.remasking)
    sampler.check_temperature(args.temperature)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise InputError("the prompt is empty")
        facts = [facts_io.Fact(prompt=args.prompt, where="--prompt", kind="prompt")]
    else:
        facts = facts_io.read_facts(args.facts)

    backbone = ports.load_pretrained(args.model)
    if args.memory:
        backbone = backbone.with_edits(mem.load(args.memory, backbone).memory)
    sampler.check_mask_token(backbone)
    tokenizer = tokenization.backbone_tokenizer(backbone)
    # the same prompt text as tracing and evaluation (TOFU questions in the training format)
    prompts = tokenization.encode_texts(tokenizer, [f.texts()[0] for f in facts],
                                        add_special_tokens=True)
    limit = backbone.config.max_seq_len
    for fact, ids in zip(facts, prompts):
        if len(ids) + args.gen_length > limit:
            raise InputError(f"{fact.where}: prompt of {len(ids)} tokens + --gen-length "
                             f"{args.gen_length} exceeds the model's maximum length {limit}")

    answers = sampler.sample_many(
        backbone, prompts, jax.random.key(args.seed),
        pad_id=tokenization.pad_token_id(tokenizer, backbone), batch_size=args.batch_size,
        gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
        temperature=args.temperature, remasking=args.remasking)
    stop = tokenization.stop_token_ids(tokenizer, backbone)
    records = []
    for fact, generated in zip(facts, answers):
        kept = tokenization.truncate_at_stop(generated, stop)
        record = {"prompt": fact.prompt,
                  "text": tokenizer.decode(kept, skip_special_tokens=True),
                  "token_ids": kept}
        if fact.answer is not None:
            record["answer"] = fact.answer
        records.append(record)
    out = Path(args.out)
    write_jsonl(out, records)
    print(f"wrote {len(records)} generation(s) to {out} (G={args.gen_length}, K={args.steps}, "
          f"block {args.block_length}, temperature {args.temperature:g})")
    return 0
