"""Stable, vectorized hashing: traffic buckets and per-request randomness.

Everything random in the simulator is a function of a hash of named inputs (the salt and
the unit id for buckets; the seed, the request id, the slate position and the stage for
user responses), never of a generator's state. So a user's bucket is the same in every run
and process, and a request's outcome does not depend on which shard or batch served it.
The mixer is SplitMix64's finalizer (`quasid.recommender.mix64`); strings (salts) are
reduced to 64 bits with blake2b.
"""

from __future__ import annotations

import hashlib

import numpy as np

from quasid.recommender import mix64

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
