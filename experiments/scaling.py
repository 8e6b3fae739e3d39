"""Scaling: edit-memory build time and quality from 10 to 400 facts (paper: sub-linear time).

    python experiments/scaling.py [--model tofu-tiny] [--sizes 10,20,40,80,known,400] [--quick] \\
        --out runs/scaling

Facts. The first n facts of a pool: --forget (facts the model knows; default forget01_subjects
then retain90[40:100] and retain90[101:160]: the embedded tofu-tiny was trained on forget01 +
retain90[:160], retain90[:40] is the RetainLP set, so it is kept out, and retain90:101 "What is the
full name of the author?" names no subject) followed by --unknown (default forget10_subjects[:360],
the forget10 authors other than forget01's, which the model never saw). Subjects are the packaged
ones or `facts.find_subject`'s; a fact without one is an error, never a silent skip. The size
`known` means "every known fact" (159 with the defaults).
Sizes beyond the known facts measure build time only and are marked "quality not measured:
facts unknown to the model" (the model was never trained on them, so there is nothing to
forget).

Per size n:
* build time, in two phases timed separately with `_common.timed` (perf_counter around a call
  whose arrays are ready): capture of keys and deltas at the traced coordinate
  (`memory.capture`, chunks of --facts-per-chunk facts) and the ridge solve (`memory.build`).
  Compilation is excluded: each phase is called twice on the same facts and the second call is
  timed; the first calls (compilation + run) are reported as `*_first_call`;
* quality (known facts only): ForgetLP drop = LP(no edit) − LP(edit) over the n facts, and
  RetainLP change = LP(edit) − LP(no edit) over --retain, paired MC-ELBO (`Setup.lp`), each a
  `_common.summary` over --lp-seeds seeds. --real-authors (off by default) adds RealAuthorLP.
`fit` holds the least-squares slope of log(seconds) on log(n) for capture, solve and their sum
(1 = linear time).

Cost. Capture runs ≈ k* + 5 forwards per fact (k*+1 teacher-forced steps, one clean and R = 3
corrupted passes at step k*) and every size is captured twice: 2 × 703 facts over the default
sizes, 7k–18k forwards of ~100 tokens, ≈ 1–2.5 min at ≈ 8 ms a forward (docs/evaluation.md:
7–10 ms on this 2-core CPU; 20 ms measured while a training job held both cores). Scoring
(5 seeds × 8 MC samples) covers 153 + 40 unedited and 303 + 5 × 40 edited pairs, ≈ 28,000
sequences ≈ 4 min; with tracing and compilation ≈ 6–8 min on an idle machine. results.json
records the measured seconds.

Writes scaling.png (build time vs n, log-log with a linear-time reference; forget drop and
retain change vs n), results.json, results.md.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from timerome_jax import api
from timerome_jax import memory as mem
from timerome_jax.errors import InputError

import _common
import _quick

KNOWN = "known"
UNKNOWN_NOTE = "quality not measured: facts unknown to the model"
QUICK = dict(trace_facts="forget01_subjects[:2]", trace_steps=2, noise_samples=2, forget="forget01_subjects[:3]",
             unknown="forget10_subjects[:20]", retain="retain90[:3]", mc_samples=2, lp_seeds=2, sizes="2,known,6",
             facts_per_chunk=2)


def parse_sizes(text: str, num_known: int, num_pool: int) -> list[int]:
    """'10,20,known,400' -> sorted distinct sizes, `known` = the number of known facts."""
    sizes = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item == KNOWN:
            sizes.append(num_known)
            continue
        try:
            sizes.append(int(item))
        except ValueError:
            raise InputError(f"--sizes must be integers or '{KNOWN}', got {item!r}") from None
    if not sizes or min(sizes) < 1:
        raise InputError(f"--sizes must name at least one size >= 1, got {text!r}")
    if max(sizes) > num_pool:
        raise InputError(f"size {max(sizes)} exceeds the {num_pool} facts with a subject in --forget and "
                         f"--unknown; add facts to --unknown or lower --sizes")
    return sorted(set(sizes))


def concatenate(parts: list[api.Facts], pad_id: int) -> api.Facts:
    """Encoded fact sets, one after the other, as one set."""
    def joined(field: str) -> tuple:
        return tuple(x for part in parts for x in getattr(part, field))

    return api.Facts(joined("facts"), joined("subjects"), joined("prompts"), joined("answers"), joined("spans"),
                     pad_id)


def loglog_slope(n, seconds) -> float | None:
    n, seconds = np.asarray(n, np.float64), np.asarray(seconds, np.float64)
    if len(set(n.tolist())) < 2 or np.any(seconds <= 0):
        return None
    return float(np.polyfit(np.log(n), np.log(seconds), 1)[0])


def plot(path, rows: list[dict], fit: dict) -> None:
    plt = _common.figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    n = np.array([r["n"] for r in rows], np.float64)
    for name, marker in (("capture", "o"), ("solve", "s"), ("build", "^")):
        seconds = np.array([r["seconds"][name] for r in rows])
        slope = fit[name]
        label = f"{name} (slope {slope:.2f})" if slope is not None else name
        left.plot(n, seconds, marker=marker, label=label)
    build = np.array([r["seconds"]["build"] for r in rows])
    left.plot(n, build[0] * n / n[0], color="grey", linestyle="--", linewidth=1, label="linear time (slope 1)")
    left.set_xscale("log"); left.set_yscale("log")
    left.set_xticks(n, [str(int(v)) for v in n], minor=False)
    left.minorticks_off()
    left.set_xlabel("facts in the memory (n)"); left.set_ylabel("seconds (compile excluded)")
    left.set_title("memory build time")
    left.legend(fontsize=7)
    measured = [r for r in rows if r["quality"] is not None]
    for key, label, marker in (("forget_drop", "ForgetLP drop (n facts)", "o"),
                               ("retain_change", "RetainLP change", "s")):
        if not measured:
            break
        x = np.array([r["n"] for r in measured], np.float64)
        s = [r["quality"][key] for r in measured]
        mean = np.array([v["mean"] for v in s])
        low = np.array([v["mean"] if v["ci_low"] is None else v["ci_low"] for v in s])
        high = np.array([v["mean"] if v["ci_high"] is None else v["ci_high"] for v in s])
        right.errorbar(x, mean, yerr=[mean - low, high - mean], marker=marker, capsize=3, label=label)
    right.axhline(0, color="grey", linewidth=0.5)
    right.set_xscale("log")
    right.set_xticks(n, [str(int(v)) for v in n])
    right.minorticks_off()
    right.set_xlabel("facts in the memory (n)"); right.set_ylabel("nats per answer")
    unmeasured = [r["n"] for r in rows if r["quality"] is None]
    right.set_title("quality" + (f" (not measured at n = {', '.join(map(str, unmeasured))}: unknown facts)"
                                 if unmeasured else ""), fontsize=9)
    right.legend(fontsize=7)
    _common.save_figure(fig, path, dpi=120)


def markdown(results: dict) -> str:
    fit = results["fit"]
    lines = ["# Scaling of the edit memory", "",
             f"Model `{results['model']}` ({results['fingerprint']}), coordinate {results['coordinate']['coordinate']}; "
             f"{results['facts']['known']['encoded']} known facts. Seconds exclude compilation; quality is mean "
             f"[95 % bootstrap CI] over {results['settings']['lp_seeds']} seeds, nats per answer.", "",
             "| n | capacity | capture (s) | solve (s) | build (s) | ForgetLP drop | RetainLP change |",
             "|---|---|---|---|---|---|---|"]
    for r in results["sizes"]:
        q = r["quality"]
        quality = (f"{_common.fmt(q['forget_drop'])} | {_common.fmt(q['retain_change'])}" if q is not None
                   else f"{r['quality_note']} | —")
        sec = r["seconds"]
        lines.append(f"| {r['n']} | {r['capacity']} | {sec['capture']:.3f} | {sec['solve']:.4f} | {sec['build']:.3f} | "
                     f"{quality} |")
    lines += ["", "log-log slope of seconds vs n: " + ", ".join(
        f"{k} {'—' if v is None else f'{v:.2f}'}" for k, v in fit.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0], "runs/scaling")
    _common.add_memory_arguments(p, forget="forget01_subjects,retain90[40:100],retain90[101:160]")
    p.set_defaults(mc_samples=8, real_authors="")
    p.add_argument("--unknown", default="forget10_subjects[:360]",
                   help="facts the model never saw, appended after --forget (build time only; '' for none)")
    p.add_argument("--sizes", default=f"10,20,40,80,{KNOWN},400",
                   help=f"memory sizes n ('{KNOWN}' = every known fact)")
    p.add_argument("--facts-per-chunk", type=int, default=8, help="facts per capture call (one compilation)")
    args = p.parse_args()
    if args.quick:
        _quick.apply_quick(p, args, QUICK)
    start = time.perf_counter()
    with _common.experiment(args) as out:
        if args.facts_per_chunk < 1:
            raise InputError(f"--facts-per-chunk must be >= 1, got {args.facts_per_chunk}")
        s = _common.setup(args)
        known = s.encode(args.forget)
        parts = [known]
        unknown = s.encode(args.unknown) if args.unknown else None
        if unknown is not None:
            parts.append(unknown)
        pool = concatenate(parts, s.pad_id)
        sizes = parse_sizes(args.sizes, known.num_facts, pool.num_facts)
        retain_pairs = s.pairs(args.retain, "retain")
        retain_questions = {pair.prompt_ids for pair in retain_pairs}
        forget_pairs = api.qa_pairs(s.tokenizer, pool.facts, "forget")
        if any(pair.prompt_ids in retain_questions for pair in forget_pairs):
            raise InputError("--retain shares questions with --forget/--unknown: the RetainLP set must be disjoint")
        if args.q is not None and args.q < 1:
            raise InputError(f"--q must be >= 1, got {args.q}")
        coordinate, coordinate_info = _common.coordinate(s)

        extra = {"real_authors": s.pairs(args.real_authors, "real")} if args.real_authors else {}
        measured = [n for n in sizes if n <= known.num_facts]
        # unedited LPs once: the known facts up to the largest measured size, retain (and real authors)
        top = max(measured, default=0)
        base_pairs = forget_pairs[:top] + retain_pairs + sum(extra.values(), [])
        base = s.lp(s.backbone, base_pairs) if base_pairs else None
        key = jax.random.key(args.seed)
        capture = dict(noise_samples=args.noise_samples, facts_per_chunk=args.facts_per_chunk)
        rows = []
        for n in _common.progress(sizes, "sizes", "size"):
            facts = pool.take(range(n))
            # the first call compiles the capture kernel and the eager ops around it (σ, chunk gathers: about
            # 1 s of compilation per new batch shape, which would fake a sub-linear slope at small n)
            _, capture_first = _common.timed(mem.capture, s.backbone, facts.batch, coordinate, key, **capture)
            (keys, deltas, _), capture_seconds = _common.timed(mem.capture, s.backbone, facts.batch, coordinate,
                                                            key, **capture)

            def build():
                return mem.build(keys, deltas, layer=coordinate.layer, module=coordinate.module, alpha=args.alpha,
                                 lam=args.lam, q=None if args.q is None else min(args.q, n))

            _, solve_first = _common.timed(build)
            (memory, key_scale), solve_seconds = _common.timed(build)
            row = {"n": n, "known_facts": min(n, known.num_facts), "capacity": memory.capacity,
                   "key_scale": key_scale, "fact_ids": list(facts.wheres),
                   "seconds": {"capture": capture_seconds, "solve": solve_seconds,
                               "build": capture_seconds + solve_seconds,
                               "capture_first_call": capture_first, "solve_first_call": solve_first},
                   "quality": None, "quality_note": None}
            if n <= known.num_facts:
                t = time.perf_counter()
                edited = s.lp(s.backbone.with_edits(memory), forget_pairs[:n] + retain_pairs + sum(extra.values(), []))
                f, r = slice(0, n), slice(n, n + len(retain_pairs))
                b_r = slice(top, top + len(retain_pairs))
                quality = {"forget_lp": _common.summary(edited[:, f]), "forget_lp_no_edit": _common.summary(base[:, f]),
                           "forget_drop": _common.summary(base[:, f] - edited[:, f]),
                           "retain_lp": _common.summary(edited[:, r]),
                           "retain_change": _common.summary(edited[:, r] - base[:, b_r])}
                if extra:
                    e_a, b_a = slice(r.stop, None), slice(b_r.stop, None)
                    quality["real_authors_change"] = _common.summary(edited[:, e_a] - base[:, b_a])
                row["quality"], row["scoring_seconds"] = quality, time.perf_counter() - t
            else:
                row["quality_note"] = f"{UNKNOWN_NOTE} ({n - known.num_facts} of {n})"
            rows.append(row)

        ns = [r["n"] for r in rows]
        fit = {name: loglog_slope(ns, [r["seconds"][name] for r in rows]) for name in ("capture", "solve", "build")}
        counts = {}
        for name, spec, part in (("known", args.forget, known), ("unknown", args.unknown, unknown)):
            if part is not None:
                counts[name] = {"spec": spec, "encoded": part.num_facts}
        results = {
            "experiment": "scaling of the edit memory (10 -> 400 facts)", "model": args.model,
            "fingerprint": s.backbone.fingerprint(), "seed": args.seed,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "overwrite")},
            "coordinate": coordinate_info, "facts": counts, "num_retain_pairs": len(retain_pairs),
            "sizes": rows, "fit": fit, "seconds_total": time.perf_counter() - start,
            "timing": "perf_counter around calls whose arrays are ready (block_until_ready); the second of two "
                      "identical calls, so compilation is excluded (the first call is reported as *_first_call)",
        }
        _common.write_json(out / "results.json", results)
        (out / "results.md").write_text(markdown(results))
        plot(out / "scaling.png", rows, fit)
        print(f"build time log-log slope {fit['build'] if fit['build'] is None else round(fit['build'], 2)} "
              f"over n = {ns}; known facts {known.num_facts}")


if __name__ == "__main__":
    main()
