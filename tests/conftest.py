"""Test setup: a private state folder (Prefect, MLflow, artifacts), cached trained models, profiles, a warm store."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback TCP port free at the moment of asking (for the test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_configure(config: pytest.Config) -> None:
    """Point quantmill, Prefect and MLflow at a throw-away state folder before anything imports them."""
    home = Path(tempfile.mkdtemp(prefix="quantmill-tests-"))
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))  # each test process's own, gone at its end
    os.environ["QUANTMILL_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    # This process's own Prefect client (in-process flows) reports to the session's `prefect server`, which CLI runs
    # share too (tests/servers.py: shared_prefect_api), on a port reserved here: Prefect reads its settings once, on
    # import. subprocess_env drops the URL again, so a CLI run starts Prefect's temporary server unless a test passes
    # the server (served_env).
    from tests.fresh import reserve_socket
    from tests.servers import reserve_shared_api

    os.environ["PREFECT_API_URL"] = reserve_shared_api()
    reserve_socket()  # the session's template for new processes (tests/fresh.py)
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ["HF_HUB_OFFLINE"] = "1"
    # gptqmodel's CPU kernel (TorchLinear) torch.compiles its dequantizer on a GPTQ-format checkpoint's first forward:
    # ~17 s in every process that loads one (measured 2026-12-02), for identical integer unpacking; in the demo (+ GPTQ)
    # run, its guards recompile it for each module of the RTN variant (evaluation 34 s instead of 6 s, 108 s of the
    # run's CPU instead of 71 s, the same figures). Tests and their subprocesses run it eagerly; the step-release
    # check keeps PyTorch's default (`compiled`).
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    # Before torch starts OpenMP: two test workers with two OpenMP threads each share two cores, so idle OpenMP
    # threads sleep instead of spinning (measured 2026-12-02 on the GPTQ-family tests: 13 % less CPU, same results).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel's CPU thread pool: one per core
    from quantmill import state

    state.configure_environment()


# Test modules by measured cost, dearest first (2026-12-02, three pytest-xdist workers, models cached: 213 s down to
# 19 s). Under pytest-xdist (scripts/test.sh: `-n 3 --dist loadgroup --no-loadscope-reorder`) work is handed out in
# collection order, so the long units start first and the short ones fill the gaps at the end.
DEAREST_FIRST = (
    "test_quantize_new_methods", "test_mlflow_server_e2e", "test_crash_safety", "test_presets",
    "test_quantize_gptq_family", "test_console", "test_cache_cli", "test_deployments_e2e", "test_sweep",
    "test_quantize_memory", "test_mixed_precision", "test_variant_memory", "test_benchmark_quantize", "test_bad_inputs",
    "test_quantize_methods", "test_checkpoint_dtypes", "test_fault_injection", "test_pipeline_e2e", "test_demo",
)
SERVER_THREAD = pytest.StashKey[threading.Thread]()
SHARED_RUNS = ("demo_run", "demo_rerun")  # session fixtures too dear to compute on several workers


def _per_param(name: str, params: dict, defs: dict) -> bool:
    """Whether fixture `name` is computed once per value of `params` (it is one of them or depends on one)."""
    return name in params or any(_per_param(a, params, defs) for d in defs.get(name, ()) for a in d.argnames)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the tests that share a dear fixture on one pytest-xdist worker (`xdist_group`): a module's own module- or
    session-scoped fixtures (one group per value of their parameters: `assets` llama and qwen2 run side by side), or
    the one cold `quantmill demo` run. Then order them: the dear modules' Qwen2 halves first (groups before single
    tests), then the modules dearest first (then the other modules with slow tests, then the rest), keeping each
    module's tests together. On a fresh clone one worker trains the Llama first (128 s, the longest), the others the
    Qwen2 and the tiny Llama (pytest_runtestloop): the first units handed out are work they can start without waiting
    for the Llama (which they did for 60 to 96 s each, measured 2026-12-02)."""
    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")

    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        if fixtures is None or item.get_closest_marker("xdist_group"):
            continue
        if any(name in fixtures.names_closure for name in SHARED_RUNS):
            item.add_marker(pytest.mark.xdist_group("demo-run"))
            continue
        path, defs = item.nodeid.split("::")[0], fixtures.name2fixturedefs
        local = {d.argname for ds in defs.values() for d in ds if d.baseid == path and d.scope in ("module", "session")}
        if local:  # (the GPTQ-family module's session fixtures were computed on two workers each)
            callspec = getattr(item, "callspec", None)
            params = {k: v for k, v in (callspec.params.items() if callspec else ()) if k in local}
            split = params and all(_per_param(name, params, defs) for name in local)
            values = ",".join(f"{k}={v}" for k, v in sorted(params.items())) if split else ""
            # (no "]" in a group's name: pytest-xdist would read "...[x]@name[y]" as a test id without a group)
            item.add_marker(pytest.mark.xdist_group(path + (f":{values}" if values else "")))

    rank = {name: i for i, name in enumerate(DEAREST_FIRST)}
    slow = {module(item) for item in items if item.get_closest_marker("slow")}
    first = {}
    for i, item in enumerate(items):
        first.setdefault(module(item), i)
    position = {item: i for i, item in enumerate(items)}

    def qwen2_first(item: pytest.Item) -> tuple[bool, bool]:
        callspec = getattr(item, "callspec", None)
        qwen2 = module(item) in rank and "qwen2" in (callspec.params.values() if callspec else ())
        return not qwen2, not (qwen2 and item.get_closest_marker("xdist_group"))

    items.sort(key=lambda item: (*qwen2_first(item), rank.get(module(item), len(rank)), module(item) not in slow,
                                 first[module(item)], position[item]))


def pytest_sessionstart(session: pytest.Session) -> None:
    """pytest-xdist's controller starts the session's Prefect server in the background while its workers start
    (tests/servers.py: shared_prefect_api), and the template of new processes (tests/fresh.py); it stops them once
    the workers have all ended (pytest_unconfigure)."""
    if session.config.pluginmanager.has_plugin("dsession") and not session.config.option.collectonly:
        from tests.fresh import start_template
        from tests.servers import start_shared_server

        start_template()

        thread = threading.Thread(target=start_shared_server, name="shared-prefect-server", daemon=True)
        thread.start()
        session.config.stash[SERVER_THREAD] = thread


def pytest_unconfigure(config: pytest.Config) -> None:
    thread = config.stash.get(SERVER_THREAD, None)
    if thread is not None:
        from tests.fresh import stop_template
        from tests.servers import stop_shared_server

        thread.join(timeout=300)
        stop_shared_server()
        stop_template()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop a temporary Prefect server this process started (none unless a test unset PREFECT_API_URL) while the output
    is still open (its atexit hook logs to a closed stream); send the logs and events still queued."""
    import sys

    server_mod = sys.modules.get("prefect.server.api.server")
    if server_mod is not None:
        from prefect._internal.concurrency.services import QueueService

        QueueService.drain_all(timeout=10)  # logs and events still queued for the server
        for server in list(server_mod.SubprocessASGIServer._instances.values()):
            server.stop()


@pytest.fixture(autouse=True)
def _mlflow_uris_not_inherited() -> Iterator[None]:
    """`mlflow.set_tracking_uri` (quantmill.tracking.client) exports the URI to os.environ, where quantmill reads
    a user's MLFLOW_TRACKING_URI: after an in-process run on another state folder, the next test in this process
    would track there. Each test leaves them as the session has them (unset)."""
    yield
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(var, None)


def python_script(code: str, *args: str) -> list[str]:
    """Command line running `code` in a fresh interpreter that exits as soon as the script ends (`os._exit` after
    flushing its output): the interpreter's teardown of torch, transformers and MLflow costs 1-3 s of CPU per process
    (measured 2026-12-02) and no test of a helper script is about it. An exception still exits non-zero."""
    quick_exit = "\nimport os as _os, sys as _sys\n_sys.stdout.flush()\n_sys.stderr.flush()\n_os._exit(0)\n"
    return [sys.executable, "-c", code + quick_exit, *args]


def subprocess_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for a quantmill subprocess with its own state folder (nothing inherited from this session)."""
    env = {**os.environ, "QUANTMILL_HOME": str(home), **extra}
    for var in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "MLFLOW_TRACKING_URI",
                "MLFLOW_REGISTRY_URI"):
        if var not in extra:
            env.pop(var, None)
    return env


def compiled(env: dict[str, str]) -> dict[str, str]:
    """`env` for a subprocess on PyTorch's default path, gptqmodel's compiled dequantizer included (the step-release
    check, where a compiled kernel's caches could hold a model)."""
    return {k: v for k, v in env.items() if k != "TORCH_COMPILE_DISABLE"}


def model_cache() -> Path:
    """Where trained test models are kept between runs ($QUANTMILL_TEST_MODELS or .quantmill/test-models)."""
    return Path(os.environ.get("QUANTMILL_TEST_MODELS") or REPO / ".quantmill" / "test-models")


def cached_model(arch: str, with_adapter: bool, spec=None):
    """A demo model from the model cache, trained on first use (build_demo_assets keys the cache by its spec and
    lets one process build each model: a second test worker waits for it)."""
    from quantmill.demo import build_demo_assets

    return build_demo_assets(model_cache(), arch=arch, with_adapter=with_adapter, spec=spec, quiet=True)


def demo_llama():
    """The demo Llama (+ LoRA adapter), trained on first use and cached (callable outside fixtures)."""
    return cached_model("llama", with_adapter=True)


@pytest.fixture(scope="session")
def demo_assets():
    """The demo Llama (+ LoRA adapter), trained once and cached."""
    return demo_llama()


def tiny_llama():
    """A Llama (+ adapter) trained 4 steps: real files for tests of file handling, not of quality."""
    from quantmill.demo_training import DemoSpec

    return cached_model("llama", with_adapter=True, spec=DemoSpec(steps=4, lora_steps=2, batch_size=4))


def qwen2_spec():
    """The test Qwen2's training: half the demo's steps (training is the dearest fixture on a fresh clone: 95 s at
    560 steps; measured 2026-12-01, every Qwen2 quality test passes at 280)."""
    from quantmill.demo_training import DemoSpec

    return DemoSpec(steps=280)


def demo_qwen2():
    """A small Qwen2 (GQA, tied embeddings, attention bias), trained on first use and cached."""
    return cached_model("qwen2", with_adapter=False, spec=qwen2_spec())


@pytest.fixture(scope="session")
def tiny_assets():
    """A Llama (+ adapter) trained 4 steps: real files for tests of file handling, not of quality."""
    return tiny_llama()


@pytest.fixture(scope="session")
def qwen2_assets():
    """A small Qwen2 (GQA, tied embeddings, attention bias), trained once and cached."""
    return demo_qwen2()


# The session fixtures that train a model on first use, and their builders.
MODEL_FIXTURES = {"demo_assets": demo_llama, "qwen2_assets": demo_qwen2, "tiny_assets": tiny_llama}


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """Under pytest-xdist, each worker builds a different one of the models the collected tests need before its first
    test, then waits for the session's Prefect server if it does not answer yet (`shared_prefect_api`): on a fresh
    clone the Llama and the Qwen2 train side by side while the controller makes the seed Prefect database
    (`seed_prefect_home`) and starts the server.
    The other models are built, or waited for, when a test first asks for one: a worker whose first tests need no
    Llama runs them while the Llama trains (the longest training: 128 s, and alone it keeps only about 1.25 of the two
    cores busy; measured 2026-12-02), instead of waiting for every model first."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if session.config.option.collectonly or session.config.pluginmanager.has_plugin("dsession"):
        return  # nothing to run here, or pytest-xdist's controller
    from tests.servers import shared_prefect_api

    if worker is not None:
        names = {name for item in session.items for name in getattr(item, "fixturenames", ())}
        builders = [build for name, build in MODEL_FIXTURES.items() if name in names]
        if builders:
            builders[int(worker.removeprefix("gw")) % len(builders)]()
    shared_prefect_api()


def _merged(base: dict, extra: dict) -> dict:
    """`base` with `extra` merged in, nested dicts key by key (None removes a key)."""
    out = dict(base)
    for key, value in extra.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def demo_profile(assets, name: str, recipes: list[dict], **sections) -> dict:
    """A run profile on a demo build (its model, LoRA adapter, calibration and evaluation texts).

    The defaults are the cheap settings the end-to-end tests share (8 x 128 calibration tokens, 2048 evaluation
    tokens in windows of 256, no generation-speed measurement), so runs with them reuse `warm_store`'s shared
    steps; `sections` are merged in key by key (`adapter=None` drops the adapter, `evaluation={"gates": ...}`).
    """
    profile = {
        "name": name,
        "model": {"path": str(assets.model_dir)},
        "adapter": {"path": str(assets.adapter_dir)},
        "calibration": {"source": {"path": str(assets.calib_path)}, "num_samples": 8, "seq_len": 128},
        "recipes": recipes,
        "evaluation": {"source": {"path": str(assets.eval_path)}, "max_tokens": 2048, "window": 256, "speed": None},
        "registry": {"model_name": name},
    }
    return _merged(profile, sections)


def write_profile(path: Path, profile: dict) -> Path:
    """Write a profile dict as YAML to `path` (a folder: `<name>.yaml` in it); returns the file."""
    import yaml

    if path.is_dir():
        path = path / f"{profile['name']}.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


@pytest.fixture(scope="session")
def make_profile(demo_assets):
    """Profile factory on the demo Llama: make_profile(name, recipes, **sections) -> dict (see demo_profile)."""
    return lambda name, recipes, **sections: demo_profile(demo_assets, name, recipes, **sections)


def made_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, a folder that `build(folder)` fills, made by the first process that asks (in a temporary folder
    beside it, renamed into place) while the others wait on a file lock; later calls find it made."""
    from quantmill.locks import file_lock

    with file_lock(target.with_name(target.name + ".lock")):
        if not target.is_dir():
            folder = Path(tempfile.mkdtemp(prefix=target.name + "-", dir=target.parent))
            build(folder)
            folder.rename(target)
    return target


WARM_STEPS = ("merge", "calibrate", "eval-data", "evaluate")


@pytest.fixture(scope="session")
def warm_store(demo_assets, tmp_path_factory):
    """The shared steps of `demo_profile`'s default settings (merge, calibration, evaluation windows, baseline),
    computed once per session; `warm_store(root)` copies them into a store root.

    A run on a seeded store still runs every step (Prefect's records are per state folder, so its states are
    those of a first run), but the store hands the merge, calibration and baseline back instead of rebuilding
    them. Tests of those steps themselves, of caching or of a first run's console use an empty store.

    Under pytest-xdist the first worker that needs it computes it and the others copy it (its modules start first,
    on different workers: computing it on each cost ≈ 20 s of CPU per worker, measured 2026-12-02).
    """
    from quantmill.flows.pipeline import prepare
    from quantmill.profile_io import parse_profile

    def build(root: Path) -> None:
        profile = parse_profile(demo_profile(demo_assets, "warm-store", [{"method": "rtn", "bits": 8, "group_size": 64}],
                                             storage={"root": str(root)}))
        prepare(profile)  # the quantize flow's shared steps, as tasks in this process

    base = tmp_path_factory.getbasetemp()
    template = made_once((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "warm-store", build)
    objects = sorted(p for p in (template / "objects").iterdir() if p.name.rsplit("-", 1)[0] in WARM_STEPS)
    assert [p.name.rsplit("-", 1)[0] for p in objects].count("evaluate") == 1, objects  # the baseline alone

    def seed(root: Path) -> Path:
        for obj in objects:
            shutil.copytree(obj, root / "objects" / obj.name)
        return root

    return seed


# `quantmill demo` with the demo's own recipes plus GPTQ (the method whose library prints the most).
DEMO_RECIPES = ("recipes=[{method: rtn, bits: 8, group_size: 64}, {method: bnb-int8}, {method: bnb-nf4}, "
                "{method: dynamic-int8}, {method: gptq, bits: 4, group_size: 64}]")


@dataclass(frozen=True)
class DemoRun:
    """One `quantmill demo` process: its state folder, working directory, environment and output."""

    home: Path
    cwd: Path
    env: dict[str, str]
    out: subprocess.CompletedProcess


def demo_cli(home: Path, cwd: Path, *args: str) -> DemoRun:
    """`quantmill demo ARGS` in a fresh process (the demo model from the test model cache)."""
    # the demo as users run it, but with GPTQModel's dequantizer eager (pytest_configure: what its compile costs)
    env = subprocess_env(home, QUANTMILL_DEMO_ROOT=str(model_cache()))
    out = subprocess.run([sys.executable, "-m", "quantmill.flows.cli", "demo", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=1500)
    return DemoRun(home, cwd, env, out)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_assets) -> DemoRun:
    """The first `quantmill demo` (+ GPTQ) a user runs: an empty working directory, a fresh state folder elsewhere.
    Shared by the console tests and the pipeline's end-to-end test (one cold run, each checks its part)."""
    return demo_cli(tmp_path_factory.mktemp("demo-home"), tmp_path_factory.mktemp("demo-cwd"), "--set", DEMO_RECIPES)


@pytest.fixture(scope="session")
def demo_rerun(demo_run) -> DemoRun:
    """The same demo again, verbose (-v), in the same folders: every step comes from the cache."""
    return demo_cli(demo_run.home, demo_run.cwd, "-v", "--set", DEMO_RECIPES)


@pytest.fixture(scope="module")
def prefect_ready():
    """Start Prefect (server, logging) outside capsys, so its handlers keep a live stream (CLI tests that read
    stderr with capsys: `pytestmark = pytest.mark.usefixtures("prefect_ready")`)."""
    from prefect import flow

    flow(lambda: None, name="warm-up")()


@pytest.fixture(scope="session")
def bf16_model(demo_assets, tmp_path_factory) -> Path:
    """A bf16 copy of the demo Llama (config.json says bfloat16), with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bf16") / "model"
    AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.bfloat16).save_pretrained(out)
    for f in demo_assets.model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, out / f.name)
    return out
