"""Integrity at the boundary and no orphans: damaged safetensors files are named, exact reads, a full disk
mid-step leaves nothing half-written, the watchdog stops the temporary server, dead runs are closed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantmill.errors import QuantmillError
from quantmill.integrity import check_safetensors
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    return tiny_assets


def _cut(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)


def test_header_check_names_truncated_and_padded_files(tmp_path, tiny):
    import shutil

    f = tmp_path / "model.safetensors"
    shutil.copy(tiny.model_dir / "model.safetensors", f)
    check_safetensors(f, "model.path")  # intact
    size = f.stat().st_size
    with open(f, "ab") as fh:
        fh.write(b"\0" * 16)
    with pytest.raises(QuantmillError, match="trailing bytes") as err:
        check_safetensors(f, "model.path")
    assert str(f) in str(err.value) and str(err.value).startswith("model.path: ")
    _cut(f, size // 2)
    with pytest.raises(QuantmillError, match="truncated"):
        check_safetensors(f, "model.path")
    _cut(f, 5)
    with pytest.raises(QuantmillError, match="shorter than a safetensors header"):
        check_safetensors(f, "model.path")


@pytest.mark.parametrize("strategy", ["streaming", "cpu"])
def test_merge_read_names_a_file_that_ends_early(tmp_path, tiny, strategy):
    """Below the download check: the merge's own reads check every byte count (readinto's return was ignored)."""
    import shutil

    from quantmill.merging import merge_lora
    from quantmill.profile import Merge

    base = tmp_path / "base"
    shutil.copytree(tiny.model_dir, base)
    weights = base / "model.safetensors"
    _cut(weights, weights.stat().st_size * 2 // 3)
    with pytest.raises(QuantmillError) as err:
        merge_lora(base, tiny.adapter_dir, tmp_path / "out", Merge(strategy=strategy))
    assert str(weights) in str(err.value) and "short" in str(err.value)


WRITERS = {
    "python": "(d / 'w.bin').write_bytes(b'x' * (4 << 20))",
    "safetensors": "__import__('safetensors.torch').torch.save_file({'w': __import__('torch').zeros(1 << 20)}, str(d / 'w.safetensors'))",
    "torch": "__import__('torch').save(__import__('torch').zeros(1 << 20), str(d / 'w.pt'))",
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_full_disk_mid_step_names_step_and_folder(tmp_path, writer):
    """A real full filesystem (a 1 MiB tmpfs), whatever library writes: one line naming the step and folder;
    nothing kept in the store."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -m` and mount (root or user namespaces) for a tiny tmpfs")
    root = tmp_path / "mnt"
    root.mkdir()
    code = (
        "import sys\n"
        "from quantmill.store import ArtifactStore\n"
        "from quantmill.errors import QuantmillError\n"
        "store = ArtifactStore(sys.argv[1])\n"
        "try:\n"
        f"    store.get_or_build('merge-0123456789abcdef01234567', lambda d: {WRITERS[writer]} and {{}})\n"
        "except QuantmillError as exc:\n"
        "    print(exc)\n"
        "import os\n"
        "print(sorted(os.listdir(store.root / 'objects')), sorted(os.listdir(store.root / 'tmp')))\n"
    )
    proc = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$@"', str(root),
                           sys.executable, "-c", code, str(root)], cwd=REPO, capture_output=True, text=True, timeout=120)
    line, listing = proc.stdout.strip().splitlines()[-2:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert line.startswith("storage.root: step merge could not write") and str(root) in line and "No space left" in line
    assert listing == "[] []"


def test_watchdog_stops_the_server_when_its_parent_is_killed():
    """The parent (a stand-in for `quantmill run`) dies by SIGKILL: the watchdog stops its server within seconds."""
    from quantmill import state

    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time\n"
         "server = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
         f"subprocess.Popen([sys.executable, '-c', {state.WATCHDOG!r}, str(__import__('os').getpid()), str(server.pid)])\n"
         "print(server.pid, flush=True)\n"
         "time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    server = int(parent.stdout.readline())
    time.sleep(1.0)
    assert state.pid_alive(server)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(10)
    deadline = time.time() + 10
    while state.pid_alive(server) and time.time() < deadline:
        time.sleep(0.1)
    assert not state.pid_alive(server)


def test_scratch_of_dead_processes_is_swept(tmp_path, monkeypatch):
    from quantmill import state

    monkeypatch.setenv("QUANTMILL_HOME", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    (state.scratch_root() / str(dead.pid) / "gptqmodel-offload").mkdir(parents=True)
    (state.scratch_root() / str(os.getppid())).mkdir()
    assert state.sweep_scratch() == [state.scratch_root() / str(dead.pid)]
    assert sorted(p.name for p in state.scratch_root().iterdir()) == [str(os.getppid())]


def test_dead_run_is_closed_by_the_next(tmp_path):
    """A marker left by a killed process: its MLflow run ends KILLED, its Prefect flow run Crashed."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from quantmill import tracking
    from quantmill.tasks import track

    @flow(name="victim")
    def victim() -> None:
        pass

    client = tracking.client()
    run = client.create_run(tracking.experiment_id("dead-run-test"))
    with get_client(sync_client=True) as prefect:
        fr = prefect.create_flow_run(victim, state=Running())
        dead = subprocess.Popen(["true"])
        dead.wait()
        track.markers().mkdir(parents=True, exist_ok=True)
        (track.markers() / f"{run.info.run_id}.json").write_text(json.dumps(
            {"run_id": run.info.run_id, "pid": dead.pid, "host": os.uname().nodename, "flow_run_id": str(fr.id)}))
        assert run.info.run_id in track.recover_dead_runs()
        assert prefect.read_flow_run(fr.id).state.type.value == "CRASHED"
    closed = client.get_run(run.info.run_id)
    assert closed.info.status == "KILLED" and "died" in closed.data.tags["quantmill.error"]
    assert not (track.markers() / f"{run.info.run_id}.json").exists()


@pytest.mark.slow
def test_gptq_logs_its_name_and_offloads_under_the_state_folder(tmp_path, demo_assets, monkeypatch):
    """`gptq: quantizing …` (not `METHOD.GPTQ`), and GPTQModel's offload folder lives in this process's scratch."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    from quantmill import state
    from quantmill.methods.registry import QuantizeJob, build_config
    from quantmill.quantize.gptq import quantize_gptq

    monkeypatch.setenv("QUANTMILL_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    monkeypatch.setenv("TMPDIR", os.environ.get("TMPDIR", ""))
    scratch = state.private_scratch()
    calib = tmp_path / "calib.safetensors"
    save_file({"input_ids": torch.randint(0, 500, (4, 64))}, str(calib))
    seen: list[str] = []
    offload: list[str] = []
    import gptqmodel.quantization.config as gptq_config

    original = gptq_config._create_temp_offload_dir

    def spy():
        folder = original()
        offload.append(folder.name)
        return folder

    monkeypatch.setattr(gptq_config, "_create_temp_offload_dir", spy)
    job = QuantizeJob(Path(demo_assets.model_dir), tmp_path / "out", calib, "cpu", progress=seen.append)
    quantize_gptq(build_config("gptq", {"bits": 4, "group_size": 64}), job)
    assert seen[0].startswith("gptq: quantizing with 4 calibration samples"), seen
    assert not any("METHOD." in line for line in seen)
    assert offload and all(p.startswith(f"{scratch}/gptqmodel_") for p in offload), offload


def test_every_tokenizer_file_the_check_accepts_is_downloaded_and_copied(tmp_path):
    """The tokenizer check's files are among those download and merge take and quantize copies beside a checkpoint."""
    from quantmill.integrity import TOKENIZER_SETS
    from quantmill.models import META_PATTERNS, SIDE_FILES
    from quantmill.quantize.common import copy_tokenizer

    assert {name for files in TOKENIZER_SETS for name in files} <= set(SIDE_FILES)
    assert set(META_PATTERNS) == {"config.json", *SIDE_FILES}
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for name in (*META_PATTERNS, "model.safetensors", "README.md"):
        (src / name).write_text(name)
    copy_tokenizer(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == sorted(SIDE_FILES)
