"""Content fingerprints: what a step's cache key is made of (data bytes + config)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel

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
