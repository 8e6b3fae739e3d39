"""Membership inference and memorisation of the forget facts, unedited and with edit memories.

    python experiments/membership.py [--model tofu-tiny] [--quick] --out runs/membership

Members = `--members` (forget01 QA pairs), non-members = `--nonmembers` (TOFU holdout01, which
no shipped model saw); the reference (retain twin) gives privleak. Memories are built from
`--memory-facts` at `--coordinate` with R = 3: the paper's (α = 1) and the selective one (gated
on `--gate-facts`). Writes results.json (`api.membership_inference` per model).
"""

from __future__ import annotations

import ports
from timerome_jax import api, privacy

import _common
import _quick


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0], "runs/membership")
    p.add_argument("--members", default="forget01")
    p.add_argument("--nonmembers", default="holdout01")
    p.add_argument("--reference", default="tofu-tiny-retain", help="retain twin ('none' to skip privleak)")
    p.add_argument("--memory-facts", default="forget01_subjects")
    p.add_argument("--coordinate", default="1,resid,0", help="LAYER,MODULE,STEP of an 8-step trace")
    p.add_argument("--gate-facts", default="retain90[40:160]")
    args = p.parse_args()
    if args.quick:
        _quick.apply_quick(p, args, {"members": "forget01[:3]", "nonmembers": "holdout01[:3]", "reference": "none",
                                     "memory_facts": "forget01_subjects[:3]", "gate_facts": "retain90[40:44]"})
    with _common.experiment(args) as out:
        backbone = ports.load_pretrained(args.model)
        tokenizer = api.tokenizer(backbone)
        members, nonmembers = api.load_facts(args.members), api.load_facts(args.nonmembers)
        reference = None if args.reference == "none" else ports.load_pretrained(args.reference)
        results = {"unedited": api.membership_inference(
            backbone, tokenizer, members, nonmembers, reference=reference,
            reference_tokenizer=None if reference is None else api.tokenizer(reference))}
        facts = api.encode(backbone, tokenizer, api.load_facts(args.memory_facts))
        coordinate = api.Coordinate.parse(args.coordinate, backbone.config.n_layers)
        specs = {"paper": (api.MemorySpec.paper(noise_samples=3), None),
                 "selective": (api.MemorySpec.selective(noise_samples=3), api.load_facts(args.gate_facts))}
        for name, (spec, gate) in specs.items():
            record = api.build_memory(backbone, tokenizer, facts, coordinate, spec, gate_facts=gate)
            results[name] = api.membership_inference(backbone.with_edits(record.memory), tokenizer, members, nonmembers)
            if reference is not None:
                key = f"mia_{privacy.PRIVLEAK_ATTACK}_auc"
                results[name]["privleak"] = privacy.privleak_or_none(results[name][key],
                                                                     results["unedited"]["reference"][key])
        _common.write_json(out / "results.json", {
            "experiment": "membership", "command": _common.command_line(), "model": args.model,
            "fingerprint": backbone.fingerprint(), "members": args.members, "nonmembers": args.nonmembers,
            "reference": args.reference, "coordinate": coordinate.as_dict(), "results": results})
        for name, r in results.items():
            print(f"{name:10s} " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
