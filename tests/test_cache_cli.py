"""`quantmill cache ls|du|prune`, `run --refresh/--no-cache` and `storage.keep` on a real store.

The tests of this module share one state folder and run in file order (each builds on the store the
previous one left); the store is read with plain json/os, the registry with MLflow's own client.
"""

from __future__ import annotations

import fcntl
import json
import re
import subprocess
from pathlib import Path

import pytest

from quantmill.cachectl import human_size, parse_age
from quantmill.errors import QuantmillError
from tests import fresh
from tests.conftest import demo_profile, write_profile
from tests.servers import served_env

MODEL_NAME = "cache-cli-test"


def test_parse_age():
    assert parse_age("7d") == 7 * 86400 and parse_age("12h") == 43200 and parse_age("30m") == 1800
    with pytest.raises(QuantmillError, match="--older-than '7 days'"):
        parse_age("7 days")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_assets, warm_store):
    """A state folder, a profile (one variant fails its gate, so it is never registered) and its first run (its store
    seeded with the shared steps, which it lists, prunes and refreshes like any it computed)."""
    home, cwd = tmp_path_factory.mktemp("cache-home"), tmp_path_factory.mktemp("cache-cwd")
    warm_store(home / "artifacts")
    profile = demo_profile(
        demo_assets, "cache-test",
        [{"method": "rtn", "bits": 8, "group_size": 64}, {"method": "gptq", "bits": 4, "group_size": 64},
         {"method": "dynamic-int8"}],
        evaluation={"method_gates": {"rtn-w8g64": {"min_compression": 100}}}, registry={"model_name": MODEL_NAME})
    path = write_profile(home / "profile.yaml", profile)
    out = cli(home, cwd, "run", str(path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return home, cwd, path


def cli(home: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return fresh.run_cli(*args, cwd=cwd, env=served_env(home), timeout=1200)  # a new process (tests/fresh.py)


def cache(home: Path, monkeypatch, capsys, *args: str) -> str:
    """`quantmill cache ...` on this module's state folder (in-process: these commands start no run)."""
    from quantmill.flows.cli import main

    monkeypatch.setenv("QUANTMILL_HOME", str(home))
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(home / "prefect" / "results"))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # exported by earlier in-process MLflow use
        monkeypatch.delenv(var, raising=False)
    capsys.readouterr()
    assert main(["cache", *args]) == 0
    return capsys.readouterr().out


def manifests(home: Path) -> dict[str, dict]:
    """key -> manifest of every artifact in the store, read from disk."""
    objects = home / "artifacts" / "objects"
    return {d.name: json.loads((d / ".manifest.json").read_text()) for d in objects.iterdir()}


def step(key: str) -> str:
    return key.rsplit("-", 1)[0]


def variant_key(home: Path, name: str) -> str:
    """The quantize artifact of one variant (its lineage sidecar names it)."""
    objects = home / "artifacts" / "objects"
    found = [k for k in manifests(home) if step(k) == "quantize"
             and json.loads((objects / k / "quantmill.json").read_text())["name"] == name]
    assert len(found) == 1, found
    return found[0]


def recomputed(before: dict[str, dict], after: dict[str, dict]) -> set[str]:
    """Keys built (again) between two snapshots."""
    return {k for k, m in after.items() if k not in before or before[k]["created"] != m["created"]}


def registered_digests(home: Path) -> dict[str, dict[str, str]]:
    import mlflow

    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    return {mv.version: mv.tags for mv in client.search_model_versions(f"name='{MODEL_NAME}'")}


@pytest.mark.slow
def test_ls_and_du(setup, monkeypatch, capsys):
    home, cwd, _ = setup
    found = manifests(home)
    assert sorted({step(k) for k in found}) == ["calibrate", "eval-data", "evaluate", "merge", "quantize"]
    out = cache(home, monkeypatch, capsys, "ls")
    lines = {ln.split()[1]: ln.split() for ln in out.splitlines()[1:-1]}
    assert set(lines) == set(found)
    assert lines[variant_key(home, "gptq-w4g64")][-1] == "registered"
    assert lines[variant_key(home, "rtn-w8g64")][-1] == "run"  # failed its gate: only the run refers to it
    for key, row in lines.items():
        assert row[0] == step(key)
    total = sum(f.stat().st_size for f in (home / "artifacts" / "objects").rglob("*")
                if f.is_file() and f.name != ".manifest.json")
    assert f"{len(found)} artifact(s), {human_size(total)}" in out
    du = cache(home, monkeypatch, capsys, "du")
    assert f"total {human_size(total)} in {len(found)} artifact(s)" in du, du


@pytest.mark.slow
def test_prune_dry_run_and_filters_remove_nothing(setup, monkeypatch, capsys):
    home, cwd, _ = setup
    before = manifests(home)
    dry = cache(home, monkeypatch, capsys, "prune", "--keep", "registered", "--dry-run")
    assert variant_key(home, "rtn-w8g64") in dry and "would remove 2 artifact(s)" in dry, dry
    runs = cache(home, monkeypatch, capsys, "prune", "--keep", "runs", "--dry-run")
    assert "would remove 0 artifact(s)" in runs, runs
    young = cache(home, monkeypatch, capsys, "prune", "--keep", "none", "--older-than", "7d", "--dry-run")
    assert "would remove 0 artifact(s)" in young, young
    assert manifests(home) == before


@pytest.mark.slow
def test_prune_keeps_registered_and_a_rerun_recomputes_only_the_pruned(setup, monkeypatch, capsys):
    home, cwd, profile = setup
    before = manifests(home)
    rtn = variant_key(home, "rtn-w8g64")
    out = cache(home, monkeypatch, capsys, "prune", "--keep", "registered")
    after = manifests(home)
    pruned = set(before) - set(after)
    assert rtn in pruned and sorted(step(k) for k in pruned) == ["evaluate", "quantize"], pruned
    freed = sum(sum(f["size"] for f in before[k]["files"].values()) for k in pruned)
    assert f"removed 2 artifact(s), freed {human_size(freed)}" in out, out
    digests = {m["digest"] for m in after.values()}
    versions = registered_digests(home)
    assert len(versions) == 2  # gptq and dynamic-int8
    for tags in versions.values():
        for tag in ("checkpoint_store_sha256", "calibration_digest", "eval_digest", "merged_sha256"):
            if tag == "calibration_digest" and tags["method"] == "dynamic-int8":
                assert tags[tag] == ""  # a method without calibration names none
                continue
            assert tags[tag] in digests, tag
    assert not any((home / "prefect" / "results" / k).exists() for k in pruned)
    rerun = cli(home, cwd, "run", str(profile))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert recomputed(after, manifests(home)) == pruned


@pytest.mark.slow
def test_refresh_calibrate_recomputes_calibrated_chains_only(setup, capsys):
    home, cwd, profile = setup
    before = manifests(home)
    out = cli(home, cwd, "run", str(profile), "--refresh", "calibrate")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    changed = recomputed(before, manifests(home))
    assert sorted(step(k) for k in changed) == ["calibrate", "evaluate", "quantize"], changed
    assert variant_key(home, "gptq-w4g64") in changed
    assert re.search(r"calibrate\s+done", out.stdout) and re.search(r"merge\s+cached", out.stdout), out.stdout
    from quantmill.flows.cli import main

    capsys.readouterr()
    assert main(["run", str(profile), "--refresh", "calibration"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --refresh 'calibration': unknown step")
    assert manifests(home).keys() == before.keys() | changed


@pytest.mark.slow
def test_storage_keep_registered_drops_unregistered_checkpoints(setup):
    home, cwd, profile = setup
    rtn = variant_key(home, "rtn-w8g64")
    keep = cli(home, cwd, "run", str(profile), "--set", "storage.keep=registered")
    assert keep.returncode == 0, keep.stdout[-3000:] + keep.stderr[-3000:]
    now = manifests(home)
    assert rtn not in now
    assert variant_key(home, "gptq-w4g64") in now and variant_key(home, "dynamic-int8") in now
    assert f"storage.keep=registered: removed 1 unregistered checkpoint(s) ({rtn})" in keep.stdout, keep.stdout


@pytest.mark.slow
def test_prune_never_removes_what_a_run_holds(setup, monkeypatch, capsys):
    home, cwd, _ = setup
    held = next(k for k in manifests(home) if step(k) == "merge")
    with open(home / "artifacts" / "locks" / f"{held}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # what a run building this artifact holds
        out = cache(home, monkeypatch, capsys, "prune", "--keep", "none")
    assert set(manifests(home)) == {held}
    assert f"in use by a running run, left: {held}" in out, out
    assert not any(cwd.iterdir())


def test_refresh_propagates_to_consumers_only(monkeypatch):
    from quantmill import refresh
    from quantmill.refs import CalibRef

    monkeypatch.setenv(refresh.ENV, "calibrate")
    monkeypatch.delenv(refresh.RUN_ENV, raising=False)
    monkeypatch.setattr(refresh, "_rebuilt", set())
    monkeypatch.setattr(refresh, "_forced", set())
    assert refresh.should_force("calibrate", "calibrate-k1", {"model": None})
    assert refresh.take("calibrate-k1")
    refresh.rebuilt("calibrate-k1")
    assert not refresh.should_force("calibrate", "calibrate-k1", {})  # once per run
    calib = CalibRef(path="x", digest="d", num_samples=1, seq_len=1, seed=0, source="s", store_key="calibrate-k1")
    assert refresh.should_force("quantize", "quantize-gptq", {"calib": calib})
    assert not refresh.should_force("quantize", "quantize-rtn", {"calib": None})
    assert not refresh.should_force("register", "register-x", {"calib": calib})  # not a stored step
    with pytest.raises(QuantmillError, match="unknown step calibration; steps: download"):
        refresh.parse_steps("calibration")


def test_canonical_safetensors_header_gives_stable_bytes(tmp_path):
    """safetensors writes metadata in a per-process order; the store needs one byte image per content."""
    import struct

    import torch
    from safetensors.torch import load_file, save_file

    from quantmill.safetensors_io import canonical_safetensors

    path = tmp_path / "t.safetensors"
    save_file({"b": torch.arange(3), "a": torch.ones(2)}, str(path), metadata={"z": "1", "mode": "packed", "a": "x"})
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    shuffled = json.dumps(dict(reversed(list(header.items()))), separators=(",", ":")).encode()
    assert len(shuffled) <= size and shuffled != raw[8:8 + size].rstrip()
    path.write_bytes(raw[:8] + shuffled.ljust(size) + raw[8 + size:])
    canonical_safetensors(path)
    first = path.read_bytes()
    path.write_bytes(raw)
    canonical_safetensors(path)
    assert path.read_bytes() == first
    assert torch.equal(load_file(str(path))["b"], torch.arange(3))
