"""What the embedded models know: answer log-probabilities and greedy generation on the sets they were
trained on and on sets they never saw (docs/embedded_model.md).

    python experiments/embedded_lp.py [--models tofu-tiny,tofu-tiny-retain] [--quick] --out runs/embedded_lp

1. Answer LP, for every model and --sets selection: the MC-ELBO answer log-probability (nats per
   answer; `likelihood.score_pairs`, --mc-samples masked copies, seeds 0..--lp-seeds-1, the masks
   depend on (seed, pair) only, so both models see the same masks), mean over pairs per seed, mean
   and bootstrap 95 % CI over seeds.
2. Greedy generation, for every model and --gen-sets selection, decoded by the library's sampler as
   the training run's final evaluation does (`train_tiny.evaluate`): TOFU questions with gen length
   96, block 32, 48 steps, scored by word-level ROUGE-L recall; CounterFact-style prompts with gen
   length = block = steps = --prompt-window (one token per step), scored by `first_words_match`
   (the target is the first generated word(s)). The default sets are the v4 acceptance sets and,
   without a target, the phrasings and facts the models never saw: the odd rows' paraphrases
   (`forget01_paraphrased[1::2]`, `counterfact_rephrase[1::2]`) and the unseen real authors and
   world facts (`real_authors[50:]`, `world_facts[59:]`).

Writes results.json (every score, every generation) and results.md.
"""

from __future__ import annotations

import numpy as np

import ports
from timerome_jax import api, data
from timerome_jax.tokenization import pad_token_id

import _common
import _quick
import train_tiny

QUICK = {"sets": "forget01[:2],retain90[:2]", "gen_sets": "forget01[:2],counterfact_prompt[:2]", "mc_samples": 2,
         "lp_seeds": 2}
TRAINED = ("forget01,forget01_paraphrased[::2],retain90[:40],retain_paraphrased[:40:2],real_authors[:50],"
           "world_facts[:59],counterfact_prompt,counterfact_locality,counterfact_rephrase[::2]")
UNSEEN = "forget01_paraphrased[1::2],counterfact_rephrase[1::2],real_authors[50:],world_facts[59:]"


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0], "runs/embedded_lp")
    p.add_argument("--models", default="tofu-tiny,tofu-tiny-retain", help="comma-separated models")
    p.add_argument("--sets", default="forget01,forget01_paraphrased[::2],forget01_paraphrased[1::2],retain90[:40],"
                   "real_authors[:50],real_authors[50:],world_facts[:59],world_facts[59:]",
                   help="comma-separated data selections whose answer LP is measured")
    p.add_argument("--gen-sets", default=f"{TRAINED},{UNSEEN}", help="data selections decoded greedily ('' to skip)")
    p.add_argument("--prompt-window", type=int, default=12, help="gen length of the CounterFact-style prompts")
    p.add_argument("--mc-samples", type=int, default=16)
    p.add_argument("--lp-seeds", type=int, default=5)
    args = p.parse_args()
    if args.quick:
        _quick.apply_quick(p, args, QUICK)
    models = [m for m in args.models.split(",") if m] if args.model == "tofu-tiny" else [args.model]
    sets = [s for s in args.sets.split(",") if s]
    gen_sets = [s for s in args.gen_sets.split(",") if s]
    gen = dict(gen_length=96, block_length=32, steps=48)
    prompt_gen = dict(gen_length=args.prompt_window, block_length=args.prompt_window, steps=args.prompt_window)
    with _common.experiment(args) as out:
        rows, generation = [], {}
        for name in _common.progress(models, "models", "model"):
            backbone = ports.load_pretrained(name)
            tokenizer = api.tokenizer(backbone)
            pad = pad_token_id(tokenizer, backbone)
            for spec in sets:
                pairs = api.qa_pairs(tokenizer, api.load_facts(spec), spec)
                lp = api.score_pairs(backbone, pairs, list(range(args.lp_seeds)), pad_id=pad,
                                     mc_samples=args.mc_samples)
                rows.append({"model": name, "fingerprint": backbone.fingerprint(), "set": spec,
                             "pairs": len(pairs), "answer_lp": _common.summary(lp),
                             "mean_answer_tokens": float(np.mean([len(q.answer_ids) for q in pairs]))})
            generation[name] = []
            for spec in gen_sets:   # one call per selection, so each is scored under its own name
                result = train_tiny.evaluate(backbone, tokenizer, data.load_selection(spec), gen, prompt_gen)
                metric = "rougeL_recall" if "rougeL_recall" in result else "first_words_match"
                (score,) = result[metric].values()   # one split per selection item
                generation[name].append({"set": spec, "metric": metric, "score": score,
                                         "n": sum(result["n"].values()), "samples": result["samples"]})
        settings = {"estimator": "mc_elbo", "mc_samples": args.mc_samples, "seeds": list(range(args.lp_seeds)),
                    "generation": gen, "prompt_generation": prompt_gen}
        _common.write_json(out / "results.json", {"experiment": "embedded_lp", "command": _common.command_line(),
                                                "settings": settings, "rows": rows, "generation": generation})
        lines = [f"Command: `{_common.command_line()}`", "",
                 f"MC-ELBO answer log-probability (nats per answer), {args.mc_samples} samples, seeds "
                 f"0..{args.lp_seeds - 1}; mean [95 % bootstrap CI over seeds]", "",
                 "| model | set | pairs | answer LP |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['set']} | {r['pairs']} | {_common.fmt(r['answer_lp'])} |" for r in rows]
        lines += ["", "Greedy generation (questions: gen length 96, block 32, 48 steps, ROUGE-L recall; prompts: "
                  f"gen length = block = steps = {args.prompt_window}, first_words_match):", "",
                  "| set | metric | n | " + " | ".join(generation) + " |", "|---|---|---|" + "---|" * len(generation)]
        for i, spec in enumerate(gen_sets):
            first = next(iter(generation.values()))[i]
            lines.append(f"| {spec} | {first['metric']} | {first['n']} | "
                         + " | ".join(f"{g[i]['score']:.3f}" for g in generation.values()) + " |")
        (out / "results.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
