"""Shared plumbing for the paper-figure experiments: arguments, atomic output, JSON, progress.

Every experiment runs on the embedded model by default (`--model tofu-tiny`) and on a user's
checkpoint with `--model DIR`; `--quick` shrinks it to a smoke run of a few minutes or less.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from ports.errors import UserError
from ports.fileio import atomic_directory


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="tofu-tiny", help="checkpoint directory or embedded model name")
    p.add_argument("--out", default=default_out, help="output directory (written atomically)")
    p.add_argument("--quick", action="store_true", help="reduced settings: a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(jsonable(payload), indent=2) + "\n")


def progress(items, desc: str, unit: str = "it"):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, leave=False)


@contextlib.contextmanager
def experiment(args: argparse.Namespace):
    """Yield a temporary output directory; it becomes `args.out` only if the run succeeds.
    User errors print one line and exit 2, as the `timerome` CLI does."""
    start = time.perf_counter()
    try:
        with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
            yield tmp
    except UserError as e:
        print(f"{Path(sys.argv[0]).stem}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
