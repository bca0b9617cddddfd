"""Cache keys follow content, parameters and code; Prefect reports hits; stale records recompute."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from quantmill.caching import fingerprint, step_key
from quantmill.profile import TextSource
from quantmill.refs import ModelRef
from quantmill.store import ArtifactStore
from quantmill.tasks._cache import StepCache

CACHE = StepCache(step="toy", code_version="1")
BUILDS: list[int] = []


@task(cache_policy=CACHE, persist_result=True)
def toy(source: TextSource, factor: int, store_root: str) -> str:
    key = CACHE.key_for({"source": source, "factor": factor})

    def build(out: Path) -> dict:
        BUILDS.append(1)
        (out / "result.txt").write_text(Path(source.path).read_text() * factor)
        return {}

    return str(ArtifactStore(store_root).get_or_build(key, build).path)


@flow
def toy_flow(source: TextSource, factor: int, store_root: str):
    return toy(source, factor, store_root, return_state=True)


def test_key_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same")
    b.write_text("same")
    ka = step_key("s", "1", {"src": TextSource(path=str(a))})
    assert ka == step_key("s", "1", {"src": TextSource(path=str(a))})
    b.write_text("different")
    assert ka != step_key("s", "1", {"src": TextSource(path=str(b))})
    assert ka != step_key("s", "2", {"src": TextSource(path=str(a))})  # code version


def test_refs_key_on_hashes_not_paths():
    one = ModelRef(path="/a", sha256="x", source="s")
    two = ModelRef(path="/b", sha256="x", source="s")
    assert fingerprint(one) == fingerprint(two)
    assert fingerprint(one) != fingerprint(ModelRef(path="/a", sha256="y", source="s"))


def test_prefect_cache_hits_misses_and_stale_artifacts(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("abc")
    store = str(tmp_path / "store")
    source = TextSource(path=str(src))
    BUILDS.clear()

    first = toy_flow(source, 2, store)
    assert first.name == "Completed" and len(BUILDS) == 1
    second = toy_flow(source, 2, store)
    assert second.name == "Cached" and len(BUILDS) == 1

    third = toy_flow(source, 3, store)  # parameter change: miss
    assert third.name == "Completed" and len(BUILDS) == 2

    src.write_text("abd")  # input content change: miss
    assert toy_flow(source, 2, store).name == "Completed" and len(BUILDS) == 3

    out = Path(toy_flow(source, 2, store).result())
    (out / "result.txt").write_text("tampered")  # damaged artifact: recomputed, not served
    fourth = toy_flow(source, 2, store)
    assert fourth.name == "Completed" and len(BUILDS) == 4
    assert (out / "result.txt").read_text() == "abdabd"
    assert toy_flow(source, 2, store).name == "Cached"
