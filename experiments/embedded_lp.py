"""Answer log-probabilities of the embedded models on their acceptance sets (docs/embedded_model.md).

    python experiments/embedded_lp.py [--models tofu-tiny,tofu-tiny-retain] [--quick] --out runs/embedded_lp

For every model and set (default forget01 and retain90[:40]): the MC-ELBO answer log-probability
(nats per answer; `likelihood.score_pairs`, --mc-samples masked copies, seeds 0..--lp-seeds-1, the
masks depend on (seed, pair) only, so both models see the same masks), mean over pairs per seed,
mean and bootstrap 95 % CI over seeds; plus the greedy ROUGE-L recall recorded by the training run
(`training.json` -> `final`), when the model directory has one. Writes results.json, results.md.
Cost: 2 models x 80 pairs x 5 seeds x 16 copies = 12,800 sequences, about 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json

import numpy as np

import ports
from timerome_jax import api
from timerome_jax.tokenization import pad_token_id

import _common
import _quick

QUICK = {"sets": "forget01[:2],retain90[:2]", "mc_samples": 2, "lp_seeds": 2}


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0], "runs/embedded_lp")
    p.add_argument("--models", default="tofu-tiny,tofu-tiny-retain", help="comma-separated models")
    p.add_argument("--sets", default="forget01,retain90[:40]", help="comma-separated data selections")
    p.add_argument("--mc-samples", type=int, default=16)
    p.add_argument("--lp-seeds", type=int, default=5)
    args = p.parse_args()
    if args.quick:
        _quick.apply_quick(p, args, QUICK)
    models = [m for m in args.models.split(",") if m] if args.model == "tofu-tiny" else [args.model]
    sets = [s for s in args.sets.split(",") if s]
    with _common.experiment(args) as out:
        rows, rouge = [], {}
        for name in _common.progress(models, "models", "model"):
            backbone = ports.load_pretrained(name)
            tokenizer = api.tokenizer(backbone)
            pad = pad_token_id(tokenizer, backbone)
            training = ports.resolve_model_path(name) / "training.json"
            final = (json.loads(training.read_text()).get("final_eval") or {}) if training.is_file() else {}
            rouge[name] = final.get("rougeL_recall")
            for spec in sets:
                pairs = api.qa_pairs(tokenizer, api.load_facts(spec), spec)
                lp = api.score_pairs(backbone, pairs, list(range(args.lp_seeds)), pad_id=pad,
                                     mc_samples=args.mc_samples)
                rows.append({"model": name, "fingerprint": backbone.fingerprint(), "set": spec,
                             "pairs": len(pairs), "answer_lp": _common.summary(lp),
                             "mean_answer_tokens": float(np.mean([len(q.answer_ids) for q in pairs]))})
        settings = {"estimator": "mc_elbo", "mc_samples": args.mc_samples, "seeds": list(range(args.lp_seeds))}
        _common.write_json(out / "results.json", {"experiment": "embedded_lp", "settings": settings, "rows": rows,
                                                "training_greedy_rougeL_recall": rouge})
        lines = [f"MC-ELBO answer log-probability (nats per answer), {args.mc_samples} samples, seeds "
                 f"0..{args.lp_seeds - 1}; mean [95 % bootstrap CI over seeds]", "",
                 "| model | set | pairs | answer LP |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['set']} | {r['pairs']} | {_common.fmt(r['answer_lp'])} |" for r in rows]
        lines += ["", "Greedy ROUGE-L recall measured by each training run (gen length 96, block 32, 48 steps):"]
        lines += [f"- {m}: {r}" for m, r in rouge.items()]
        (out / "results.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
