"""`timerome lm-eval`: lm-evaluation-harness on the `timerome` model (optionally edited), offline.

    timerome lm-eval --tasks tofu_world_facts_mc[,tofu_real_authors_mc,...] [--model M] [--memory MEM]
        [--limit N] [--mc-num 32] [--include-path DIR] [--allow-download] --out DIR

Runs `lm_eval.simple_evaluate` (`api.lm_evaluate`; needs the `[lmeval]` extra) and writes lm-eval's
results JSON to DIR/results.json (atomically), then prints lm-eval's table. The Hugging Face Hub
is off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) unless --allow-download: the shipped tasks are built
from the packaged TOFU data; lm-eval's standard tasks (hellaswag, gsm8k, ...) need the Hub.

The same model also runs under lm-eval's own command line: `timerome-lm-eval` (`harness_main`) is
`lm-eval` with the `timerome` model registered and, unless `--include_path` is given, the shipped
tasks on the include path, e.g. `timerome-lm-eval run --model timerome --model_args
pretrained=DIR,mc_num=128 --tasks hellaswag` (as LLaDA's `eval_llada.py` wraps `cli_evaluate`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ports.fileio import atomic_directory
from timerome_jax import api, likelihood


def register(sub, common) -> None:
    p = sub.add_parser("lm-eval", parents=[common],
                       help="lm-evaluation-harness tasks (offline TOFU tasks shipped; --include-path for yours)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. tofu_world_facts_mc")
    p.add_argument("--model", default="tofu-tiny", help="checkpoint directory, converted directory or embedded name")
    p.add_argument("--memory", metavar="MEMDIR", default=None, help="run every request with this edit memory")
    p.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--mc-num", type=int, default=32, help="MC-ELBO copies per loglikelihood request")
    p.add_argument("--estimator", default="mc_elbo", help=f"{' | '.join(likelihood.METHODS)}")
    p.add_argument("--gen-length", type=int, default=None,
                   help="generate_until: answer tokens (default: the model's generation_config.json)")
    p.add_argument("--steps", type=int, default=None, help="generate_until: denoising steps")
    p.add_argument("--block-length", type=int, default=None, help="generate_until: block length")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward / prompts per sampler call")
    p.add_argument("--seed", type=int, default=0, help="MC-ELBO masks and sampler noise")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a directory of your own lm-eval task YAMLs (repeatable)")
    p.add_argument("--allow-download", action="store_true",
                   help="let lm-eval fetch datasets from the Hugging Face Hub (standard tasks)")
    p.add_argument("--out", required=True, help="output directory (results.json, written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(run=run, outputs=(("out", "dir"),))


def run(args: argparse.Namespace) -> int:
    if not args.allow_download:   # before lm_eval (and datasets) are imported
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    results = api.lm_evaluate(args.tasks.split(","), model=args.model, memory=args.memory, mc_num=args.mc_num,
                              estimator=args.estimator, gen_length=args.gen_length, steps=args.steps,
                              block_length=args.block_length, batch_size=args.batch_size, seed=args.seed,
                              include_paths=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
                              allow_download=args.allow_download)
    from lm_eval.utils import handle_non_serializable, make_table

    out = Path(args.out)
    with atomic_directory(out, overwrite=args.overwrite) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable,
                                                     ensure_ascii=False) + "\n", encoding="utf-8")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    print(f"wrote {out / 'results.json'}", file=sys.stderr)
    return 0


def harness_main(argv: list[str] | None = None) -> None:
    """`timerome-lm-eval`: lm-evaluation-harness's own CLI (`lm-eval run|ls|validate ...`) with the
    `timerome` model registered; the shipped task directory is the include path unless
    `--include_path` is given (lm-eval's CLI takes one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from timerome_jax import lm_eval_model   # registers the model `timerome`
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        print("timerome-lm-eval: lm-evaluation-harness is not installed: pip install -e '.[lmeval]'", file=sys.stderr)
        raise SystemExit(2) from None
    from lm_eval.__main__ import cli_evaluate

    wants_tasks = not argv or argv[0] not in ("-h", "--help")
    if wants_tasks and not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(lm_eval_model.tasks_dir())]
    sys.argv = ["timerome-lm-eval", *argv]
    cli_evaluate()
