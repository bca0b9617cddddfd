"""The run's inputs checked before any step: `local_input_problems` loads nothing (what `quantmill validate` runs);
`check_run_inputs` adds writable folders, text lengths (tokenizer alone) and free disk (what `quantmill run` checks
before Prefect and its server start, and the flow's check-inputs task again). Core floor: torch/transformers only
imported by the text check."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from quantmill import memo, state
from quantmill.errors import PreflightError, QuantmillError
from quantmill.hashing import sha256_file
from quantmill.integrity import check_folder_safetensors, tokenizer_problem
from quantmill.models import TOKENIZER_FILES
from quantmill.profile import Profile
from quantmill.store import is_url


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


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_writable(path: Path, field: str) -> None:
    """Create the folder and a probe file in it: a read-only or unusable location is one line naming the field."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise PreflightError(f"{field}: {path} is not writable ({exc.strerror or exc}); "
                             f"point {field} at a writable folder") from None


def check_texts(profile: Profile) -> None:
    """Calibration and evaluation texts long enough for the profile, counted with the model's tokenizer alone
    (prepared as the calibrate and eval-data steps prepare them, so they fail here with the same line)."""
    model_dir, cal, ev = Path(profile.model.path), profile.calibration, profile.evaluation
    ctx = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    if ctx and cal.seq_len > ctx:
        raise QuantmillError(f"calibration.seq_len: {cal.seq_len} exceeds the model's context of {ctx} tokens; lower it")
    if ctx and ev.window and ev.window > ctx:
        raise QuantmillError(f"evaluation.window: {ev.window} exceeds the model's context of {ctx}; lower it")
    if ev.source.path is None and cal.source.path is None:
        return  # hub datasets: read by their steps (network), not twice
    from quantmill.caching import fingerprint

    key = memo.memo_key("texts", calibration=fingerprint(cal), evaluation=fingerprint(ev),  # sources by content
                        tokenizer={name: sha256_file(model_dir / name) for name in TOKENIZER_FILES
                                   if (model_dir / name).is_file()},
                        libraries=memo.installed_versions("transformers", "tokenizers"))
    if memo.recall("texts", key):
        return  # these texts passed with this tokenizer before (quantmill.memo): no tokenizer to load
    from transformers import AutoTokenizer

    from quantmill.textdata import draw_samples, draw_windows, token_stream

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if ev.source.path is not None:
        if token_stream(ev.source, "evaluation.source", tokenizer, ev.max_tokens).numel() < 2:
            raise QuantmillError(f"evaluation.source: {ev.source.label} has no usable text; add held-out text")
    if cal.source.path is not None:
        if cal.mode == "samples":
            draw_samples(cal.source, "calibration.source", tokenizer, cal.num_samples, cal.seq_len, cal.seed)
        else:
            draw_windows(token_stream(cal.source, "calibration.source", tokenizer), cal.num_samples, cal.seq_len,
                         cal.seed)
    memo.remember("texts", key, True)


def run_disk_needed(profile: Profile) -> int:
    """Bytes every step of the run writes (the plan's disk column: merged model, calibration, checkpoints)."""
    from quantmill.machine import this_machine
    from quantmill.plan import plan_profile

    machine = this_machine(profile.storage.root)
    return sum(row.disk for row in plan_profile(profile, machine) if row.step != "disk (all steps)")


def check_run_inputs(profile: Profile) -> None:
    """Fail before download and merge: local inputs, writable folders, text lengths, free disk for the whole run."""
    problems = local_input_problems(profile)
    if problems:
        raise QuantmillError(problems[0])
    root = profile.storage.root
    if not is_url(root):
        check_writable(Path(root), "storage.root")
    if state.tracking_uri().startswith("sqlite:"):
        check_writable(state.artifact_root(), "MLflow artifact root (QUANTMILL_HOME)")
    if profile.model.path is None:
        return  # hub model: headers and tokenizer arrive with the download, which checks them
    check_texts(profile)
    if not is_url(root):
        try:
            need = run_disk_needed(profile)
        except QuantmillError:  # a hub adapter's size needs the network: the preflight after merge checks disk
            return
        free = free_bytes(Path(root))
        if need > free:
            raise PreflightError(
                f"storage.root: {root} has {free:,} bytes free but this run needs about {need:,} "
                "(merged model, calibration, checkpoints); free some space or point storage.root at a larger disk"
            )
