"""Cache keys follow content, parameters and code; Prefect reports hits; stale records recompute."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from quantmill.caching import bound_arguments, fingerprint, step_key
from quantmill.context import StepContext
from quantmill.profile import TextSource
from quantmill.refs import ModelRef
from quantmill.store import ArtifactStore
from quantmill.tasks._cache import StepCache

CACHE = StepCache(step="toy", code_version="1")
BUILDS: list[int] = []


@task(cache_policy=CACHE, persist_result=True)
def toy(source: TextSource, factor: int, *, ctx: StepContext) -> str:
    key = CACHE.key_for(locals())

    def build(out: Path) -> dict:
        BUILDS.append(1)
        (out / "result.txt").write_text(Path(source.path).read_text() * factor)
        return {}

    return str(ArtifactStore(ctx.store_root).get_or_build(key, build).path)


@flow
def toy_flow(source: TextSource, factor: int, store_root: str, run_id: str = "run-1"):
    return toy(source, factor, ctx=StepContext(store_root=store_root, run_id=run_id), return_state=True)


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
    second = toy_flow(source, 2, store, run_id="run-2")  # another run (same inputs): a hit
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


def test_key_is_derived_from_every_bound_argument(tmp_path):
    """A new parameter keys the step without being listed; the run id and store root never do."""
    ctx = StepContext(store_root=str(tmp_path / "a"), device="cpu", run_id="r1")

    def step(source: TextSource, factor: int, *, ctx: StepContext) -> None: ...

    def grown(source: TextSource, factor: int, scale: float = 1.0, *, ctx: StepContext) -> None: ...

    src = tmp_path / "in.txt"
    src.write_text("abc")
    source = TextSource(path=str(src))
    key = CACHE.key_for(bound_arguments(step, source, 2, ctx=ctx))
    assert key == CACHE.key_for(bound_arguments(step, source, 2, ctx=ctx.model_copy(update={"run_id": "r2"})))
    assert key == CACHE.key_for(bound_arguments(step, source, 2, ctx=StepContext(store_root="/elsewhere", run_id="r1")))
    assert key != CACHE.key_for(bound_arguments(step, source, 3, ctx=ctx))  # a parameter's value
    assert key != CACHE.key_for(bound_arguments(grown, source, 2, ctx=ctx))  # a new parameter, at its default
    assert CACHE.key_for(bound_arguments(grown, source, 2, ctx=ctx)) != CACHE.key_for(
        bound_arguments(grown, source, 2, 0.5, ctx=ctx))
    assert key != CACHE.key_for(bound_arguments(step, source, 2, ctx=ctx.model_copy(update={"device": "cuda"})))
    src.write_text("abd")  # the file a parameter names (TextSource.path): its content keys the step
    assert key != CACHE.key_for(bound_arguments(step, source, 2, ctx=ctx))


def test_declared_ignores_and_content_paths(tmp_path):
    """`ignore` drops an argument or a context field; `content` keys a path argument by its file, not its name."""
    policy = StepCache(step="toy", code_version="1", ignore=("device", "workers"), content=("text",))

    def step(text: str, workers: int, *, ctx: StepContext) -> None: ...

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same")
    b.write_text("same")
    ctx = StepContext(store_root=str(tmp_path), device="cpu")
    key = policy.key_for(bound_arguments(step, str(a), 1, ctx=ctx))
    assert key == policy.key_for(bound_arguments(step, str(b), 4, ctx=ctx.model_copy(update={"device": "cuda"})))
    b.write_text("other")
    assert key != policy.key_for(bound_arguments(step, str(b), 1, ctx=ctx))


def test_steps_key_on_their_bound_arguments_as_before():
    """The pipeline's tasks: Prefect's inputs and the body's store key agree, and match the keys the steps had
    before the StepContext (so stores built earlier are still hit); run id and store root do not enter them."""
    from quantmill.profile import Calibration, Recipe
    from quantmill.refs import CalibRef
    from quantmill.tasks.calibrate import calibrate
    from quantmill.tasks.quantize import quantize

    model = ModelRef(path="/m", sha256="ab", source="org/m", revision="r1")
    calib = CalibRef(path="/c", digest="cd", num_samples=8, seq_len=32, seed=0, source="x", store_key="calibrate-1")
    spec = Calibration(source=TextSource(dataset="wikitext", config="wikitext-2-raw-v1"), num_samples=8, seq_len=32)
    ctx = StepContext(store_root="/store", device="cpu", run_id="RUN")
    keys = {
        "calibrate": calibrate.cache_policy.key_for(bound_arguments(calibrate.fn, model, spec, ctx=ctx)),
        "quantize": quantize.cache_policy.key_for(
            bound_arguments(quantize.fn, model, Recipe(method="gptq", params={"bits": 4, "group_size": 32}),
                            calib=calib, ctx=ctx)),
    }
    assert keys == {"calibrate": "calibrate-b218e6a3284230fc5a0cce05", "quantize": "quantize-8073d1c6ff2fdb316394a8e6"}
    other = ctx.model_copy(update={"store_root": "/other", "run_id": "RUN2", "device": "cuda"})
    assert calibrate.cache_policy.key_for(bound_arguments(calibrate.fn, model, spec, ctx=other)) == keys["calibrate"]
