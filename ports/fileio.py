"""Atomic directory output: a reader sees the old directory or the complete new one, never half."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ports.errors import UserError


def check_output(path: str | os.PathLike, *, overwrite: bool = False, directory: bool = True) -> Path:
    """Refuse, before any work, an output that cannot be written: an existing non-empty directory
    (or an existing file) without `overwrite`, a directory where a file is wanted or the reverse, a
    parent that is a file, or a parent that is not writable. One `UserError` naming the path."""
    out = Path(path).absolute()
    if out.exists():
        if directory and not out.is_dir():
            raise UserError(f"{out} is a file, not a directory")
        if not directory and out.is_dir():
            raise UserError(f"{out} is a directory; give a file name")
        if not overwrite and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"{out} already exists{' and is not empty' if out.is_dir() else ''} "
                            "(pass --overwrite to replace it)")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {out}: {parent} is not writable")
    return out


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out_dir`; on success rename it into place.

    On any exception (or a kill) the temporary directory is removed (or left as a dot-named
    sibling) and `out_dir` keeps its previous contents. With `overwrite`, an existing `out_dir` is
    swapped out by two renames and deleted only after the new one is in place.
    """
    out = check_output(out_dir, overwrite=overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success rename it into place (all or nothing)."""
    out = check_output(path, overwrite=overwrite, directory=False)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from None
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
