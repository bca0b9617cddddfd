"""One installed name: flows/ and tasks/ install as quantmill.flows and quantmill.tasks (pyproject package-dir)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

from tests.conftest import REPO

FOLDERS = {"quantmill": "quantmill", "flows": "quantmill.flows", "tasks": "quantmill.tasks"}


def test_every_package_folder_is_listed_in_pyproject() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {package: folder for folder, package in FOLDERS.items()}
    on_disk = set()
    for folder, package in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            on_disk.add(".".join((package, *init.parent.relative_to(REPO / folder).parts)))
    assert sorted(setuptools["packages"]) == sorted(on_disk)


@pytest.mark.slow
def test_wheel_installs_one_name_and_the_cli_works(tmp_path: Path, demo_assets) -> None:
    """Build the wheel, install it into a fresh venv (dependencies borrowed from this interpreter), use the CLI."""
    src, dist = tmp_path / "src", tmp_path / "dist"  # built from a copy: setuptools writes build/ beside the sources
    for folder in FOLDERS:
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(src)],
                   check=True, timeout=600)
    (wheel,) = dist.glob("quantmill-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        top = {name.split("/")[0] for name in zf.namelist()}
    assert top == {"quantmill", wheel.name.removesuffix("-py3-none-any.whl") + ".dist-info"}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)],
                   check=True, timeout=600)
    # Dependencies: this interpreter's site-packages, appended after the venv's own (added only now, so pip above
    # saw no other quantmill). A .pth does not run the .pth files of the folders it adds: no editable finder leaks in.
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    borrowed = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    borrowed.append(sysconfig.get_paths()["purelib"])
    Path(site, "zz_borrowed.pth").write_text("\n".join(dict.fromkeys(borrowed)) + "\n")

    env = {**os.environ, "PYTHONPATH": "", "QUANTMILL_DEMO": str(demo_assets.root)}
    probe = ("import importlib.util as u, quantmill, quantmill.flows.cli, quantmill.flows.pipeline, quantmill.flows.sweep; "
             "print(u.find_spec('tasks'), u.find_spec('flows'), quantmill.__file__)")
    out = subprocess.run([str(python), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    no_tasks, no_flows, where = out.stdout.split()
    assert (no_tasks, no_flows) == ("None", "None")
    assert where.startswith(site), where

    # The wheel's declared ranges (pyproject, as setuptools wrote them) hold for the tested set it runs on.
    ranges = ("from importlib.metadata import requires, version; from packaging.requirements import Requirement; "
              "reqs = [Requirement(r) for r in requires('quantmill')]; "
              "print([str(r) for r in reqs if (r.marker is None or r.marker.evaluate({'extra': ''})) "
              "and not r.specifier.contains(version(r.name), prereleases=True)])")
    unmet = subprocess.run([str(python), "-c", ranges], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert unmet.returncode == 0 and unmet.stdout == "[]\n", (unmet.stdout, unmet.stderr)

    cli = venv / "bin" / "quantmill"
    helped = subprocess.run([str(cli), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0, helped.stderr
    assert "validate" in helped.stdout
    valid = subprocess.run([str(cli), "validate", str(REPO / "profiles" / "demo.yaml")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert valid.returncode == 0, valid.stderr
    assert valid.stdout == f"{REPO / 'profiles' / 'demo.yaml'}: ok (4 recipes: rtn-w8g64, bnb-int8, bnb-nf4, dynamic-int8)\n"
