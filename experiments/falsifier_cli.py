"""The seed's falsifier, run the way a user would: through the `timerome` CLI (issue #19's check).

For each build seed: `timerome edit` with no tuning flags (the recommended memory of the model's
edit_config.json, gate calibrated on the default retain_gate part) from one TOFU author's 20
questions, written to a JSONL file; then `timerome eval --suite FILE --num-retain 160` without and
with the memory on

* the edited author, with every retain fact the model was trained on (retain90[:160]) and the
  utility splits;
* the other author (a second suite file: its questions as the forget split).

The seed's falsifier (seed summary, "What would settle it") fails the edit when the forget LP drops
by less than 40 nats, or when more than 5 nats are lost on the retain facts or the other author;
nats are per answer, averaged over facts (docs/RESULTS.md's convention). The verdict is reported
on all 160 retain facts (the issue's wording) and on retain_test (retain90[60:160]), the part
nothing was tuned or calibrated on: retain90[:160] contains retain_tune and retain_gate.

    python experiments/falsifier_cli.py --out runs/falsifier_cli
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from timerome_jax.errors import InputError  # noqa: E402

FORGET_DROP_NATS = _common.FALSIFIER["forget_drop"]   # the edit must remove at least this much LP ...
MAX_LOSS_NATS = _common.FALSIFIER["retain_loss"]      # ... and lose at most this much on unrelated facts
NUM_RETAIN = 160            # every retain fact the embedded model was trained on: retain90[:160]


def parse_args(argv=None):
    p = _common.parser(__doc__.splitlines()[0], "runs/falsifier_cli")
    p.add_argument("--forget-part", default="forget_b", help="split-table role of the author the memory forgets")
    p.add_argument("--other-part", default="forget_a", help="split-table role of the author it must keep")
    p.add_argument("--build-seeds", type=int, default=3, help="memories built (timerome edit --seed 0..N-1)")
    p.add_argument("--eval-seeds", type=int, default=None, help="timerome eval --seeds (default: its own, 5)")
    p.add_argument("--mc-samples", type=int, default=None, help="timerome eval --mc-samples (default: its own, 32)")
    return p.parse_args(argv)


def _rows(selection: str) -> list[dict]:
    from timerome_jax import data

    return [record for _, _, record in data.load_selection(selection)]


def _perturbed(role: str) -> str:
    """forget01_subjects[a:b] (the split table's author) -> forget01_perturbed[a:b] (same rows, with
    the paraphrases and perturbed answers a TOFU suite needs)."""
    from timerome_jax import splits

    part = splits.selection(role)
    name, _, rows = part.partition("[")
    if name not in ("forget01", "forget01_subjects"):
        raise InputError(f"--forget-part / --other-part: {role} = {part} is not a forget01 author")
    return f"forget01_perturbed[{rows}"


def write_inputs(tmp: Path, args) -> dict[str, Path]:
    """The facts file of the edited author and the two suite files."""
    from timerome_jax import splits

    forget_facts = splits.selection(args.forget_part)
    facts_path = tmp / "forget_facts.jsonl"
    facts_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                  for r in _rows(forget_facts.replace("forget01[", "forget01_subjects["))))
    utility = {"real_authors": _rows("real_authors_perturbed"), "world_facts": _rows("world_facts_perturbed")}
    edited = {"forget": _rows(_perturbed(args.forget_part)), "retain": _rows(f"retain_perturbed[:{NUM_RETAIN}]"),
              **utility}
    # the other author is this suite's forget split; its retain split (required) is one retain fact
    other = {"forget": _rows(_perturbed(args.other_part)), "retain": _rows("retain_perturbed[60:61]")}
    paths = {"facts": facts_path, "edited": tmp / "suite_edited_author.json", "other": tmp / "suite_other_author.json"}
    paths["edited"].write_text(json.dumps(edited, ensure_ascii=False))
    paths["other"].write_text(json.dumps(other, ensure_ascii=False))
    return paths


def run_cli(argv: list[str]) -> None:
    from timerome_jax import cli

    print("+ timerome " + " ".join(argv), file=sys.stderr)
    rc = cli.main(argv)
    if rc != 0:
        raise SystemExit(f"falsifier_cli: timerome {argv[0]} exited {rc}")


def split_items(eval_dir: Path, split: str) -> tuple[np.ndarray, list[str]]:
    """LP [seeds, items] and the questions of one split of a `timerome eval` run (items.jsonl)."""
    items = [i for i in map(json.loads, (eval_dir / "items.jsonl").read_text().splitlines()) if i["split"] == split]
    return np.array([i["lp_per_seed"] for i in items], np.float64).T, [i["question"] for i in items]


# the `timerome eval` metrics the page reports beside the falsifier: model utility, generation,
# the in-context relearning probe (docs/evaluation.md defines each)
HEADLINE_METRICS = ("model_utility", "rouge_forget", "rouge_retain", "relearn_forget_lp", "paraphrase_forget_lp",
                    "truth_ratio_forget", "forget_quality", "exact_memorization")


def headline(eval_dir: Path) -> dict:
    """The HEADLINE_METRICS of one `timerome eval` run (mean and CI over its MC seeds, or why not)."""
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    return {name: {k: metrics[name].get(k) for k in ("mean", "ci_low", "ci_high", "reason") if k in metrics[name]}
            for name in HEADLINE_METRICS if name in metrics}


def summarise(base: np.ndarray, edited_B: list[np.ndarray], labels: list[str], sign: float) -> dict:
    """Mean over MC seeds per fact, then `metrics.fact_bootstrap_ci` over builds × facts; sign −1:
    a drop (base − edited), +1: a change (edited − base); with the loss tail for changes."""
    from timerome_jax import metrics

    per_fact_BF = np.stack([sign * (e - base).mean(axis=0) for e in edited_B])
    mean, low, high = metrics.fact_bootstrap_ci(per_fact_BF)
    out = {"mean": mean, "ci_low": low, "ci_high": high, "num_facts": per_fact_BF.shape[1],
           "builds": per_fact_BF.shape[0]}
    if sign > 0:
        out["tail"] = metrics.loss_tail(per_fact_BF.mean(axis=0), labels)
    return out


def verdict(rows: dict, retain_key: str) -> dict | None:
    """The falsifier on `rows` (means over facts), with the retain row `retain_key`; None when that
    row was not measured."""
    if rows[retain_key] is None:
        return None
    forget_ok = rows["forget_drop"]["mean"] >= FORGET_DROP_NATS
    retain_ok = rows[retain_key]["mean"] >= -MAX_LOSS_NATS
    other_ok = rows["other_author_change"]["mean"] >= -MAX_LOSS_NATS
    return {"passes": bool(forget_ok and retain_ok and other_ok), "forget_drop_ok": bool(forget_ok),
            "retain_ok": bool(retain_ok), "other_author_ok": bool(other_ok)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from timerome_jax import splits

    splits.check_disjoint(**{args.forget_part: splits.selection(args.forget_part),
                             args.other_part: splits.selection(args.other_part)})
    eval_flags = ["--num-retain", str(NUM_RETAIN)]
    if args.quick:
        eval_flags += ["--quick"]
    for flag, value in (("--seeds", args.eval_seeds), ("--mc-samples", args.mc_samples)):
        if value is not None:
            eval_flags += [flag, str(value)]
    builds = 1 if args.quick else args.build_seeds
    with _common.experiment(args) as tmp:
        paths = write_inputs(tmp, args)
        evals = {}
        for suite in ("edited", "other"):
            out = tmp / f"eval_{suite}_author_no_edit"
            run_cli(["eval", "--model", args.model, "--suite", str(paths[suite]), *eval_flags, "--out", str(out)])
            evals[suite] = {"base": out, "edited": []}
        for seed in range(builds):
            memory_dir = tmp / f"memory_seed{seed}"
            run_cli(["edit", "--model", args.model, "--facts", str(paths["facts"]), "--seed", str(seed),
                     "--out", str(memory_dir)])
            for suite in ("edited", "other"):
                out = tmp / f"eval_{suite}_author_memory_seed{seed}"
                run_cli(["eval", "--model", args.model, "--memory", str(memory_dir), "--suite", str(paths[suite]),
                         *eval_flags, "--out", str(out)])
                evals[suite]["edited"].append(out)

        def lps(suite, split):
            """(no-edit LP [seeds, facts], per-build edited LPs, the facts' questions)."""
            base, labels = split_items(evals[suite]["base"], split)
            return base, [split_items(d, split)[0] for d in evals[suite]["edited"]], labels

        forget_base, forget_edited, forget_q = lps("edited", "forget")
        retain_base, retain_edited, retain_q = lps("edited", "retain")
        other_base, other_edited, other_q = lps("other", "forget")
        test = slice(60, NUM_RETAIN)  # retain_test = retain90[60:160] within retain90[:160]
        measured_test = retain_base.shape[1] > test.start  # --quick scores 4 facts per split
        rows = {
            "forget_drop": summarise(forget_base, forget_edited, forget_q, -1.0),
            "retain_change_all160": summarise(retain_base, retain_edited, retain_q, 1.0),
            "retain_change_retain_test": summarise(retain_base[:, test], [e[:, test] for e in retain_edited],
                                                   retain_q[test], 1.0) if measured_test else None,
            "other_author_change": summarise(other_base, other_edited, other_q, 1.0),
        }
        unedited_lp = {"forget": float(forget_base.mean()), "retain_all160": float(retain_base.mean()),
                       "other_author": float(other_base.mean())}

        memory_json = json.loads((tmp / "memory_seed0" / "memory.json").read_text())
        suite_metrics = {suite: {"no_edit": headline(evals[suite]["base"]),
                                 "memory": [headline(d) for d in evals[suite]["edited"]]} for suite in evals}
        results = {
            "command": _common.command_line(), "model": args.model, "forget_part": args.forget_part,
            "forget_selection": splits.selection(args.forget_part), "other_part": args.other_part,
            "other_selection": splits.selection(args.other_part), "retain_selection": f"retain90[:{NUM_RETAIN}]",
            "build_seeds": builds, "eval_flags": eval_flags, "unedited_lp": unedited_lp, "rows": rows,
            "falsifier": {"forget_drop_nats": FORGET_DROP_NATS, "max_loss_nats": MAX_LOSS_NATS,
                          "on_all160_retain": verdict(rows, "retain_change_all160"),
                          "on_retain_test": verdict(rows, "retain_change_retain_test")},
            "suite_metrics": suite_metrics,
            "memory_json": {k: v for k, v in memory_json.items() if k != "fact_ids"},
        }
        _common.write_json(tmp / "results.json", results)
        (tmp / "results.md").write_text(report(results))
        print(report(results))
    return 0


def report(r: dict) -> str:
    def ci(row):
        low = "" if row["ci_low"] is None else f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
        return f"{row['mean']:.2f}{low}"

    lines = [f"# The falsifier through the CLI ({r['model']})", "", f"Command: `{r['command']}`", "",
             f"Memory: `timerome edit` defaults from {r['forget_part']} ({r['forget_selection']}), "
             f"{r['build_seeds']} build seed(s); `timerome eval {' '.join(r['eval_flags'])}`.", "",
             "| measured on | value (nats per answer) | > 1 / > 5 nats |", "|---|---|---|",
             f"| forget drop, {r['forget_part']} | {ci(r['rows']['forget_drop'])} | |"]
    for key, name in (("retain_change_all160", "retain change, retain90[:160]"),
                      ("retain_change_retain_test", "retain change, retain_test (retain90[60:160])"),
                      ("other_author_change", f"other author change, {r['other_part']}")):
        row = r["rows"][key]
        if row is None:
            lines.append(f"| {name} | not measured (--quick) | |")
            continue
        tail = row["tail"]
        lines.append(f"| {name} | {ci(row)} | {tail['share_losing_over_1']:.0%} / {tail['share_losing_over_5']:.0%} |")
    f = r["falsifier"]

    def said(v):
        if v is None:
            return "not measured"
        unmet = [k.removesuffix("_ok") for k, ok in v.items() if k != "passes" and not ok]
        return "**passes**" if v["passes"] else f"**fails** ({', '.join(unmet)} not met)"

    lines += ["", "`timerome eval` metrics of the edited author's suite (mean over MC seeds; memory: mean over builds):", "",
              "| metric | no edit | memory |", "|---|---|---|"]
    sm = r["suite_metrics"]["edited"]
    for name, row in sm["no_edit"].items():
        after = [m[name]["mean"] for m in sm["memory"] if m.get(name, {}).get("mean") is not None]
        before = "n/a" if row.get("mean") is None else f"{row['mean']:.3f}"
        lines.append(f"| {name} | {before} | {np.mean(after):.3f} |" if after else f"| {name} | {before} | n/a |")
    lines += ["", f"Falsifier (forget drop ≥ {f['forget_drop_nats']:.0f}, ≤ {f['max_loss_nats']:.0f} nats lost): "
              f"with all 160 retain facts {said(f['on_all160_retain'])}; with retain_test "
              f"{said(f['on_retain_test'])}.", "", "Worst retain facts (all 160, mean change over builds):", ""]
    for w in r["rows"]["retain_change_all160"]["tail"]["worst"]:
        lines.append(f"- {w['change']:.2f}: {w['fact']}")
    lines += ["", f"Worst facts of the other author ({r['other_part']}, mean change over builds):", ""]
    lines += [f"- {w['change']:.2f}: {w['fact']}" for w in r["rows"]["other_author_change"]["tail"]["worst"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
