"""Fault injection: a damaged file in each place a run reads (base, adapter, merged model, checkpoint).

A damaged cached artifact (merged model, checkpoint) is recomputed; a damaged source file (base, adapter) fails
the run with one line naming it. Never is a version registered from damaged bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest

from quantmill import state
from quantmill.flows.cli import main
from quantmill.hashing import sha256_file
from tests.conftest import demo_profile, write_profile

pytestmark = pytest.mark.usefixtures("prefect_ready")


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    return tiny_assets


def registry(name: str) -> list[tuple[str, str, str]]:
    uri = f"sqlite:///{state.home() / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    return sorted((mv.version, mv.tags["quantmill.checkpoint_sha256"], mv.tags["perplexity"])
                  for mv in client.search_model_versions(f"name='{name}'"))


def run(path: Path, capsys) -> tuple[int, str]:
    rc = main(["run", str(path)])
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.strip()][-1] if err.strip() else ""


def damage(f: Path, how: str) -> None:
    """Truncate a file to half, or flip bytes in the middle of its data keeping its size."""
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        if how == "truncate":
            fh.truncate(size // 2)
        else:
            fh.seek(size - 64)
            chunk = fh.read(32)
            fh.seek(size - 64)
            fh.write(bytes(b ^ 0xFF for b in chunk))


def only(store: Path, step: str) -> Path:
    (folder,) = [p for p in (store / "objects").iterdir() if p.name.startswith(f"{step}-")]
    (weights,) = sorted(folder.glob("*.safetensors"))
    return weights


@pytest.mark.slow
def test_damaged_files_recompute_or_fail_naming_them(tmp_path, tiny, capsys):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(tiny.model_dir, base)
    shutil.copytree(tiny.adapter_dir, adapter)
    store, name = tmp_path / "store", f"faults-{tmp_path.name}"[:60]
    profile = demo_profile(tiny, "faults", [{"method": "rtn", "bits": 8, "group_size": 64}],
                           model={"path": str(base)}, adapter={"path": str(adapter)},
                           calibration={"num_samples": 4, "seq_len": 64}, evaluation={"max_tokens": 1024, "window": 128},
                           registry={"model_name": name}, storage={"root": str(store)})
    path = write_profile(tmp_path / "profile.yaml", profile)
    assert run(path, capsys)[0] == 0
    versions = registry(name)
    assert len(versions) == 1
    merged, ckpt = only(store, "merge"), only(store, "quantize")
    good = {merged: sha256_file(merged), ckpt: sha256_file(ckpt)}

    for f, how in ((merged, "flip"), (ckpt, "truncate"), (merged, "truncate"), (ckpt, "flip")):
        damage(f, how)  # a cached artifact: recomputed, the same bytes again, nothing new registered
        rc, last = run(path, capsys)
        assert rc == 0, last
        assert sha256_file(f) == good[f], f"{f} ({how}) was not recomputed"
        assert registry(name) == versions

    for f, field in ((base / "model.safetensors", "model.path"), (adapter / "adapter_model.safetensors", "adapter.path")):
        kept = tmp_path / "kept"
        shutil.copy(f, kept)
        damage(f, "truncate")  # a source file: the run fails naming it
        rc, last = run(path, capsys)
        assert rc == 2, last
        assert last.startswith(f"error: {field}: {f} is damaged"), last
        assert registry(name) == versions
        shutil.copy(kept, f)
