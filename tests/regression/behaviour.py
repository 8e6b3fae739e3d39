"""Record, or check against a fixture, what the CLI computes on the embedded model.

    python tests/regression/behaviour.py record DIR           # write a fixture from the current code
    python tests/regression/behaviour.py check FIXTURE [--work DIR]   # re-run and compare

The behaviour recorded (every step through the `timerome` CLI, whose flags do not change when the
library underneath does):

1. `timerome trace` of the first 8 forget01 facts (K = 8, R = 10, resid/attn/mlp): `tie.npz`
   and the coordinate it selects;
2. two edit memories of all 40 forget01 facts at that coordinate (R = 3):
   * `paper`: the paper's memory (α = 1, λ = 0.1, the last subject token at the traced step);
   * `selective`: the `timerome demo --selective` configuration (α = 32, every step, every subject
     token, 8 sampler steps of the G = 96 / 48-step / block-32 schedule, gate rate 0.001
     calibrated on retain90[40:160]);
   recorded as their `memory.json` and, per entry, the key and delta norms and sums plus the full
   rows of every 16th entry (the selective memory has thousands of entries);
3. `timerome eval --quick` without a memory and with each memory (`metrics.json` without the
   timings, `items.jsonl`);
4. greedy generations (G = 96, 48 steps, blocks of 32) for the first 8 forget01 questions,
   without a memory and with each.

`check` compares integers, strings and generations exactly and floats with
|a − b| <= 1e-5 + 1e-5 |b| (relative where values are large: keys here have norms near 10^4).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

RTOL = ATOL = 1e-5
MEMORIES = {
    "paper": [],
    "selective": ["--alpha", "32", "--capture-steps", "all", "--key-positions", "subject", "--sampler-steps", "8",
                  "--gate-rate", "0.001", "--gate-facts", "retain90[40:160]"],
}
GENERATION = ["--gen-length", "96", "--steps", "48", "--block-length", "32"]
ROW_STRIDE = 16
# fields that measure time or name this run's paths: not behaviour
VOLATILE = {"cost", "seconds", "wall_clock_s", "process_wall_clock_s", "memory", "params", "model"}


def timerome(*argv) -> str:
    """Run one CLI command in this process; its stdout (fails loudly on a non-zero exit)."""
    from timerome_jax import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"timerome {' '.join(map(str, argv))} exited {code}")
    return out.getvalue()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def memory_digest(memory_dir: Path) -> dict[str, np.ndarray]:
    """Per-entry norms and sums of keys and deltas, every ROW_STRIDE-th full row, and the scalars,
    read with orbax directly (independent of this project's loader)."""
    import orbax.checkpoint as ocp

    arrays = ocp.StandardCheckpointer().restore((memory_dir / "arrays").absolute())
    valid = np.asarray(arrays["valid"])
    out = {"valid": valid}
    for name in ("keys", "deltas", "readout"):
        rows = np.asarray(arrays[name], np.float64)[valid]
        out[f"{name}_norm"] = np.linalg.norm(rows, axis=1)
        out[f"{name}_sum"] = rows.sum(axis=1)
        out[f"{name}_rows"] = rows[::ROW_STRIDE].astype(np.float32)
    for name in ("layer", "alpha", "ridge", "q", "gate"):
        if name in arrays:
            out[name] = np.asarray(arrays[name])
    return out


def record(out: Path, work: Path) -> None:
    """Run everything inside `work` with relative paths (fact ids name their file as given)."""
    import os

    from timerome_jax import data

    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    work = Path(".")
    facts = Path("facts")
    facts.mkdir(exist_ok=True)
    subjects = data.load_split("forget01_subjects")
    trace_facts = write_jsonl(facts / "trace8.jsonl", subjects[:8])
    forget_facts = write_jsonl(facts / "forget01.jsonl", subjects)
    questions = write_jsonl(facts / "questions8.jsonl",
                            [{"question": r["question"], "answer": r["answer"]} for r in data.load_split("forget01")[:8]])

    trace_dir = work / "trace"
    timerome("trace", "--facts", trace_facts, "--out", trace_dir, "--overwrite")
    shutil.copy(trace_dir / "tie.npz", out / "tie.npz")
    summary = json.loads((trace_dir / "summary.json").read_text())
    (out / "trace_summary.json").write_text(json.dumps(_stable(summary), indent=1) + "\n")

    memories = {"none": None}
    for name, flags in MEMORIES.items():
        mem_dir = work / f"memory_{name}"
        timerome("edit", "--facts", forget_facts, "--trace", trace_dir, "--noise-samples", "3", *flags,
                 "--out", mem_dir, "--overwrite")
        memories[name] = mem_dir
        (out / f"memory_{name}.json").write_text(
            json.dumps(_stable(json.loads((mem_dir / "memory.json").read_text())), indent=1) + "\n")
        np.savez_compressed(out / f"memory_{name}.npz", **memory_digest(mem_dir))

    for name, mem_dir in memories.items():
        extra = [] if mem_dir is None else ["--memory", mem_dir]
        eval_dir = work / f"eval_{name}"
        timerome("eval", "--quick", *extra, "--out", eval_dir, "--overwrite")
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        (out / f"eval_{name}.json").write_text(json.dumps(_stable(metrics), indent=1) + "\n")
        shutil.copy(eval_dir / "items.jsonl", out / f"eval_items_{name}.jsonl")
        gen = work / f"generate_{name}.jsonl"
        timerome("generate", "--model", "tofu-tiny", "--facts", questions, *GENERATION, *extra, "--out", gen)
        shutil.copy(gen, out / f"generate_{name}.jsonl")


def _stable(tree):
    """`tree` without the volatile fields (timings, this run's paths)."""
    if isinstance(tree, dict):
        return {k: _stable(v) for k, v in tree.items() if k not in VOLATILE}
    if isinstance(tree, list):
        return [_stable(v) for v in tree]
    return tree


def compare(a, b, where: str, problems: list[str]) -> None:
    """Append to `problems` every place where `a` (new) differs from `b` (fixture)."""
    if isinstance(b, dict):
        if not isinstance(a, dict) or set(a) != set(b):
            problems.append(f"{where}: keys {sorted(a) if isinstance(a, dict) else type(a).__name__} != {sorted(b)}")
            return
        for k in b:
            compare(a[k], b[k], f"{where}.{k}", problems)
    elif isinstance(b, list):
        if not isinstance(a, list) or len(a) != len(b):
            problems.append(f"{where}: length {len(a) if isinstance(a, list) else a!r} != {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            compare(x, y, f"{where}[{i}]", problems)
    elif isinstance(b, float) or isinstance(a, float):
        if a is None or b is None or not np.isclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True):
            problems.append(f"{where}: {a!r} != {b!r}")
    elif a != b:
        problems.append(f"{where}: {a!r} != {b!r}")


def compare_arrays(a: dict, b: dict, where: str, problems: list[str]) -> None:
    if set(a) != set(b):
        problems.append(f"{where}: arrays {sorted(a)} != {sorted(b)}")
        return
    for k in b:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        if x.shape != y.shape:
            problems.append(f"{where}/{k}: shape {x.shape} != {y.shape}")
        elif np.issubdtype(y.dtype, np.floating):
            if not np.allclose(x, y, rtol=RTOL, atol=ATOL, equal_nan=True):
                worst = np.max(np.abs(x - y) / (ATOL + RTOL * np.abs(y)))
                problems.append(f"{where}/{k}: floats differ (worst {worst:.3g} x the tolerance)")
        elif not np.array_equal(x, y):
            problems.append(f"{where}/{k}: values differ")


def check(fixture: Path, work: Path) -> list[str]:
    fixture, fresh = fixture.absolute(), (work / "fresh").absolute()
    record(fresh, work)
    problems: list[str] = []
    for path in sorted(fixture.iterdir()):
        new = fresh / path.name
        if path.suffix == ".npz":
            with np.load(path) as b, np.load(new) as a:
                compare_arrays(dict(a), dict(b), path.name, problems)
        elif path.suffix == ".json":
            compare(json.loads(new.read_text()), json.loads(path.read_text()), path.name, problems)
        elif path.suffix == ".jsonl":
            rows_a = [json.loads(line) for line in new.read_text().splitlines()]
            rows_b = [json.loads(line) for line in path.read_text().splitlines()]
            compare(rows_a, rows_b, path.name, problems)
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("record", "check"))
    parser.add_argument("path", help="record: the fixture directory to write; check: the fixture to compare with")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if args.action == "record":
            record(Path(args.path), work)
            print(f"recorded {args.path}")
            return 0
        problems = check(Path(args.path), work)
    for p in problems:
        print(p)
    print(f"{len(problems)} difference(s) from {args.path}" if problems else f"identical to {args.path} within "
          f"rtol {RTOL}, atol {ATOL}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
