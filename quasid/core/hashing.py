"""Stable hashing: 64-bit mixers for per-request randomness and buckets, and content digests.

`mix64`/`hash_ids`/`to_uniform` give the same numbers in every process and version (unlike
Python's `hash`), so traffic buckets and simulated user responses are functions of ids and
seeds alone. `file_digest`/`files_digest`/`content_digest` are the one content hash of files
and data folders.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

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


def file_digest(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def files_digest(root: str | Path, names: Iterable[str]) -> str:
    """Hex sha256 over each existing file's relative name and bytes, in the order given.

    The one content hash of data folders: the simulator's manifest records it for the
    files it read, and the flows key their caches on it.
    """
    h = hashlib.sha256()
    for name in names:
        path = Path(root) / name
        if path.is_file():
            h.update(str(name).encode())
            with open(path, "rb") as fh:
                while block := fh.read(CHUNK):
                    h.update(block)
    return h.hexdigest()


def content_digest(path: str | Path, names: Iterable[str] = ()) -> str:
    """Hex sha256 of a file's bytes, or `files_digest(path, names)` of a folder."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: cannot fingerprint what does not exist")
    return files_digest(path, names)


def json_digest(*parts: object) -> str:
    """Hex sha256 of JSON-serialised parts (dicts, lists, scalars; paths as strings)."""
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()
