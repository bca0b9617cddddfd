"""Content hashes: files, directory trees (with manifests) and JSON-able values."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def stable_hash(value: Any) -> str:
    """Hex sha256 of a JSON-serialisable value with sorted keys."""
    data = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()


def iter_files(root: Path, skip: Iterable[str] = ()) -> list[Path]:
    """Regular files below root, sorted, skipping names in `skip` at the top level."""
    skipped = set(skip)
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] not in skipped
    )


def manifest_of(root: Path, skip: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} for every file below root."""
    return {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in iter_files(root, skip)
    }


def manifest_digest(manifest: dict[str, dict[str, Any]]) -> str:
    """One hash for a whole manifest (names, sizes and contents)."""
    return stable_hash(manifest)


def hash_tree(root: Path, skip: Iterable[str] = ()) -> str:
    """Content hash of a directory tree."""
    return manifest_digest(manifest_of(root, skip))
