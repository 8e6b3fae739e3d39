"""Cost: wall-clock and peak memory of building the edit memory (trace, capture, solve) vs the
strongest converged training baseline on the same model, in the same run, at a stated quality.

    python experiments/cost.py [--model tofu-tiny] [--memory recommended | paper] \\
        [--baseline npo | best | gradascent,npo,...] [--quick] --out runs/cost

--memory recommended (the default) times the memory `timerome edit` builds without tuning flags
(`memory.recommended`: every subject token at every step and along the sampler, gated; on a model
with edit_config.json at its coordinate, so nothing is traced) and adds its gate calibration on
--gate-facts as a phase; --memory paper times DESIGN.md §3's memory (one key per fact at k*). The
defaults are the split table's: forget = forget_b, the baselines' retain regulariser and the
RetainLP = retain_tune, gate = retain_gate.

Memory, three phases, each inside `resources.Measure` (wall-clock; host peak RSS with the
high-water mark reset at the phase's start via /proc/self/clear_refs; device peak where the
backend reports one): trace of --trace-facts to find (ℓ*, m*, k*) (skipped with --coordinate),
capture of the keys and deltas of the --forget facts (`memory.capture`), ridge solve
(`memory.build`). Each phase runs twice on the same inputs: the first call includes
compilation (`cold`), the second does not (`warm`), the way the training loop's cost excludes
its ahead-of-time compilation.

Training: `baselines.training.train` on the same forget facts (rows laid out by
`suites.encode_rows`, answer scoring) and --retain (whole-window scoring), run to its
convergence rule (plateau of ForgetLP after --min-epochs, or --max-steps). `train` measures its
loop (steps + convergence checks) with `resources.Measure` and times its ahead-of-time
compilation and setup separately; `call_seconds` is perf_counter around the whole call.
--baseline names one method (default npo), a comma-separated list, or `best` (every training
method); the strongest is the converged run with the largest ForgetLP drop (if none converged,
the largest drop, flagged `converged: false`).

Quality, so that the comparison is at a stated level: ForgetLP drop and RetainLP /
RealAuthorLP change vs the unedited model for the memory and every trained model, with the same
paired MC-ELBO scorer (`Setup.lp`: --mc-samples, --lp-seeds, `_common.summary`).

Reported: seconds and peaks per phase, speed-ups (training loop / memory warm total;
training call / memory cold total; training loop / capture + solve, i.e. with a coordinate
already known; training loop / each memory phase), bytes the memory adds (allocated buffers at
capacity, and the rows of its n facts) vs bytes of parameters training changed (elements that
differ, times their width) and of the tensors it rewrites.

Cost of the defaults on this 2-core CPU for tofu-tiny, estimated from its sizes and ≈ 8 ms per
~100-token sequence (docs/evaluation.md: 7–10 ms; 20 ms measured while a training job held both
cores): trace 2 × ≈ 30 s, capture 2 × ≈ 5 s, NPO to convergence at most 200 steps of 8 + 8 rows
(≈ 0.5 s a step) plus one 160-sequence check per epoch (≤ 2.5 min), scoring 3 models × 120
pairs × 5 seeds × 8 samples (≈ 2 min): ≈ 6–7 min. `--baseline best` trains and scores all five
methods: ≈ 17 min. results.json records what was measured.

Writes cost.png, results.json, results.md.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import numpy as np

from timerome_jax import memory as mem
from timerome_jax import api, resources, suites
from timerome_jax.baselines import training
from timerome_jax.errors import InputError

import _common
import _quick

QUICK = dict(trace_facts="forget01_subjects[:2]", trace_steps=2, noise_samples=2, forget="forget01_subjects[:3]",
             retain="retain90[:3]", real_authors="real_authors[:3]", mc_samples=2, lp_seeds=2, max_steps=3,
             batch_size=2, train_mc_samples=2, gate_facts="retain90[30:33]")
BEST = "best"


def parse_baselines(text: str) -> list[str]:
    if text.strip() == BEST:
        return list(training.TRAINING_METHODS)
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in training.TRAINING_METHODS]
    if not methods or unknown:
        raise InputError(f"--baseline must be '{BEST}' or training methods from "
                         f"{', '.join(training.TRAINING_METHODS)}, got {text!r}")
    return list(dict.fromkeys(methods))


def memory_spec(args, backbone) -> tuple[api.MemorySpec, str | None]:
    """The memory whose cost is measured, and its coordinate when it brings one ("L,MODULE,STEP"):
    --memory recommended (`timerome edit`'s default: `memory.recommended`, with the model's
    edit_config.json) or paper (DESIGN.md §3). --alpha / --lam / --q override either."""
    if args.memory == "paper":
        spec, coordinate = api.MemorySpec.paper(noise_samples=args.noise_samples), None
    else:
        found = mem.recommended(backbone)
        spec = dataclasses.replace(found.spec, noise_samples=args.noise_samples)
        c = found.coordinate
        coordinate = None if c is None else f"{c['layer']},{c['module']},{c['step']}"
    changes = {k: getattr(args, k) for k in ("alpha", "lam", "q") if getattr(args, k) is not None}
    return dataclasses.replace(spec, **changes), coordinate


def measured(fn):
    """(fn() with its arrays ready, Measure.as_dict())."""
    with resources.Measure() as m:
        out = jax.block_until_ready(fn())
    return out, m.as_dict()


def rows_of(facts, tokenizer, eos_id: int, max_len: int, score: str, name: str) -> suites.Rows:
    """Training rows of question/answer facts (`suites.encode_rows`; errors name the `name`d set's
    n-th fact), ids as the facts' (split:line)."""
    records, ids = [], []
    for i, f in enumerate(facts):
        if f.kind != "question" or f.answer is None:
            raise InputError(f"{f.where}: the training baselines need question/answer facts")
        split, _, line = f.where.rpartition(":")
        index = int(line) - 1 if line.isdigit() else i
        records.append({"question": f.prompt, "answer": f.answer})
        ids.append(f"{split or 'facts'}:{index + 1}")
    rows = suites.encode_rows(records, tokenizer, eos_id, max_len, score=score, where=name)
    return dataclasses.replace(rows, ids=tuple(ids))


def changed_parameters(before, after) -> dict:
    """Elements of the parameter tree that training changed, and their bytes."""
    elements = nbytes = 0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        a, b = np.asarray(a), np.asarray(b)
        n = int(np.count_nonzero(a != b))
        elements, nbytes = elements + n, nbytes + n * a.dtype.itemsize
    return {"elements": elements, "bytes": nbytes}


def trained_bytes(backbone, config: training.TrainConfig) -> int:
    """Bytes of the parameters a training method updates (every leaf, or RMU's masked layers)."""
    L = backbone.config.n_layers
    leaves = jax.tree.leaves(backbone.params)
    index, masks = training.trainable_layout(backbone, config.objective(L))
    return int(sum((leaves[i].size if m is None else leaves[i].size // L * int(sum(m))) * leaves[i].dtype.itemsize
                   for i, m in zip(index, masks)))


def memory_bytes(memory: mem.EditMemory) -> dict:
    """Bytes of the memory's buffers (at capacity) and of the rows its n entries occupy."""
    n = memory.size
    factor = memory.cholesky[:n, :n] if memory.form == "dual" else memory.inverse
    used = [memory.keys[:n], memory.deltas[:n], memory.readout[:n], factor, memory.valid[:n],
            memory.layer, memory.alpha, memory.ridge, memory.q]
    if memory.whitening is not None:
        used.append(memory.whitening)
    return {"allocated": int(sum(x.nbytes for x in jax.tree.leaves(memory))),
            "used_by_facts": int(sum(np.asarray(x).nbytes for x in used)), "capacity": memory.capacity, "entries": n}


def quality(lp_SP: np.ndarray, base_SP: np.ndarray, columns: dict) -> dict:
    out = {}
    for name, cols in columns.items():
        change = lp_SP[:, cols] - base_SP[:, cols]
        out[name] = {"lp": _common.summary(lp_SP[:, cols]),
                     ("drop" if name == "forget" else "change"): _common.summary(-change if name == "forget" else change)}
    return out


def ratio(a, b):
    return None if a is None or not b else a / b


def plot(path, phases: dict, train_stats: dict, method: str) -> None:
    plt = _common.figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [n for n in ("trace", "capture", "solve", "gate") if phases.get(n)]
    train_parts = [("setup", train_stats["setup_seconds"]), ("compile", train_stats["compile_seconds"]),
                   ("train steps", train_stats["train_seconds"]), ("convergence checks", train_stats["eval_seconds"])]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {name: palette[i % len(palette)] for i, name in enumerate(names + [n for n, _ in train_parts])}
    bars = [("memory\n(warm)", [(n, phases[n]["warm"]["seconds"]) for n in names]),
            ("memory\n(cold: + compile)", [(n, phases[n]["cold"]["seconds"]) for n in names]),
            (f"{method}\n(training)", train_parts)]
    drawn = set()
    for x, (_, parts) in enumerate(bars):
        bottom = 0.0
        for name, seconds in parts:
            left.bar(x, seconds, bottom=bottom, color=color[name], edgecolor="white",
                     label=None if name in drawn else name)
            drawn.add(name)
            bottom += seconds
        left.text(x, bottom, f"{bottom:.1f} s", ha="center", va="bottom", fontsize=7)
    left.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    left.set_ylabel("wall-clock (s)")
    left.set_title("time per phase")
    left.legend(fontsize=6)
    memory_rows = [(f"memory\n{n}", phases[n]["warm"]) for n in names]
    rows = memory_rows + [(f"{method}\nloop", train_stats["peak_memory"])]
    added = [(m["host_peak_rss_bytes"] - (m["host_rss_at_start_bytes"] or 0)) / 2**20 for _, m in rows]
    right.bar(range(len(rows)), added, color=palette[0])
    for x, (_, m) in enumerate(rows):
        right.text(x, added[x], f"peak {m['host_peak_rss_bytes'] / 2**20:.0f} MiB", ha="center", va="bottom", fontsize=6)
    right.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    right.set_ylabel("host peak RSS − RSS at start (MiB)")
    right.set_title("host memory added in the phase")
    _common.save_figure(fig, path, dpi=120)


def markdown(r: dict) -> str:
    mib = lambda b: "—" if b is None else f"{b / 2**20:.0f}"
    added = lambda m: "—" if m["host_rss_at_start_bytes"] is None else mib(m["host_peak_rss_bytes"] - m["host_rss_at_start_bytes"])
    best = r["training"][r["strongest"]]
    lines = ["# Cost of the edit memory vs training", "",
             f"Model `{r['model']}` ({r['fingerprint']}); device {r['device']['platform']} "
             f"({r['device']['device_kind']}); {r['memory']['facts']} forget facts. Host peak = VmHWM reset at "
             "the phase's start (MiB; memory rows: the warm call); host added = peak − RSS at the start; device peak "
             "where the backend reports one.", "",
             "| method | phase | seconds (warm / loop) | seconds (cold / incl. compile) | host peak | host at start | "
             "host added | device peak |", "|---|---|---|---|---|---|---|---|"]
    for name, ph in r["memory"]["phases"].items():
        if ph is None:
            lines.append(f"| memory | {name} | not run (--coordinate given) | | | | | |")
            continue
        w, c = ph["warm"], ph["cold"]
        lines.append(f"| memory | {name} | {w['seconds']:.2f} | {c['seconds']:.2f} | {mib(w['host_peak_rss_bytes'])} | "
                     f"{mib(w['host_rss_at_start_bytes'])} | {added(w)} | {mib(w['device_peak_bytes_after'])} |")
    lines.append(f"| memory | total | {r['memory']['seconds_warm']:.2f} | {r['memory']['seconds_cold']:.2f} | | | | |")
    for method, t in r["training"].items():
        s, pm = t["stats"], t["stats"]["peak_memory"]
        lines.append(f"| {method}{' (strongest)' if method == r['strongest'] else ''} | loop ({s['steps']} steps, "
                     f"{s['stop_reason']}) | {s['wall_clock_seconds']:.2f} | {t['call_seconds']:.2f} "
                     f"(compile {s['compile_seconds']:.2f}) | {mib(pm['host_peak_rss_bytes'])} | "
                     f"{mib(pm['host_rss_at_start_bytes'])} | {added(pm)} | {mib(pm['device_peak_bytes_after'])} |")
    sp = r["speedup"]
    fmt_ratio = lambda x: "—" if x is None else f"{x:.1f}×"
    lines += ["", f"Speed-up of the memory over {r['strongest']}: {fmt_ratio(sp['compile_excluded'])} (compile "
              f"excluded), {fmt_ratio(sp['compile_included'])} (compile included), "
              f"{fmt_ratio(sp['coordinate_known'])} with the coordinate known (capture + solve + gate); per memory phase: "
              + ", ".join(f"{k} {fmt_ratio(v)}" for k, v in sp["per_memory_phase"].items()) + ".", "",
              "| | ForgetLP drop | RetainLP change | RealAuthorLP change | bytes |", "|---|---|---|---|---|"]
    mq = r["memory"]["quality"]
    real = lambda q: _common.fmt(q["real_authors"]["change"]) if "real_authors" in q else "—"
    lines.append(f"| memory ({r['memory']['kind']}, α={r['memory']['alpha']:g}) | {_common.fmt(mq['forget']['drop'])} | "
                 f"{_common.fmt(mq['retain']['change'])} | {real(mq)} | {r['memory']['bytes']['allocated']:,} added "
                 f"({r['memory']['bytes']['used_by_facts']:,} used by the facts) |")
    for method, t in r["training"].items():
        q = t["quality"]
        lines.append(f"| {method} | {_common.fmt(q['forget']['drop'])} | {_common.fmt(q['retain']['change'])} | "
                     f"{real(q)} | {t['changed_parameters']['bytes']:,} changed "
                     f"({t['bytes_of_trained_tensors']:,} in the trained tensors) |")
    lines += ["", f"Mean [95 % bootstrap CI] over {r['settings']['lp_seeds']} seeds, nats per answer; strongest "
              f"baseline: {r['strongest']} (converged: {best['stats']['converged']})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0], "runs/cost")
    _common.add_memory_arguments(p)
    # the split table's parts (timerome_jax/splits.py): the test author, the regulariser's retain_tune
    p.set_defaults(mc_samples=8, alpha=None, lam=None, forget="forget01_subjects[20:40]", retain="retain90[:30]",
                   trace_facts="forget01_subjects[20:28]")
    p.add_argument("--memory", choices=("recommended", "paper"), default="recommended",
                   help="the memory whose cost is measured: timerome edit's default, or DESIGN §3's (--paper)")
    p.add_argument("--gate-facts", default="retain90[30:60]",
                   help="retain facts that calibrate the recommended memory's gate (the split table's retain_gate)")
    p.add_argument("--baseline", default="npo", help=f"training method(s), comma-separated, or '{BEST}' (all)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW rate (1e-4 suits the 5M embedded models; "
                   "docs/baselines.md)")
    p.add_argument("--max-steps", type=int, default=training.TrainConfig.max_steps)
    p.add_argument("--batch-size", type=int, default=training.TrainConfig.batch_size)
    p.add_argument("--min-epochs", type=float, default=training.TrainConfig.min_epochs)
    p.add_argument("--train-mc-samples", type=int, default=training.TrainConfig.mc_samples,
                   help="MC-ELBO copies of the training convergence check")
    args = p.parse_args()
    if args.quick:
        _quick.apply_quick(p, args, QUICK)
    start = time.perf_counter()
    with _common.experiment(args) as out:
        methods = parse_baselines(args.baseline)
        configs = {m: training.TrainConfig(method=m, lr=args.lr, max_steps=args.max_steps, batch_size=args.batch_size,
                                           seed=args.seed, min_epochs=args.min_epochs,
                                           mc_samples=args.train_mc_samples) for m in methods}
        for config in configs.values():
            config.validate()
        s = _common.setup(args)   # refuses overlapping --forget, --retain, --real-authors, --gate-facts
        bb = s.backbone
        eos = s.tokenizer.eos_token_id if s.tokenizer.eos_token_id is not None else bb.config.eos_token_id
        if eos is None:
            raise InputError("the tokenizer and the model config name no end-of-text token")
        forget = s.encode(args.forget)
        forget_facts = list(forget.facts)
        retain_facts = api.load_facts(args.retain)
        forget_rows = rows_of(forget_facts, s.tokenizer, int(eos), bb.config.max_seq_len, "answer", "forget")
        retain_rows = rows_of(retain_facts, s.tokenizer, int(eos), bb.config.max_seq_len, "window", "retain")

        # --- the memory, phase by phase (cold: with compilation; warm: the same call again)
        spec, recommended_coordinate = memory_spec(args, bb)
        if recommended_coordinate and not args.coordinate:
            args.coordinate = recommended_coordinate   # the recommended memory's own (edit_config.json): no trace
        phases = {"trace": None}
        if not args.coordinate:
            phases["trace"] = {}
            for kind in ("cold", "warm"):
                (coordinate, coordinate_info), phases["trace"][kind] = measured(lambda: _common.coordinate(s))
        else:
            coordinate, coordinate_info = _common.coordinate(s)
        key = jax.random.key(args.seed)
        phases["capture"], phases["solve"] = {}, {}
        for kind in ("cold", "warm"):
            (keys, deltas, _), phases["capture"][kind] = measured(lambda: mem.capture(
                bb, forget.batch, coordinate, key, steps=spec.steps_for(coordinate), positions=spec.key_positions,
                sampler_capture=spec.sampler, noise_samples=spec.noise_samples, noise_scale=spec.noise_scale,
                facts_per_chunk=8))
        for kind in ("cold", "warm"):
            (memory, key_scale), phases["solve"][kind] = measured(lambda: mem.build(
                keys, deltas, layer=coordinate.layer, module=coordinate.module, alpha=spec.alpha, lam=spec.lam,
                q=spec.q))
        if spec.gate_rate is not None:   # the recommended memory's gate, calibrated on --gate-facts
            gate_facts = api.load_facts(args.gate_facts)
            phases["gate"] = {}
            for kind in ("cold", "warm"):
                (gate, gate_info), phases["gate"][kind] = measured(lambda: mem.retain_gate(
                    bb, s.tokenizer, gate_facts, memory, pad_id=s.pad_id, rate=spec.gate_rate))
            memory = mem.with_gate(memory, gate)
        seconds = {kind: sum(ph[kind]["seconds"] for ph in phases.values() if ph) for kind in ("cold", "warm")}

        # --- quality of every model on the same pairs and masks
        sets = {"forget": api.qa_pairs(s.tokenizer, forget_facts, "forget"), "retain": s.pairs(args.retain, "retain")}
        if args.real_authors:
            sets["real_authors"] = s.pairs(args.real_authors, "real")
        pairs, columns = [], {}
        for name, items in sets.items():
            columns[name] = np.arange(len(pairs), len(pairs) + len(items))
            pairs += items
        base = s.lp(bb, pairs)
        memory_quality = quality(s.lp(bb.with_edits(memory), pairs), base, columns)

        # --- the training baselines, to convergence
        runs = {}
        for method in _common.progress(methods, "training", "method"):
            t0 = time.perf_counter()
            result = training.train(bb, forget_rows, retain_rows, configs[method], progress=lambda row, m=method: print(
                f"  {m} step {row['step']}: ForgetLP {row['forget_lp']:.2f}", file=sys.stderr, flush=True))
            call_seconds = time.perf_counter() - t0
            trained = dataclasses.replace(bb, params=result.params)
            runs[method] = {"stats": result.stats, "call_seconds": call_seconds,
                            "changed_parameters": changed_parameters(bb.params, result.params),
                            "bytes_of_trained_tensors": trained_bytes(bb, configs[method]),
                            "quality": quality(s.lp(trained, pairs), base, columns)}
            del result, trained
        drop = lambda m: runs[m]["quality"]["forget"]["drop"]["mean"]
        converged = [m for m in methods if runs[m]["stats"]["converged"]]
        strongest = max(converged or methods, key=drop)
        st = runs[strongest]["stats"]
        loop = st["setup_seconds"] + st["wall_clock_seconds"]
        warm = {name: ph["warm"]["seconds"] for name, ph in phases.items() if ph}
        speedup = {"compile_excluded": ratio(loop, seconds["warm"]),
                   "compile_included": ratio(runs[strongest]["call_seconds"], seconds["cold"]),
                   "coordinate_known": ratio(loop, sum(sec for name, sec in warm.items() if name != "trace")),
                   "per_memory_phase": {name: ratio(loop, sec) for name, sec in warm.items()},
                   "definition": "training (setup + loop of steps and convergence checks) / memory warm phases; "
                                 "compile_included: the whole train() call / memory cold phases"}
        results = {
            "experiment": "cost: edit memory vs the strongest converged training baseline", "model": args.model,
            "fingerprint": bb.fingerprint(), "seed": args.seed, "device": resources.device_description(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "overwrite")},
            "coordinate": coordinate_info,
            "memory": {"kind": args.memory, "alpha": float(memory.alpha), "lam": spec.lam,
                       "gate": None if memory.gate is None else float(memory.gate), "entries": memory.size,
                       "facts": forget.num_facts, "phases": phases, "seconds_cold": seconds["cold"],
                       "seconds_warm": seconds["warm"], "key_scale": key_scale, "bytes": memory_bytes(memory),
                       "quality": memory_quality},
            "training": runs, "strongest": strongest, "strongest_converged": strongest in converged,
            "speedup": speedup, "no_edit": {name: _common.summary(base[:, cols]) for name, cols in columns.items()},
            "parameter_bytes": int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(bb.params))),
            "seconds_total": time.perf_counter() - start,
        }
        _common.write_json(out / "results.json", results)
        (out / "results.md").write_text(markdown(results))
        plot(out / "cost.png", phases, st, strongest)
        print(f"memory {seconds['warm']:.1f} s warm ({seconds['cold']:.1f} s cold) vs {strongest} "
              f"{loop:.1f} s loop ({runs[strongest]['call_seconds']:.1f} s with compile): "
              f"{speedup['compile_excluded']:.1f}× / {speedup['compile_included']:.1f}×; forget drop "
              f"{_common.fmt(memory_quality['forget']['drop'])} vs {_common.fmt(runs[strongest]['quality']['forget']['drop'])}")


if __name__ == "__main__":
    main()
