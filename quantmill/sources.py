"""Where a model or adapter comes from: a hashed local folder, or a pinned hub snapshot kept in the store (core)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from quantmill.caching import step_key
from quantmill.errors import NetworkError, QuantmillError
from quantmill.hashing import hash_tree
from quantmill.integrity import check_folder_safetensors
from quantmill.models import META_PATTERNS, WEIGHT_PATTERNS
from quantmill.profile import Source
from quantmill.store import ArtifactStore

CODE_VERSION = "1"


def fetch_snapshot(source: Source, dest: Path, allow: tuple[str, ...]) -> None:
    """snapshot_download of a pinned revision into dest; token from HF_TOKEN, never logged."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        snapshot_download(
            source.repo_id,
            revision=source.revision,
            local_dir=dest,
            allow_patterns=list(allow),
            token=os.environ.get("HF_TOKEN") or None,
        )
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise QuantmillError(
            f"repo_id {source.repo_id!r}: not found or not accessible ({type(exc).__name__}); "
            "check the name and set HF_TOKEN for private or gated repos"
        ) from None
    except RevisionNotFoundError:
        raise QuantmillError(f"revision {source.revision!r} of {source.repo_id}: not found; pin an existing commit or tag") from None
    except LocalEntryNotFoundError:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
            raise QuantmillError(
                f"repo_id {source.repo_id!r}: not in the local Hugging Face cache and the hub is unreachable "
                "(offline, HF_HUB_OFFLINE=1); go online or point model.path at a local copy"
            ) from None
        raise NetworkError(
            f"repo_id {source.repo_id!r}: the Hugging Face hub is unreachable (offline?); "
            "retry when online or use a local 'path'"
        ) from None
    shutil.rmtree(dest / ".cache", ignore_errors=True)


def _key(source: Source, field: str) -> str:
    return step_key(f"download-{field}", CODE_VERSION, {"source": source})


def resolve(source: Source, field: str, store_root: str) -> tuple[Path, str]:
    """Local folder and content hash of a source; hub repos are downloaded into the store."""
    if source.path is not None:
        path = Path(source.path).resolve()
        if not path.is_dir():
            raise QuantmillError(f"{field}.path: {path} does not exist or is not a folder; fix the path")
        check_folder_safetensors(path, f"{field}.path")  # a truncated file is named here, never hashed into a key
        return path, hash_tree(path)
    if field == "adapter":
        allow: tuple[str, ...] = ("adapter_config.json", "adapter_model.safetensors", "*.json", "*.txt")
    else:
        allow = WEIGHT_PATTERNS + META_PATTERNS + (("*.bin",) if source.allow_pickle else ())
    art = ArtifactStore(store_root).get_or_build(_key(source, field), lambda d: fetched(source, d, allow, field))
    return art.path, art.digest


def fetched(source: Source, dest: Path, allow: tuple[str, ...], field: str) -> dict:
    """A hub snapshot whose safetensors files match their headers (else nothing is committed to the store)."""
    fetch_snapshot(source, dest, allow)
    check_folder_safetensors(dest, f"{field}.repo_id {source.repo_id}")
    return {}
