"""Answers of pure input checks, kept in the state folder between runs and keyed by everything they read.

An unchanged nightly run asks the questions of the night before: are the texts long enough for this tokenizer, which
linears does this config build. Each answer depends only on files (by content) and library versions, so once computed
it is kept under `QUANTMILL_HOME/checked/<kind>/<key>.json`; a run whose inputs did not change then never imports
transformers' tokenizer and modeling code (≈ 3.5 s of the ≈ 14 s of CPU of a run whose steps all come from the cache,
measured 2026-12-02). Only answers of checks that passed are kept: a failing check fails again, with its own line.
Core floor: the standard library and quantmill.hashing only.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from quantmill import state
from quantmill.hashing import stable_hash


def installed_versions(*dists: str) -> dict[str, str]:
    """Installed versions of distributions ("not installed" for a missing one): part of an answer's key, and the
    libraries a run's lineage records (quantmill.tasks.track)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def memo_key(kind: str, **parts: Any) -> str:
    """Key of one question: its kind and every input it reads (JSON-able: content hashes, settings, versions)."""
    return stable_hash({"kind": kind, **parts})


def _path(kind: str, key: str) -> Path:
    return state.home() / "checked" / kind / f"{key}.json"


def recall(kind: str, key: str) -> Any | None:
    """The kept answer, or None when there is none (or it cannot be read: then the check runs again)."""
    try:
        return json.loads(_path(kind, key).read_text())["answer"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(kind: str, key: str, answer: Any) -> None:
    """Keep an answer (whole or not at all: written beside, then renamed). A state folder that cannot be written only
    costs the next run the check again; the run's own writes to it are checked where they matter."""
    path = _path(kind, key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # sweeps check from threads
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"answer": answer}))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
