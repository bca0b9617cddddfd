"""Consumers' side of the registry: pull a version for serving, generate from it as a quick check."""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from quantmill import state, tracking
from quantmill.errors import QuantmillError
from quantmill.hashing import hash_tree
from quantmill.locks import file_lock
from quantmill.mlmodel import serving_digest

REF = re.compile(r"^(?P<name>[\w.-]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))?$")
SHA_TAG = tracking.SHA_TAG
LAYOUT_TAG = "quantmill.layout"


@dataclass(frozen=True)
class Pulled:
    """A downloaded model version."""

    path: Path
    name: str
    version: str
    sha256: str


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """'NAME@ALIAS' | 'NAME/VERSION' | 'NAME' (-> @champion) into (name, alias, version)."""
    m = REF.match(ref)
    if not m:
        raise QuantmillError(f"model reference {ref!r}: use NAME@ALIAS, NAME/VERSION or NAME")
    alias = m["alias"] or (None if m["version"] else "champion")
    return m["name"], alias, m["version"]


def _version(ref: str):  # noqa: ANN202 - mlflow ModelVersion
    import mlflow

    name, alias, version = parse_ref(ref)
    client = tracking.client()
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as exc:
        raise QuantmillError(f"model reference {ref!r}: not in the registry at {state.tracking_uri()} ({exc.error_code})") from None


def content_hash(path: Path, mv) -> str:  # noqa: ANN001
    """A downloaded version's content hash, computed the way its layout defines it."""
    if mv.tags.get(LAYOUT_TAG):
        return serving_digest(path)
    return hash_tree(path, skip=["README.md"])  # versions registered before MLflow-model layout


def pull(ref: str, dest: Path) -> Pulled:
    """Download a registered version's files into dest and verify its content hash."""
    import mlflow

    mv = _version(ref)
    name = mv.name
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise QuantmillError(f"{dest}: destination is not empty; choose a new folder")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(tmp))
    expected = mv.tags.get(SHA_TAG)
    actual = content_hash(tmp, mv)
    if expected and actual != expected:
        shutil.rmtree(tmp, ignore_errors=True)
        raise QuantmillError(f"{name}/{mv.version}: downloaded files do not match the registered sha256; retry the pull")
    if dest.exists():
        dest.rmdir()
    tmp.rename(dest)
    return Pulled(dest, name, str(mv.version), actual)


def local_or_pulled(model: str) -> Path:
    """A local checkpoint folder as is, or a registry reference pulled into the state folder's cache.

    Pulled copies live in `<state folder>/pulled/<checkpoint sha256>` and are re-verified on every reuse.
    """
    if Path(model).is_dir():
        return Path(model)
    mv = _version(model)
    sha = mv.tags.get(SHA_TAG)
    if not sha:
        raise QuantmillError(f"model reference {model!r}: version {mv.version} has no {SHA_TAG} tag; pull it with "
                             "`quantmill pull` into a folder and pass the folder")
    cache = state.home() / "pulled" / sha
    cache.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(state.home() / "locks" / f"pull-{sha}.lock"):  # two generate commands share one download
        if cache.is_dir():
            if content_hash(cache, mv) == sha:
                return cache
            shutil.rmtree(cache)  # damaged or edited: fetch again
        pull(f"{mv.name}/{mv.version}", cache)
    return cache


def generate(model: str, text: str, max_new_tokens: int = 32) -> dict:
    """Greedy completion of `text` with timings (load, first token, tokens/s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantmill.methods.gguf import loader_kwargs  # a GGUF export loads through transformers' GGUF loader

    path = local_or_pulled(model)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path, **loader_kwargs(path))
    lm = AutoModelForCausalLM.from_pretrained(path, **loader_kwargs(path)).eval()
    loaded = time.perf_counter()
    inputs = tok(text, return_tensors="pt")
    with torch.no_grad():
        first = time.perf_counter()
        lm.generate(**inputs, max_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - first
        start = time.perf_counter()
        out = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        elapsed = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    return {
        "completion": tok.decode(new, skip_special_tokens=True), "new_tokens": int(new.numel()),
        "load_s": loaded - t0, "ttft_s": ttft, "tokens_per_s": new.numel() / max(elapsed, 1e-9), "path": str(path),
    }
