"""Data contracts: the schemas every file between two steps must follow, and their validator.

One schema per file kind (items, interactions, sid table, assignments, events; see DESIGN.md).
`validate` checks a polars frame against a schema and raises `ContractError` naming the
source (file), the column, the first offending rows and what was expected. Nothing is
coerced: a wrong dtype is an error, not a cast. `write_parquet` validates first and writes
through a temporary name, so bad input never leaves a partial file behind.

Conventions between the simulator and the analysis (beyond the columns below):
- user-level cohorts travel in `assignments.parquet` as extra boolean columns
  (`is_cold_user`, and `cohort_<name>` for user-defined cohorts), so users without events
  still count (as zeros) in their cohort; events carry `is_cold_item`, `is_cold_user` and
  event-level `cohort_<name>` flags;
- the pre-period (every user on control, for CUPED covariates) is written as events of the
  experiment `<experiment_id>__pre` (see `PRE_PERIOD_SUFFIX`), with the same user ids;
- `day` counts from 0 at the first day of the experiment's window (or of its pre-period);
- `manifest.json` holds at least `experiment_id`, `arms` (`{arm: allocation share}`),
  `control` (the control arm's name), `seed`, `config`, `data_fingerprint` and `counts`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

_UMASK = os.umask(0)


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it into place on success, delete it on error."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a text file (JSON, Markdown) through a temporary name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Stage several files in a temporary folder and move them into `out` only if all succeed.

    Usage: `with staged_dir(out) as tmp: write files into tmp`. On an exception nothing
    in `out` changes; on success each staged file replaces its namesake in `out`.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".staging", dir=out.parent))
    try:
        yield tmp
        out.mkdir(parents=True, exist_ok=True)
        for src in sorted(tmp.rglob("*")):
            if src.is_file():
                dst = out / src.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_atomic(obj: object, path: Path) -> None:
    """torch.save through a temporary sibling and a rename (no half-written checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
