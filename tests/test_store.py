"""Artifact store: atomic commits, manifests, verified hits, recovery from damage and crashes."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

from quantmill.store import MANIFEST, ArtifactStore, artifact_key


def _write(out: Path, text: str = "weights") -> dict:
    (out / "model.safetensors").write_text(text)
    (out / "sub").mkdir()
    (out / "sub" / "config.json").write_text("{}")
    return {"note": text}


def test_commit_writes_manifest_and_reuses(tmp_path):
    store = ArtifactStore(tmp_path)
    calls = []
    key = artifact_key("step", a=1)
    art = store.get_or_build(key, lambda out: calls.append(1) or _write(out))
    assert not art.cached and art.record == {"note": "weights"}
    manifest = json.loads((art.path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.safetensors", "sub/config.json"}
    assert manifest["files"]["model.safetensors"]["size"] == len("weights")
    again = store.get_or_build(key, lambda out: calls.append(1) or _write(out))
    assert again.cached and again.digest == art.digest and calls == [1]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_key_depends_on_every_part():
    assert artifact_key("s", a=1) == artifact_key("s", a=1)
    assert artifact_key("s", a=1) != artifact_key("s", a=2)
    assert artifact_key("s", a=1) != artifact_key("t", a=1)


def test_corrupted_artifact_is_recomputed_with_warning(tmp_path, caplog):
    store = ArtifactStore(tmp_path)
    key = artifact_key("step", a=1)
    art = store.get_or_build(key, _write)
    (art.path / "model.safetensors").write_text("weightz")  # same size, other content
    assert "content changed" in store.verify(key)
    with caplog.at_level(logging.WARNING, logger="quantmill.store"):
        fixed = store.get_or_build(key, _write)
    assert "damaged" in caplog.text and not fixed.cached
    assert (fixed.path / "model.safetensors").read_text() == "weights"
    assert store.verify(key) is None


def test_missing_file_detected(tmp_path):
    store = ArtifactStore(tmp_path)
    key = artifact_key("step", a=1)
    art = store.get_or_build(key, _write)
    os.unlink(art.path / "sub" / "config.json")
    assert "missing" in store.verify(key)


def test_failed_build_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    key = artifact_key("step", a=1)

    def boom(out: Path) -> dict:
        _write(out)
        raise RuntimeError("crash midway")

    try:
        store.get_or_build(key, boom)
    except RuntimeError:
        pass
    assert not store.path(key).exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_stale_staging_of_dead_process_is_cleaned(tmp_path):
    store = ArtifactStore(tmp_path)
    dead = tmp_path / "tmp" / "step-abc.999999.deadbeef"
    dead.mkdir()
    (dead / "half.bin").write_text("x")
    store.get_or_build(artifact_key("step", a=2), _write)
    assert not dead.exists()


def _slow_build(root: str, key: str, log: str) -> None:
    def build(out: Path) -> dict:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return _write(out)

    ArtifactStore(root).get_or_build(key, build)


def test_concurrent_builders_build_once(tmp_path):
    key = artifact_key("step", a=3)
    log = tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_slow_build, args=(str(tmp_path / "store"), key, str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log.read_text().split()) == 1
    assert ArtifactStore(tmp_path / "store").verify(key) is None


def test_shared_fsspec_store_is_reused_by_another_machine(tmp_path, monkeypatch):
    shared = f"file://{tmp_path / 'shared'}"
    key = artifact_key("step", a=4)
    monkeypatch.setenv("QUANTMILL_HOME", str(tmp_path / "machine-a"))
    built = ArtifactStore(shared).get_or_build(key, _write)
    assert not built.cached and (tmp_path / "shared" / "objects" / key / MANIFEST).is_file()

    monkeypatch.setenv("QUANTMILL_HOME", str(tmp_path / "machine-b"))  # another worker, empty local cache
    calls = []
    other = ArtifactStore(shared).get_or_build(key, lambda out: calls.append(1) or _write(out))
    assert calls == [] and other.cached and other.digest == built.digest
    assert str(other.path).startswith(str(tmp_path / "machine-b"))

    (tmp_path / "shared" / "objects" / key / "model.safetensors").write_text("weightz")  # damaged upstream
    monkeypatch.setenv("QUANTMILL_HOME", str(tmp_path / "machine-c"))
    again = ArtifactStore(shared).get_or_build(key, lambda out: calls.append(1) or _write(out))
    assert calls == [1] and (again.path / "model.safetensors").read_text() == "weights"
