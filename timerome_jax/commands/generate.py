"""`timerome generate --model M (--prompt TEXT | --facts FILE.jsonl) --out FILE.jsonl`.

Runs the masked-diffusion sampler (`timerome_jax.sampler`) on every prompt and writes one JSON object
per line, in input order: `prompt`, `template` (how the prompt was laid out: "question" or "raw"),
`generation` (the generated answer only, cut at the first end-of-text/pad token, special tokens
removed, stripped: the field `timerome eval` writes too), `token_ids` (the generated ids before
that token), `answer` when the fact has one, and `warning` on an empty generation.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

import ports
from ports.fileio import atomic_file
from timerome_jax import facts as facts_io
from timerome_jax import memory as mem
from timerome_jax import sampler, tokenization
from timerome_jax.errors import InputError


def register(sub, common) -> None:
    p = sub.add_parser("generate", parents=[common],
                       help="generate answers with the masked-diffusion sampler")
    p.add_argument("--model", default="tofu-tiny", help="checkpoint directory (with tokenizer files) or "
                   "embedded model name")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (a question, unless --template raw)")
    source.add_argument("--facts", help="JSONL file with question/answer or prompt/subject/target "
                        "records")
    p.add_argument("--template", choices=("auto",) + facts_io.TEMPLATES, default="auto",
                   help="prompt layout: 'question' = \"Question: TEXT\\nAnswer:\" (the format trace, edit and "
                   "eval use for questions), 'raw' = TEXT as given; 'auto': --prompt and question records "
                   "as questions, prompt records raw")
    p.add_argument("--gen-length", type=int, default=None,
                   help="answer tokens G (default: the model's generation_config.json, else 128)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps K (default: the model's, else 128)")
    p.add_argument("--block-length", type=int, default=None,
                   help="semi-autoregressive block length; must divide G (default: the model's, else 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="Gumbel temperature; 0 = greedy")
    p.add_argument("--remasking", default="low_confidence",
                   help=f"which proposals to reveal first: {' | '.join(sampler.REMASKING)}")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (temperature > 0, random remasking)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per sampler call")
    p.add_argument("--memory", default=None, help="edit memory directory: generate with it injected")
    p.add_argument("--out", required=True, help="output JSONL file (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(run=run, outputs=(("out", "file"),))


def run(args: argparse.Namespace) -> int:
    sampler.check_remasking(args.remasking)
    sampler.check_temperature(args.temperature)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise InputError("the prompt is empty")
        facts = [facts_io.Fact(prompt=args.prompt, where="--prompt", kind="question")]
    else:
        facts = facts_io.read_facts(args.facts)
    given = {"gen_length": args.gen_length, "steps": args.steps, "block_length": args.block_length}
    if None not in given.values():
        sampler.check_schedule(**given)
    backbone = ports.load_pretrained(args.model)
    schedule = {k: v if v is not None else sampler.recommended_schedule(backbone)[k] for k, v in given.items()}
    sampler.check_schedule(**schedule)
    if args.memory:
        backbone = backbone.with_edits(mem.load(args.memory, backbone).memory)
    sampler.check_mask_token(backbone)
    tokenizer = tokenization.backbone_tokenizer(backbone)
    template = None if args.template == "auto" else args.template
    texts = [f.texts(template)[0] for f in facts]
    # the same prompt ids as tracing and evaluation: the text alone, no special tokens
    prompts = tokenization.encode_texts(tokenizer, texts, add_special_tokens=False)
    limit = backbone.config.max_seq_len
    for fact, ids in zip(facts, prompts):
        if len(ids) + schedule["gen_length"] > limit:
            raise InputError(f"{fact.where}: prompt of {len(ids)} tokens + gen length "
                             f"{schedule['gen_length']} exceeds the model's maximum length {limit}")
    from tqdm import tqdm

    answers = sampler.sample_many(
        backbone, prompts, jax.random.key(args.seed), pad_id=tokenization.pad_token_id(tokenizer, backbone),
        batch_size=args.batch_size, temperature=args.temperature, remasking=args.remasking, **schedule,
        progress=lambda batches: tqdm(batches, desc="generating", unit="batch", file=sys.stderr, leave=False))
    stop = tokenization.stop_token_ids(tokenizer, backbone)
    records, empty = [], 0
    for fact, generated in zip(facts, answers):
        kept = tokenization.truncate_at_stop(generated, stop)
        record = {"prompt": fact.prompt, "template": template or ("question" if fact.kind == "question" else "raw"),
                  "generation": tokenizer.decode(kept, skip_special_tokens=True).strip(), "token_ids": kept}
        if not record["generation"]:
            empty += 1
            record["warning"] = "empty generation: the model stopped at once"
        if fact.answer is not None:
            record["answer"] = fact.answer
        records.append(record)
    with atomic_file(args.out, overwrite=args.overwrite) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    if empty:
        print(f"timerome generate: warning: {empty} of {len(records)} generation(s) are empty", file=sys.stderr)
    print(f"wrote {len(records)} generation(s) to {args.out} (G={schedule['gen_length']}, K={schedule['steps']}, "
          f"block {schedule['block_length']}, temperature {args.temperature:g}, template {args.template})")
    return 0
