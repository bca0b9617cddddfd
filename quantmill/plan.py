"""Memory plan: each step's peak RAM/VRAM, disk and output size, from config.json and safetensors headers alone.

Each row has the *working memory the step adds* (`ram`) and the process baseline when it runs (`base`: the
pipeline process itself, `RUNTIME_BYTES`, plus the quantization libraries earlier steps imported, which stay
loaded); the step's peak RSS is `base + ram`, and the run's peak is the largest step's, not their sum (memory is
given back between steps: quantmill.memory). Nothing here reads weights (quantmill.weights reads headers); the
numbers are quantmill.estimates', the only estimator: `quantmill plan` prints the rows and the preflight refuses a
run with them (`refuse_unfit`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantmill.errors import QuantmillError
from quantmill.estimates import (
    EVAL_DEQUANT,
    HEADROOM,
    RUNTIME_BYTES,
    STEP_OVERHEAD,
    MiB,
    activation_bytes,
    choose_merge_strategy,
    evaluate_memory,
    library_bytes,
    library_of,
    load_bytes,
    merge_memory,
    quantize_memory,
    targeted,
)
from quantmill.machine import Machine, this_machine
from quantmill.units import human_bytes
from quantmill.weights import Weights, folder_weights, hub_weights

DISK_ROW = "disk (all steps)"


@dataclass
class StepPlan:
    """One row of the plan: what a step needs, where it runs and whether it fits."""

    step: str
    device: str
    how: str
    ram: int
    vram: int = 0
    disk: int = 0
    output: int = 0
    fits: bool = True
    advice: str = ""
    libs: tuple[str, ...] = ()  # libraries the step imports (they stay loaded)
    base: int = 0  # process RSS when the step starts (set by `settle`)

    @property
    def peak(self) -> int:
        """The process's peak RSS during the step (baseline included)."""
        return self.base + self.ram


def _fit(row: StepPlan, m: Machine, advice: str) -> StepPlan:
    """Mark a row that needs more RAM/VRAM than is free for the step, with what to change (`m.ram` is what is
    free for the step itself; `settle` checks the row again with its baseline)."""
    row.advice = advice
    row.fits = not (row.ram * HEADROOM > m.ram or row.vram and row.vram * HEADROOM > m.vram)
    return row


def settle(rows: list[StepPlan], available: int, runtime: int = RUNTIME_BYTES, resident: int = 0) -> list[StepPlan]:
    """Give each row its baseline (runtime + libraries imported by it or earlier rows) and decide whether it fits:
    what the process adds beyond `resident` (its RSS now; 0 before it starts) must fit in `available`."""
    loaded: set[str] = set()
    for row in rows:
        loaded.update(lib for lib in row.libs if lib)
        row.base = runtime + sum(library_bytes(lib) for lib in loaded)
        if row.step == DISK_ROW:
            continue
        if row.base - resident + row.ram * HEADROOM > available and row.fits:
            row.fits = False
        if row.fits:
            row.advice = ""
    return rows


def run_peak(rows: list[StepPlan]) -> StepPlan:
    """The row whose peak is the run's peak: the largest step, not the sum (memory is given back between steps)."""
    return max((r for r in rows if r.step != DISK_ROW), key=lambda r: r.peak)


def adapter_facts(source: Any) -> tuple[dict[str, Any], int, dict[str, Any] | None]:
    """(adapter_config, adapter bytes, training finding) of a local adapter folder, or of a hub adapter's config."""
    if source.path is not None:
        d = Path(source.path)
        cfg_file = d / "adapter_config.json"
        if not cfg_file.is_file():
            raise QuantmillError(f"adapter.path: {d} has no adapter_config.json; point at a peft adapter folder")
        from quantmill.adapters import detect_training

        cfg = json.loads(cfg_file.read_text())
        size = sum(f.stat().st_size for f in d.glob("adapter_model.*"))
        return cfg, size, detect_training(d, cfg, None)
    from huggingface_hub import HfApi, hf_hub_download

    try:
        cfg = json.loads(Path(hf_hub_download(source.repo_id, "adapter_config.json", revision=source.revision)).read_text())
        info = HfApi().get_paths_info(source.repo_id, ["adapter_model.safetensors"], revision=source.revision)
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: one line for the user
        raise QuantmillError(f"adapter.repo_id {source.repo_id!r}: cannot read its config ({type(exc).__name__}); "
                             "go online, set HF_TOKEN, or plan a local copy (adapter.path)") from None
    return cfg, sum(getattr(i, "size", 0) or 0 for i in info), None


def merge_row(w: Weights, adapter: Any, spec: Any, m: Machine) -> StepPlan:
    """The merge step: strategy chosen for this machine, the adapter's training, memory and output."""
    cfg, abytes, training = adapter_facts(adapter)
    names = targeted(w, cfg)
    stream, no_gpu = merge_memory(w, abytes, "streaming", names)[0], ""
    try:
        strategy, _ = choose_merge_strategy(w, abytes, spec.strategy, m)
    except QuantmillError as exc:
        strategy, no_gpu = "gpu", str(exc)  # requested without a GPU: the row will not fit
    ram, vram = merge_memory(w, abytes, strategy, names)
    kind = (training or {}).get("method", "lora")
    how = f"{strategy} ({kind}{', dequantized base' if kind == 'qlora' and spec.qlora_merge == 'dequantized' else ''})"
    advice = no_gpu or (f"set merge.strategy: streaming (needs {human_bytes(stream)})" if strategy != "streaming"
                        else "free RAM, or merge.on_failure: skip_merge to carry on unmerged")
    return _fit(StepPlan("merge", "cuda" if strategy == "gpu" else "cpu", how, ram, vram, w.total, w.total), m, advice)


def quantize_row(w: Weights, recipe: Any, cal: Any, device: str, m: Machine) -> StepPlan:
    """One recipe's quantize step: memory on `device`, checkpoint size, and what to change if it does not fit."""
    from quantmill.methods.checks import uses_calibration

    c = recipe.config()
    calib = (cal.num_samples, cal.seq_len) if uses_calibration(recipe) else None
    ram, vram, ckpt = quantize_memory(w, recipe.method, c.weight_bits, c.weight_group_size, device, calib)
    act = activation_bytes(w, *calib) if calib else 0
    cpu_ram = quantize_memory(w, recipe.method, c.weight_bits, c.weight_group_size, "cpu", calib)[0]
    advice = (f"lower calibration.num_samples (activations take {human_bytes(act)})" if act > (ram + vram) / 3
              else "use device: cpu" if device == "cuda" and cpu_ram * HEADROOM <= m.ram
              else "use a machine with more memory or a GPU")
    how = f"{c.weight_bits}-bit, loads {human_bytes(load_bytes(w, recipe.method, device))}"
    row = StepPlan(f"quantize/{recipe.name}", device, how, ram, vram, ckpt, ckpt, libs=(library_of(recipe.method),))
    return _fit(row, m, advice)


def plan_profile(profile: Any, machine: Machine | None = None, runtime: int = RUNTIME_BYTES) -> list[StepPlan]:
    """Every step of a profile on this machine: peak RAM/VRAM, disk, output size, device, strategy, fit."""
    found = machine or this_machine(profile.storage.root)
    m = Machine(max(0, found.ram - runtime), found.vram, found.disk, found.cuda)  # the pipeline process runs first
    device = ("cuda" if m.cuda else "cpu") if profile.device == "auto" else profile.device
    src = profile.model
    w = folder_weights(Path(src.path)) if src.path else hub_weights(src.repo_id, src.revision)
    rows = [StepPlan("download", "network" if src.repo_id else "disk", "hub snapshot" if src.repo_id else "hash local folder",
                     64 * MiB if src.repo_id else STEP_OVERHEAD, disk=w.total if src.repo_id else 0, output=w.total)]
    if profile.adapter is not None:
        rows.append(merge_row(w, profile.adapter, profile.merge, m))
    rows += later_rows(w, profile.all_recipes()[0], profile.calibration, profile.evaluation, device, m)
    settle(rows, found.ram, runtime)
    total = sum(r.disk for r in rows)
    if total * HEADROOM > m.disk:
        rows.append(StepPlan(DISK_ROW, "disk", str(profile.storage.root), 0, 0, total, 0, False,
                             f"point storage.root at a disk with {human_bytes(total * HEADROOM)} free"))
    return rows


def later_rows(w: Weights, recipes: list[Any], cal: Any, ev: Any, device: str, m: Machine) -> list[StepPlan]:
    """The steps after the merge: calibration, baseline evaluation, each recipe's quantize and evaluate."""
    text = Path(cal.source.path).stat().st_size if cal.source.path and Path(cal.source.path).is_file() else 64 * MiB
    tokens = cal.num_samples * cal.seq_len * 8
    rows = [_fit(StepPlan("calibrate", "cpu", f"{cal.num_samples} × {cal.seq_len} tokens",
                          STEP_OVERHEAD + 6 * text + tokens, 0, tokens, tokens, libs=("tokenizers",)), m,
                 "use a smaller calibration text")]
    vocab, window = int(w.config.get("vocab_size") or 32000), ev.window or int(w.config.get("max_position_embeddings") or 2048)
    base_eval = evaluate_memory(w.params * w.itemsize, vocab, window, ev.batch_size, ev.kl_topk)
    rows.append(_eval_row("evaluate/baseline", device, base_eval, ev.max_tokens * ev.kl_topk * 8, m))
    for recipe in recipes:
        rows.append(quantize_row(w, recipe, cal, device, m))
        dequant = EVAL_DEQUANT.get(recipe.method, 2.0) * w.linear_params()[0] if device != "cuda" else 0
        need = evaluate_memory(int(rows[-1].output * 1.2 + dequant), vocab, window, ev.batch_size, 0)
        rows.append(_eval_row(f"evaluate/{recipe.name}", device, need, 0, m))
        rows[-1].libs = (library_of(recipe.method, loading=True),)
    return rows


def preflight_rows(model_dir: Path, recipes: list[Any], cal: Any, ev: Any, device: str) -> list[StepPlan]:
    """The remaining steps of a running pipeline (after the merge), settled against available memory with this
    process's RSS now as their baseline."""
    import psutil

    w, avail = folder_weights(Path(model_dir)), psutil.virtual_memory().available
    rss = psutil.Process().memory_info().rss
    return settle(later_rows(w, recipes, cal, ev, device, Machine(avail, 0, 1 << 62, device == "cuda")), avail,
                  runtime=rss, resident=rss)


def disk_need(rows: list[StepPlan]) -> int:
    """Bytes the steps write to the store, plus scratch for the largest output (built beside its final place)."""
    return sum(r.disk for r in rows) + max((r.output for r in rows), default=0)


def refuse_unfit(rows: list[StepPlan], available: int) -> None:
    """Raise PreflightError naming the first step whose peak will not fit in the `available` memory."""
    from quantmill.errors import PreflightError

    for row in rows:
        if not row.fits:
            raise PreflightError(
                f"{row.step}: needs about {human_bytes(row.peak)} at its peak (process {human_bytes(row.base)} + step {human_bytes(row.ram)}), "
                f"{human_bytes(available)} available beyond this process; {row.advice or 'use a machine with more memory'}")


def _eval_row(name: str, device: str, need: int, disk: int, m: Machine) -> StepPlan:
    """An evaluation row (weights + logits), on the GPU when the device is cuda."""
    ram, vram = (STEP_OVERHEAD, need) if device == "cuda" else (need, 0)
    return _fit(StepPlan(name, device, "perplexity/KL windows", ram, vram, disk, disk), m,
                "lower evaluation.batch_size or evaluation.window")


def step_peaks(rows: list[StepPlan]) -> dict[str, int]:
    """Each step's predicted peak RSS of the process (its baseline included): {step: bytes}."""
    return {r.step: r.peak for r in rows if r.step != DISK_ROW}
