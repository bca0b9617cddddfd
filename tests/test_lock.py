"""pyproject's ranges and the lock files agree; the lock is the CPU set, hash-pinned, and what this interpreter runs."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

LOCK, AUTOAWQ = REPO / "requirements" / "lock.txt", REPO / "requirements" / "autoawq.txt"
LOCKED_EXTRAS = ("dev", "autoround", "dask")  # what requirements/lock.txt is compiled with (README: Versions)
UNSAFE = {"pip", "setuptools"}  # pinned for the build of quantmill itself; a layered dev venv may have its own


def pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, [sha256 hashes])} of a pip-compile'd requirements file."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
        assert m, f"{path.name}: not an exact pin with hashes: {line!r}"
        out[canonicalize_name(m[1])] = (m[2], re.findall(r"sha256:([0-9a-f]{64})", m[3]))
    return out


def direct(extras: tuple[str, ...]) -> list[Requirement]:
    """pyproject's dependencies plus those of `extras`, whose markers hold on this interpreter."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in extras for r in project["optional-dependencies"][extra]]
    env = default_environment()
    return [r for r in reqs if r.marker is None or r.marker.evaluate({**env, "extra": ""})]


def test_every_direct_dependency_is_locked_within_its_range() -> None:
    locked = pins(LOCK)
    for req in direct(LOCKED_EXTRAS):
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is in pyproject.toml but not in the lock: regenerate it (README: Versions)"
        assert req.specifier.contains(locked[name][0], prereleases=True), (req, locked[name][0])
    (awq,) = [Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
              ["optional-dependencies"]["awq"]]
    version, hashes = pins(AUTOAWQ)["autoawq"]
    assert awq.specifier.contains(version) and len(hashes) == 1


def test_lock_is_the_cpu_set_every_package_hashed() -> None:
    locked = pins(LOCK)
    assert locked["torch"] == ("2.13.0+cpu", ["6746dbcbeb526eb61330b76b41ff1b4eb848951103a892eeb080dfa2b264667b"])
    gpu_only = sorted(n for n in locked if n.startswith(("nvidia-", "cuda-")) or n in {"triton", "autoawq"})
    assert gpu_only == []
    assert sorted(n for n, (_, hashes) in locked.items() if not hashes) == []
    bootstrap = (REPO / "scripts" / "bootstrap.sh").read_text()
    stamp = next(line for line in bootstrap.splitlines() if line.startswith("want="))
    assert "requirements/lock.txt" in stamp and "requirements/autoawq.txt" in stamp  # a new lock reinstalls


def test_this_interpreter_runs_the_locked_set() -> None:
    """The tests run on what was locked (bootstrap installs the lock): no package drifted from its pin."""
    drifted = {}
    for name, (version, _) in pins(LOCK).items():
        if name in UNSAFE:
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            drifted[name] = (version, installed)
    assert drifted == {}, f"installed packages differ from requirements/lock.txt (locked, installed): {drifted}"
