"""Small causal LMs trained locally on pydoc text, so quantizers can be compared on them: the cached, atomically
published build (texts in `demo_corpus`, training in `demo_training`)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from quantmill.demo_corpus import corpus_digest, demo_text_splits
from quantmill.demo_training import (
    DemoSpec,
    deterministic_torch,
    hf_progress,
    train_adapter,
    train_model,
    train_tokenizer,
    validate_spec,
)
from quantmill.locks import file_lock

CODE_VERSION = "1"


@dataclass(frozen=True)
class DemoAssets:
    """Paths of one complete demo build."""

    root: Path
    model_dir: Path
    adapter_dir: Path | None
    train_path: Path
    calib_path: Path
    eval_path: Path


def spec_hash(spec: DemoSpec) -> str:
    """Short hash identifying a spec, the code version and the corpus."""
    payload = json.dumps([dataclasses.asdict(spec), CODE_VERSION, corpus_digest()], sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def _assets(final: Path, has_adapter: bool) -> DemoAssets:
    """DemoAssets describing the build directory `final`."""
    data = final / "data"
    return DemoAssets(
        root=final, model_dir=final / "model", adapter_dir=final / "adapter" if has_adapter else None,
        train_path=data / "train.txt", calib_path=data / "calib.txt", eval_path=data / "eval.txt",
    )


def _tmp_sibling(path: Path) -> Path:
    """Unique temporary directory next to `path` (same filesystem, so renames are atomic)."""
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move `tmp` to `final`; if another builder won the race, discard `tmp`."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _build_base(arch: str, spec: DemoSpec, final: Path, with_adapter: bool, quiet: bool) -> None:
    """Build data, tokenizer, model (and adapter) in a temp dir and publish it as `final`."""
    tmp = _tmp_sibling(final)
    try:
        splits = demo_text_splits()
        (tmp / "data").mkdir()
        for name, text in splits.items():
            (tmp / "data" / f"{name}.txt").write_text(text, encoding="utf-8")
        with deterministic_torch(spec.num_threads), hf_progress(quiet):
            tokenizer = train_tokenizer(splits["train"], spec.vocab_size, spec.max_position_embeddings)
            train_model(arch, spec, tokenizer, splits["train"], tmp / "model", quiet)
            if with_adapter:
                train_adapter(tmp / "model", final / "model", spec, tmp / "adapter", quiet)
        (tmp / "DONE").write_text(json.dumps({"arch": arch, "spec": dataclasses.asdict(spec)}, indent=1))
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _add_adapter(spec: DemoSpec, final: Path, quiet: bool) -> None:
    """Train a missing adapter for an existing complete build and publish it atomically."""
    tmp = _tmp_sibling(final)
    try:
        with deterministic_torch(spec.num_threads), hf_progress(quiet):
            train_adapter(final / "model", final / "model", spec, tmp / "adapter", quiet)
        _publish(tmp / "adapter", final / "adapter")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """Undo root-logger handlers/level that training libraries install (else every log line prints twice)."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)


def build_demo_assets(
    root: Path, arch: str = "llama", with_adapter: bool = True, spec: DemoSpec | None = None, quiet: bool = False
) -> DemoAssets:
    """Return the cached demo build for (arch, spec) under `root`, training it first if needed."""
    spec = spec or DemoSpec()
    validate_spec(arch, spec)
    final = Path(root).resolve() / f"{arch}-{spec_hash(spec)}"
    if final.exists() and not (final / "DONE").exists():
        raise ValueError(f"incomplete demo build at {final} (no DONE marker); delete it and retry")
    # One builder per build: another process (a second test worker, a demo beside the tests) waits for it and
    # reuses it instead of training the same model again; other builds go on beside it.
    with file_lock(final.parent / f".{final.name}.lock"), _root_logging_kept():
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            _build_base(arch, spec, final, with_adapter, quiet)
        if with_adapter and not (final / "adapter").exists():
            _add_adapter(spec, final, quiet)
    return _assets(final, with_adapter)
