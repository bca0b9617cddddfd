"""Preflight: the run's inputs, folders and disk checked before the first heavy step; recipes fit model and device.

`check_inputs` runs first in every flow (before download and merge, before the MLflow run exists): local paths,
safetensors headers, tokenizer files, adapter config, text lengths (with the tokenizer alone), writable
`storage.root` and MLflow artifact root, and free disk for every step's output (from headers and the plan).
`local_input_problems` is its part that loads nothing (what `quantmill validate` runs).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import psutil
from prefect import task

from quantmill import plan, state
from quantmill.context import StepContext
from quantmill.errors import PreflightError, QuantmillError
from quantmill.inputs import local_input_problems
from quantmill.methods.checks import check_recipe
from quantmill.profile import Calibration, Evaluation, Profile
from quantmill.recipes import Recipe
from quantmill.refs import ModelRef
from quantmill.store import is_url


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


@task(name="preflight")
def preflight(
    model: ModelRef, recipes: list[Recipe], *, optional: list[str] | None = None, calibration: Calibration,
    evaluation: Evaluation, ctx: StepContext,
) -> dict[str, str]:
    """Fail before heavy work: recipes valid for this model/device, enough disk and memory.

    Recipes named in `optional` (those a sweep grid generated) are skipped when invalid for this model or
    device instead of failing the run; returns {skipped recipe: reason}.
    """
    device, store_root = ctx.device, ctx.store_root
    skipped: dict[str, str] = {}
    valid = []
    for i, recipe in enumerate(recipes):
        try:
            check_recipe(recipe, i, model, device)
            valid.append(recipe)
        except QuantmillError as exc:
            if recipe.name not in (optional or []):
                raise
            skipped[recipe.name] = str(exc).split(": ", 1)[-1]
    if not valid:
        raise PreflightError("sweep.grid: no recipe fits this model and device: "
                             + "; ".join(f"{name}: {why}" for name, why in skipped.items()))
    rows = plan.preflight_rows(Path(model.path), valid, calibration, evaluation, device)  # the one estimator
    need, free = plan.disk_need(rows), free_bytes(Path(store_root))
    if need > free:
        raise PreflightError(
            f"storage.root: {store_root} has {free:,} bytes free but this run needs about {need:,}; "
            "free some space or point storage.root at a larger disk"
        )
    plan.refuse_unfit(rows, psutil.virtual_memory().available)
    return skipped


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
    from transformers import AutoTokenizer

    from quantmill.textdata import draw_samples, draw_windows, token_stream

    model_dir, cal, ev = Path(profile.model.path), profile.calibration, profile.evaluation
    ctx = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    if ctx and cal.seq_len > ctx:
        raise QuantmillError(f"calibration.seq_len: {cal.seq_len} exceeds the model's context of {ctx} tokens; lower it")
    if ctx and ev.window and ev.window > ctx:
        raise QuantmillError(f"evaluation.window: {ev.window} exceeds the model's context of {ctx}; lower it")
    if ev.source.path is None and cal.source.path is None:
        return  # hub datasets: read by their steps (network), not twice
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


def run_disk_needed(profile: Profile) -> int:
    """Bytes every step of the run writes (the plan's disk column: merged model, calibration, checkpoints)."""
    from quantmill.machine import this_machine
    from quantmill.plan import plan_profile

    machine = this_machine(profile.storage.root)
    return sum(row.disk for row in plan_profile(profile, machine) if row.step != "disk (all steps)")


@task(name="check-inputs")
def check_inputs(profile: Profile) -> None:
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
