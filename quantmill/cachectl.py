"""The artifact store in the user's hands: list it, size it, prune it, keep only what was registered.

What an artifact is "needed by" comes from MLflow, the user's own record: a registered version's tags
(checkpoint, calibration, merged model, evaluation data digests) and an active run's tags name artifacts by
content digest; the store's manifests add the step inputs each artifact was built from, so a version also
keeps its evaluation, the baseline it was compared with and everything upstream.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from quantmill import state
from quantmill.errors import QuantmillError
from quantmill.store import ArtifactStore, Entry

Keep = Literal["registered", "runs", "none"]
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class Listed:
    """An artifact and who needs it ('registered', 'run' or '')."""

    entry: Entry
    needed_by: str


def parse_age(text: str) -> float:
    """Seconds of '30m', '12h', '7d', '2w' (one clear line otherwise)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not m:
        raise QuantmillError(f"--older-than {text!r}: use a number and a unit s|m|h|d|w, e.g. 7d or 12h")
    return float(m.group(1)) * UNITS[m.group(2)]


def human_size(n: float) -> str:
    """1.5 MiB style sizes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def human_age(seconds: float) -> str:
    """'3m', '5h', '2d' style ages."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _values(tags: dict[str, str], params: dict[str, str] | None = None) -> set[str]:
    return {v for v in (*tags.values(), *(params or {}).values()) if isinstance(v, str) and len(v) >= 32}


def registered_digests() -> set[str]:
    """Content digests named by the tags of every registered model version."""
    from quantmill import tracking

    client = tracking.client()
    out: set[str] = set()
    for rm in client.search_registered_models():
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            out |= _values(mv.tags)
    return out


def run_digests() -> set[str]:
    """Content digests named by the tags and params of every active (not deleted) MLflow run."""
    from mlflow.entities import ViewType

    from quantmill import tracking

    client = tracking.client()
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    out: set[str] = set()
    if exps:
        token = None
        while True:
            page = client.search_runs(exps, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            for run in page:
                out |= _values(run.data.tags, run.data.params)
            token = page.token
            if not token:
                break
    return out


def closure(entries: list[Entry], digests: set[str]) -> set[str]:
    """Keys of the artifacts with these digests, the evaluations of them, and everything they were built from."""
    by_key = {e.key: e for e in entries}
    seeds = {e.key for e in entries if e.digest and e.digest in digests}
    checkpoints = {k for k in seeds if by_key[k].step == "quantize"}
    seeds |= {e.key for e in entries if e.step == "evaluate" and set(e.inputs) & checkpoints}
    keep, todo = set(), list(seeds)
    while todo:
        key = todo.pop()
        if key in keep:
            continue
        keep.add(key)
        todo.extend(k for k in by_key.get(key, Entry(key, "", 0, 0, "", ())).inputs if k in by_key)
    return keep


def needs(entries: list[Entry]) -> dict[str, str]:
    """key -> 'registered' / 'run' for artifacts a registered version or an active run needs."""
    registered = closure(entries, registered_digests())
    runs = closure(entries, run_digests())
    return {e.key: "registered" if e.key in registered else "run" if e.key in runs else "" for e in entries}


def listing(store: ArtifactStore) -> list[Listed]:
    """Every artifact, oldest first, with who needs it."""
    entries = store.entries()
    need = needs(entries)
    return [Listed(e, need[e.key]) for e in entries]


def drop_prefect_record(key: str) -> None:
    """Remove the Prefect cache record of a step run whose artifact went away (it would be stale anyway)."""
    import os

    (Path(os.environ.get("PREFECT_LOCAL_STORAGE_PATH") or state.prefect_results()) / key).unlink(missing_ok=True)


@dataclass
class PruneResult:
    """What a prune removed (or would remove), kept, and skipped because a run holds it."""

    removed: list[Entry]
    kept: int
    in_use: list[str]
    freed_bytes: int


def prune(
    store: ArtifactStore, *, keep: Keep = "registered", older_than_s: float | None = None, dry_run: bool = False,
    only: Iterable[str] | None = None,
) -> PruneResult:
    """Remove artifacts nobody keeps (per `keep`), older than `older_than_s` when given, never one in use."""
    listed = listing(store)
    wanted = {"registered": {"registered"}, "runs": {"registered", "run"}, "none": set()}[keep]
    only = set(only) if only is not None else None
    now = time.time()
    result = PruneResult([], 0, [], 0)
    for item in listed:
        e = item.entry
        if item.needed_by in wanted or (only is not None and e.key not in only) or (
            older_than_s is not None and now - e.created < older_than_s
        ):
            result.kept += 1
            continue
        if dry_run:
            if store.in_use(e.key):
                result.in_use.append(e.key)
                continue
            result.removed.append(e)
            result.freed_bytes += e.size_bytes
            continue
        freed = store.remove(e.key)
        if freed is None:
            result.in_use.append(e.key)
            continue
        drop_prefect_record(e.key)
        result.removed.append(e)
        result.freed_bytes += freed
    return result


def run_checkpoint_digests(run_id: str) -> set[str]:
    """Checkpoint digests of one pipeline run's variants (its `quantize/<name>` child runs)."""
    from quantmill import tracking

    client = tracking.client()
    parent = client.get_run(run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    return {c.data.tags["checkpoint_sha256"] for c in children if "checkpoint_sha256" in c.data.tags}


def drop_unregistered_checkpoints(store_root: str, run_id: str) -> PruneResult:
    """`storage.keep: registered`: remove this run's variant checkpoints that no registered version holds."""
    store = ArtifactStore(store_root)
    mine = run_checkpoint_digests(run_id) - registered_digests()
    keys = [e.key for e in store.entries() if e.step == "quantize" and e.digest in mine]
    result = PruneResult([], 0, [], 0)
    by_key = {e.key: e for e in store.entries()}
    for key in keys:
        freed = store.remove(key)
        if freed is None:
            result.in_use.append(key)
            continue
        drop_prefect_record(key)
        result.removed.append(by_key[key])
        result.freed_bytes += freed
    return result


def store_for(root: str | None) -> ArtifactStore:
    """The store a command works on: --store, else the default `storage.root`."""
    from quantmill.profile import Storage

    path = root or Storage().root
    if root and "://" not in path and not Path(path).expanduser().exists():
        raise QuantmillError(f"--store {path}: no artifact store there (nothing has run yet, or pass --store ROOT)")
    return ArtifactStore(path)
