"""A registered version as an MLflow model: the checkpoint files as they are, plus MLmodel and what loads them.

Layout of every version (all files world-readable, no machine path in any of them):

    <checkpoint files>            hard links to the artifact store's files where the filesystem allows
    config.json, *.json           rewritten only where they named a local path (`_name_or_path` -> base label)
    README.md                     the model card
    MLmodel                       flavors `python_function` (code/quantmill_pyfunc.py) and `transformers`
    code/quantmill_pyfunc.py      prompts in, completions out (torch + transformers only)
    components/tokenizer/         the tokenizer files again (links), where MLflow's transformers flavor reads them
    requirements.txt, python_env.yaml, conda.yaml, input_example.json, serving_input_example.json

A version's identity is `serving_digest`: the weights, quantization config and tokenizer, with the JSON keys
that name where a model was loaded from left out, so moving the store or the adapter keeps the version.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from quantmill.hashing import manifest_digest, sha256_file, stable_hash
from quantmill.methods import fact_table
from quantmill.models import TOKENIZER_FILES

PYFUNC_MODULE = "quantmill_pyfunc"
LAYOUT = "2"  # tag `quantmill.layout`; versions without it were written as bare checkpoint folders
INPUT_EXAMPLE = ["def main"]
# Top-level names that are packaging, not serving bytes (the store's manifest included).
PACKAGING = frozenset({
    "README.md", "MLmodel", "quantmill.json", "code", "components", "requirements.txt", "python_env.yaml",
    "conda.yaml", "input_example.json", "serving_input_example.json", "registered_model_meta", ".manifest.json",
})
# JSON keys that record where a model was loaded from: replaced by the base label when published, ignored by identity.
NAME_KEYS = frozenset({"_name_or_path", "name_or_path", "model_name_or_path", "base_model_name_or_path"})
BASE_REQUIREMENTS = ("mlflow", "torch", "transformers", "safetensors", "accelerate", "pandas")
# What a method's checkpoint needs at load time, besides BASE_REQUIREMENTS.
METHOD_REQUIREMENTS: dict[str, tuple[str, ...]] = fact_table("requirements")  # registered with each method
# Methods whose checkpoints MLflow's transformers flavor cannot load, with MLflow's reason (README lists them).
TRANSFORMERS_FLAVOR_REJECTS: dict[str, str] = {
    "gguf": "mlflow.transformers loads `from_pretrained(<model folder>)` with no `gguf_file` argument, and a GGUF "
            "export has no config.json or safetensors there (transformers: 'does not appear to have a file named "
            "config.json')",
}


def scrub(value: Any, label: str) -> Any:
    """A JSON value with every NAME_KEYS entry set to `label` (nested dicts and lists included)."""
    if isinstance(value, dict):
        return {k: (label if k in NAME_KEYS and isinstance(v, str) else scrub(v, label)) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, label) for v in value]
    return value


def _names_dropped(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _names_dropped(v) for k, v in value.items() if k not in NAME_KEYS}
    if isinstance(value, list):
        return [_names_dropped(v) for v in value]
    return value


def _file_digest(path: Path) -> str:
    """sha256 of a file; for a JSON file, of its content without NAME_KEYS (location-independent)."""
    if path.suffix == ".json" and path.stat().st_size < (16 << 20):
        try:
            return stable_hash(_names_dropped(json.loads(path.read_text())))
        except (ValueError, UnicodeDecodeError):
            pass
    return sha256_file(path)


def serving_files(root: Path) -> list[Path]:
    """The files that make up what a server loads (weights, configs, tokenizer), sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] not in PACKAGING)


def serving_digest(root: Path) -> str:
    """Identity of a checkpoint folder (or a downloaded version): its serving files' contents.

    Binary files' hashes come from the store's manifest when the folder has one (verified on every cache hit).
    """
    root = Path(root)
    try:
        known = json.loads((root / ".manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        known = {}
    out = {}
    for p in serving_files(root):
        rel = p.relative_to(root).as_posix()
        cached = known.get(rel, {}).get("sha256") if p.suffix != ".json" else None
        out[rel] = {"sha256": cached or _file_digest(p)}
    return manifest_digest(out)


def public_label(source: str) -> str:
    """A base model's name without a machine path: the hub id, or a local folder's last one or two parts."""
    if "@" in source and not source.startswith(("/", ".")):
        return source.split("@", 1)[0]
    if not source.startswith(("/", ".", "~")):
        return source
    parts = Path(source).parts
    last = parts[-1] if parts else "model"
    return f"{parts[-2]}/{last}" if last in {"model", "merged", "base"} and len(parts) > 1 else last


def pinned(packages: tuple[str, ...]) -> list[str]:
    """`name==version` for each installed package (the versions that wrote the checkpoint)."""
    out = []
    for name in packages:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            raise ValueError(f"{name}: not installed here, so its version cannot be recorded; install it") from None
    return out


def requirements(method: str) -> list[str]:
    """Pinned pip requirements to load a method's checkpoint."""
    if method not in METHOD_REQUIREMENTS:
        raise ValueError(f"method {method!r}: no loader requirements recorded; add it to METHOD_REQUIREMENTS")
    return pinned(BASE_REQUIREMENTS + METHOD_REQUIREMENTS[method])


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (one copy on disk) where the filesystem allows, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def world_readable(root: Path) -> None:
    """Add read (and, for folders, search) permission for everyone to every file and folder below root."""
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        extra = 0o555 if p.is_dir() else 0o444
        if mode & extra != extra:
            os.chmod(p, mode | extra)


def _stage_checkpoint(src: Path, dest: Path, label: str) -> None:
    """Checkpoint files into dest: JSON files naming a path rewritten, everything else linked."""
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if not f.is_file() or rel.parts[0] in PACKAGING:
            continue
        target = dest / rel
        if f.suffix == ".json" and f.stat().st_size < (16 << 20):
            data = json.loads(f.read_text())
            public = scrub(data, label)
            if public != data:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(public, indent=2, sort_keys=True) + "\n")
                continue
        link_or_copy(f, target)


def tokenizer_class(root: Path) -> str:
    """The tokenizer class transformers will build for this folder."""
    from transformers import AutoTokenizer

    return type(AutoTokenizer.from_pretrained(root)).__name__


def _write_mlmodel(dest: Path, *, method: str, label: str, run_id: str, model_id: str) -> None:
    """MLmodel (pyfunc + transformers flavors, signature, input example) and the environment files."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.models import Model, infer_signature
    from mlflow.models.utils import _save_example
    from mlflow.utils.environment import _mlflow_conda_env, _PythonEnv

    reqs = requirements(method)
    (dest / "requirements.txt").write_text("\n".join(reqs) + "\n")
    _PythonEnv(dependencies=["-r requirements.txt"]).to_yaml(str(dest / "python_env.yaml"))
    _mlflow_conda_env(str(dest / "conda.yaml"), additional_pip_deps=reqs, install_mlflow=False)
    code = dest / "code"
    code.mkdir()
    shutil.copyfile(Path(__file__).with_name("pyfunc_model.py"), code / f"{PYFUNC_MODULE}.py")
    for name in TOKENIZER_FILES:
        if (dest / name).is_file():
            link_or_copy(dest / name, dest / "components" / "tokenizer" / name)
    model = Model(artifact_path="", run_id=run_id, model_id=model_id)
    mlflow.pyfunc.add_to_model(model, loader_module=PYFUNC_MODULE, code="code", conda_env="conda.yaml",
                               python_env="python_env.yaml")
    if method not in TRANSFORMERS_FLAVOR_REJECTS:
        import transformers

        config = json.loads((dest / "config.json").read_text())
        model.add_flavor(
            "transformers", task="text-generation", instance_type="TextGenerationPipeline",
            pipeline_model_type=config["architectures"][0], source_model_name=label, model_binary=".",
            components=["tokenizer"], tokenizer_type=tokenizer_class(dest), tokenizer_name=label,
            transformers_version=transformers.__version__, framework="pt",
        )
    model.signature = infer_signature(INPUT_EXAMPLE, ["completion"], params={"max_new_tokens": 32})
    _save_example(model, INPUT_EXAMPLE, str(dest))
    model.save(str(dest / "MLmodel"))


def stage_version(  # noqa: PLR0913 - keyword-only: what a version's folder holds
    ckpt_dir: Path, dest: Path, *, method: str, label: str, card: str, sidecar: dict[str, Any], run_id: str,
    model_id: str,
) -> Path:
    """Build a version's folder in dest (an empty folder next to the store): links, card, MLmodel."""
    dest.mkdir(parents=True, exist_ok=True)
    _stage_checkpoint(Path(ckpt_dir), dest, label)
    (dest / "quantmill.json").write_text(json.dumps(sidecar, indent=2, sort_keys=True, default=str) + "\n")
    (dest / "README.md").write_text(card)
    _write_mlmodel(dest, method=method, label=label, run_id=run_id, model_id=model_id)
    world_readable(dest)
    return dest


def local_path(uri: str) -> Path | None:
    """The folder a file:// (or plain path) artifact location names; None for remote stores."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and uri.startswith("/"):
        return Path(uri)
    return None


def publish(client: Any, model_id: str, artifact_location: str, staged: Path) -> str:
    """Put the staged folder into the logged model's artifacts: linked on a local store, uploaded otherwise.

    Returns "linked" (one copy on disk) or "uploaded".
    """
    target = local_path(artifact_location)
    if target is None:
        client.log_model_artifacts(model_id, str(staged))
        return "uploaded"
    for f in sorted(staged.rglob("*")):
        if f.is_file():
            dst = target / f.relative_to(staged)
            if dst.exists():  # a retry after a partial publish
                dst.unlink()
            link_or_copy(f, dst)
    world_readable(target)
    return "linked"
