"""The run's local inputs checked without loading anything: what `quantmill validate` runs (core floor, no torch)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from quantmill.errors import QuantmillError
from quantmill.integrity import check_folder_safetensors, tokenizer_problem
from quantmill.profile import Profile


def _problem(check: Callable[..., object], *args: object) -> str | None:
    """The one-line message of a check that raises QuantmillError (None when it passes)."""
    try:
        check(*args)
    except QuantmillError as exc:
        return str(exc)
    return None


def model_folder_problems(path: Path, source) -> list[str]:  # noqa: ANN001 - profile Source
    """A local model folder: exists, config.json, weights whose sizes match their headers, tokenizer files."""
    from quantmill.models import check_model_dir

    problem = _problem(check_model_dir, path, "model.path", source.allow_pickle, source.trust_remote_code)
    if problem is None and (tok := tokenizer_problem(path)):
        problem = f"model.path: {path} has {tok}; copy the tokenizer files next to config.json"
    problem = problem or _problem(check_folder_safetensors, path, "model.path")
    return [problem] if problem else []


def adapter_folder_problems(path: Path) -> list[str]:
    """A local adapter folder: exists, a LoRA adapter_config.json with a positive rank, an intact safetensors file."""
    from quantmill.adapters import check_adapter

    if not path.is_dir():
        return [f"adapter.path: {path} does not exist or is not a folder; fix the path"]
    problem = _problem(check_adapter, path) or _problem(check_folder_safetensors, path, "adapter.path")
    return [problem] if problem else []


def local_input_problems(profile: Profile) -> list[str]:
    """Every local input checked without loading anything (one line each): model, adapter, text files."""
    problems: list[str] = []
    if profile.model.path is not None:
        problems += model_folder_problems(Path(profile.model.path), profile.model)
    if profile.adapter is not None and profile.adapter.path is not None:
        problems += adapter_folder_problems(Path(profile.adapter.path))
    texts = [("calibration.source", profile.calibration.source), ("evaluation.source", profile.evaluation.source)]
    for field, source in texts:
        if source.path is not None and not Path(source.path).is_file():
            problems.append(f"{field}.path: {source.path} does not exist; fix the path")
    return problems
