"""Content-addressed artifact store: atomic writes, manifests, verified cache hits."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantmill import state
from quantmill.hashing import manifest_digest, manifest_of, stable_hash
from quantmill.locks import file_lock

MANIFEST = ".manifest.json"
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
DISK_MESSAGE = re.compile(rf"os error ({'|'.join(str(n) for n in sorted(DISK_ERRORS))})\b|No space left on device|"
                          "Read-only file system|Disk quota exceeded")
log = logging.getLogger("quantmill.store")


_INPUTS: dict[str, list[str]] = {}  # key -> store keys of the artifacts it was built from (this process)


def note_inputs(key: str, parents: list[str]) -> None:
    """Remember which artifacts `key` is built from; its manifest records them (cache ls/prune lineage)."""
    _INPUTS[key] = sorted(set(parents))


@dataclass(frozen=True)
class Entry:
    """One stored artifact as `quantmill cache ls` shows it."""

    key: str
    step: str
    size_bytes: int
    created: float
    digest: str
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class Artifact:
    """A committed artifact: where it is, its content digest, the record its step returned."""

    key: str
    path: Path
    digest: str
    record: dict[str, Any]
    size_bytes: int
    cached: bool


def disk_error(exc: BaseException, root: Path) -> str | None:
    """Why a write failed when the filesystem is full or read-only (OSError, or a library's wrapped I/O error)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            return os.strerror(e.errno)
        m = DISK_MESSAGE.search(str(e))
        if m:
            return os.strerror(int(m.group(1))) if m.group(1) else m.group(0)
        e = e.__cause__ or e.__context__
    with contextlib.suppress(OSError):  # e.g. torch.save reports a short write as "unexpected pos"
        if shutil.disk_usage(root).free < 1 << 16:
            return os.strerror(errno.ENOSPC)
    return None


def artifact_key(step: str, **parts: Any) -> str:
    """Key for a step's output from its inputs' content hashes, parameters and code version."""
    return f"{step}-{stable_hash(parts)[:24]}"


def is_url(root: str | os.PathLike[str]) -> bool:
    """True for fsspec URLs such as s3://, gs://, file://, memory://."""
    return "://" in str(root)


class ArtifactStore:
    """Step outputs under `root/objects/<key>`, staged in `root/tmp` and renamed into place.

    `root` may be an fsspec URL (shared storage for workers on several machines): artifacts are then
    built in a local cache folder and published to `URL/objects/<key>/` file by file, the manifest last,
    so a reader never sees a partial artifact; a reader fetches and verifies a published one.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.url: str | None = None
        if is_url(root):
            self.url = str(root).rstrip("/")
            root = state.home() / "store-cache" / stable_hash(self.url)[:16]
        self.root = Path(root).expanduser().resolve()
        for sub in ("objects", "tmp", "locks", "trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def _fs(self):  # noqa: ANN202 - fsspec filesystem
        import fsspec

        return fsspec.core.url_to_fs(self.url)[0]

    def _remote(self, key: str) -> str:
        return f"{self.url}/objects/{key}"

    def publish(self, key: str) -> None:
        """Upload a committed local artifact to the shared URL (data files first, manifest last)."""
        fs, final = self._fs(), self.path(key)
        for f in sorted(final.rglob("*")):
            if f.is_file() and f.name != MANIFEST:
                dest = f"{self._remote(key)}/{f.relative_to(final).as_posix()}"
                fs.makedirs(posixpath.dirname(dest), exist_ok=True)
                fs.put_file(str(f), dest)
        fs.put_file(str(final / MANIFEST), f"{self._remote(key)}/{MANIFEST}")

    def fetch(self, key: str) -> bool:
        """Download a published artifact into the local cache; True when it arrived intact."""
        fs = self._fs()
        remote = self._remote(key)
        if not fs.exists(f"{remote}/{MANIFEST}"):
            return False
        staged = self.root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            saved = json.loads(fs.cat_file(f"{remote}/{MANIFEST}"))
            for rel in saved["files"]:
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{remote}/{rel}", str(staged / rel))
            (staged / MANIFEST).write_text(json.dumps(saved))
            if manifest_of(staged, skip=[MANIFEST]) != saved["files"]:
                log.warning("shared artifact %s is damaged; recomputing", remote)
                return False
            final = self.path(key)
            if final.exists():
                os.replace(final, self.root / "trash" / f"{key}.{uuid.uuid4().hex}")
            os.replace(staged, final)
            return True
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def path(self, key: str) -> Path:
        """Final location of an artifact."""
        return self.root / "objects" / key

    def verify(self, key: str) -> str | None:
        """None when the artifact is intact, else why not ('missing', or the damaged file)."""
        final = self.path(key)
        try:
            saved = json.loads((final / MANIFEST).read_text())
        except (OSError, ValueError):
            return "missing" if not final.exists() else f"{final / MANIFEST}: unreadable manifest"
        for rel, entry in saved["files"].items():
            f = final / rel
            if not f.is_file() or f.stat().st_size != entry["size"]:
                return f"{f}: missing or wrong size"
        current = manifest_of(final, skip=[MANIFEST])
        if current != saved["files"]:
            bad = sorted(k for k in set(current) | set(saved["files"]) if current.get(k) != saved["files"].get(k))
            return f"{final / bad[0]}: content changed" if bad else "manifest mismatch"
        return None

    def load(self, key: str, cached: bool = True) -> Artifact:
        """Read a committed artifact's manifest (caller verified it)."""
        final = self.path(key)
        saved = json.loads((final / MANIFEST).read_text())
        size = sum(e["size"] for e in saved["files"].values())
        return Artifact(key, final, saved["digest"], saved.get("record", {}), size, cached)

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive inter-process lock on one key (another process waits)."""
        with file_lock(self.root / "locks" / f"{key}.lock"):
            yield

    def clean_stale(self) -> None:
        """Remove staging folders left by processes that died (e.g. kill -9)."""
        for tmp in (self.root / "tmp").iterdir():
            parts = tmp.name.split(".")
            pid = int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None
            if pid is None or not state.pid_alive(pid):
                shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(self.root / "trash", ignore_errors=True)
        (self.root / "trash").mkdir(exist_ok=True)

    def commit(self, key: str, staged: Path, record: dict[str, Any]) -> Artifact:
        """Write the manifest and atomically move a staged folder into place."""
        files = manifest_of(staged, skip=[MANIFEST])
        digest = manifest_digest(files)
        manifest = {"key": key, "digest": digest, "files": files, "record": record, "created": time.time(),
                    "inputs": _INPUTS.get(key, [])}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
        final = self.path(key)
        if final.exists():
            os.replace(final, self.root / "trash" / f"{key}.{uuid.uuid4().hex}")
        os.replace(staged, final)
        return self.load(key, cached=False)

    def get_or_build(
        self, key: str, build: Callable[[Path], dict[str, Any]], *, force: bool = False
    ) -> Artifact:
        """Return the verified artifact for `key`, building it (once, under a lock) if needed."""
        from quantmill import refresh

        with self.lock(key):
            force = force or refresh.take(key)
            problem = self.verify(key)
            if problem is not None and not force and self.url is not None and self.fetch(key):
                problem = self.verify(key)
            if problem is None and not force:
                return self.load(key)
            if problem != "missing":
                log.warning("artifact %s is damaged (%s); recomputing", key, problem)
            self.clean_stale()
            staged = self.root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            staged.mkdir(parents=True)
            try:
                record = build(staged)
                art = self.commit(key, staged, record)
            except Exception as exc:
                from quantmill.errors import PreflightError, QuantmillError

                why = None if isinstance(exc, QuantmillError) else disk_error(exc, self.root)
                if why is None:
                    raise

                raise PreflightError(
                    f"storage.root: step {key.rsplit('-', 1)[0]} could not write {self.root}: {why}; "
                    "nothing was kept: free some space or point storage.root at a larger, writable disk"
                ) from None
            finally:
                shutil.rmtree(staged, ignore_errors=True)
            if self.url is not None:
                self.publish(key)
            if force:
                refresh.rebuilt(key)
            return art

    def entries(self) -> list[Entry]:
        """Every committed artifact (unreadable manifests are listed with step '?'), oldest first."""
        out = []
        for final in (self.root / "objects").iterdir():
            try:
                saved = json.loads((final / MANIFEST).read_text())
                size = sum(e["size"] for e in saved["files"].values())
                out.append(Entry(final.name, final.name.rsplit("-", 1)[0], size, float(saved.get("created", 0)),
                                 saved.get("digest", ""), tuple(saved.get("inputs", []))))
            except (OSError, ValueError, KeyError):
                size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
                out.append(Entry(final.name, "?", size, final.stat().st_mtime, "", ()))
        return sorted(out, key=lambda e: e.created)

    def in_use(self, key: str) -> bool:
        """True while another process (or thread) holds the lock of `key` (a run is building it)."""
        path = self.root / "locks" / f"{key}.lock"
        if not path.exists():
            return False
        with file_lock(path, blocking=False) as held:
            return not held

    def remove(self, key: str) -> int | None:
        """Delete one artifact unless its lock is held; bytes freed, or None when it is in use."""
        final = self.path(key)
        with file_lock(self.root / "locks" / f"{key}.lock", blocking=False) as held:
            if not held:
                return None
            if not final.exists():
                return 0
            size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
            trash = self.root / "trash" / f"{key}.{uuid.uuid4().hex}"
            os.replace(final, trash)  # atomic: a reader sees the artifact whole or missing
            shutil.rmtree(trash, ignore_errors=True)
            return size
