"""The interface every arm's stack serves, as the simulator and the offline evaluation see it.

A request is a user and the items they touched before it (oldest first). Histories travel
as one padded int64 matrix, so a whole batch of requests is one call:

    histories[r] = [-1, -1, ..., i_1, i_2, ..., i_t]   (left-padded with PAD, newest last)

`recommend` returns, per request, the `k` best item ids in slate order with their scores.
Implementations: the SID `Stack` (generative retrieval over SIDs + SID ranker), and the
popularity and random stacks the simulator is built and tested with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: a stable, vectorized 64-bit mixer (uint64 in, uint64 out).

    The same input gives the same output in every process and version (unlike Python's
    `hash`), so it can key per-request randomness and traffic buckets.
    """
    with np.errstate(over="ignore"):  # the arithmetic is meant to wrap modulo 2**64
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


__all__ = ["mix64", "string_key", "hash_ids", "to_uniform"]


def string_key(text: str) -> np.uint64:
    """A 64-bit key for a string (a salt, a seed name): blake2b, stable across processes."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def hash_ids(key: np.uint64 | int, *parts: np.ndarray) -> np.ndarray:
    """Hash integer arrays (broadcast together) under `key`: uint64, one value per element."""
    h = mix64(np.asarray(key, dtype=np.uint64))
    for part in parts:
        h = mix64(h ^ mix64(np.asarray(part).astype(np.uint64)))
    return h


def to_uniform(h: np.ndarray) -> np.ndarray:
    """Map uint64 hashes to float64 uniforms in [0, 1) (the top 53 bits)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def folder_fingerprint(folder: str | Path, pattern: str = "*") -> str:
    """sha256 over the relative names and bytes of every file under `folder` matching `pattern`."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: cannot fingerprint a folder that does not exist")
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob(pattern) if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(file_digest(path).encode())
    return h.hexdigest()


def config_fingerprint(*parts: object) -> str:
    """sha256 of JSON-serialised config parts (pydantic models, dicts, scalars)."""
    def plain(obj: object) -> object:
        if isinstance(obj, BaseModel):
            return obj.model_dump(mode="json")
        if isinstance(obj, Path):
            return str(obj)
        return obj

    payload = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()
