"""Atomic writes: the one way every file of the project reaches the disk.

Each writer goes through a temporary sibling that is renamed into place, so a reader never
sees half a file and an error leaves the old file (or none). One file-mode policy: new
files get the process's usual mode (0666 less the umask), whatever the writer.
`staged_dir` does the same for a set of files that must appear together.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import polars as pl

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
"""Mode of every file written here (mkstemp alone would make them 0600)."""
DIR_MODE = 0o777 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it into place on success, delete it on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(file object)` on a temporary sibling, then rename it into place.

    For writers that take a file object, e.g. `write_atomic(p, lambda fh: torch.save(obj, fh))`
    (a file object, not a path: torch names the archive inside after a path's file name,
    which would put the temporary name into the bytes).
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)
    return Path(path)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a text file (JSON, Markdown) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write a binary file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_frame_atomic(frame: pl.DataFrame, path: str | os.PathLike) -> Path:
    """Write all of `frame`'s columns as zstd Parquet (with statistics) atomically.

    Callers that must follow a schema validate first (`quasid.core.schemas.write_parquet`).
    """
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, compression="zstd", statistics=True)
    return Path(path)


def write_npz_atomic(arrays: Mapping[str, object], path: str | os.PathLike) -> Path:
    """Write arrays as an uncompressed `.npz` whose bytes depend on the arrays alone.

    (`np.savez` stamps the current time into the zip; a fixed stamp keeps the bytes a
    function of the data.) Read back with `np.load`.
    """
    def write(fh: BinaryIO) -> None:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, value in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as out:
                    np.lib.format.write_array(out, np.asarray(value))

    return write_atomic(path, write)


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
                os.chmod(src, FILE_MODE)
                os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_staging(out: str | os.PathLike) -> list[Path]:
    """Delete the staging folders a killed writer left for `out` and inside it.

    Those are `staged_dir`'s `.<name>.*.staging` beside `out` and any `.*.staging` under
    it. Call it only as the folder's owner (`quasid.core.lock`), before writing: another
    live writer's staging would be deleted too. Returns the folders removed.
    """
    out = Path(out)
    found = list(out.parent.glob(f".{out.name}.*.staging"))
    if out.is_dir():
        found += [p for p in out.rglob(".*.staging")]
    removed = []
    for path in sorted(set(found)):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
