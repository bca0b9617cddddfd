"""Memory plan: estimates from config.json and safetensors headers, checked against measured peaks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from benchmarks.merge import synthetic_adapter, synthetic_model
from quantmill.errors import QuantmillError
from quantmill.estimates import RUNTIME_BYTES, MiB, choose_merge_strategy, merge_memory, quantize_memory, targeted
from quantmill.flows.cli import main
from quantmill.machine import Machine
from quantmill.plan import plan_profile
from quantmill.profile_io import load_profile
from quantmill.weights import config_weights, folder_weights
from tests.conftest import REPO, python_script

# One fresh process measures each step in turn: the step's peak is VmHWM (reset just before) minus the RSS before.
CHILD = r"""
import ctypes, gc, json, re, sys
from pathlib import Path
import psutil
from quantmill.methods import QuantizeJob, get_method
from quantmill.merging import merge_lora
from quantmill.modelinfo import meta_model
from quantmill.profile import Merge
from quantmill.recipes import Recipe

def measure(fn):
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5"); rss0 = psutil.Process().memory_info().rss
    fn()
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024 - rss0

jobs, out = json.loads(sys.argv[1]), {}
warm = jobs.pop("warm")  # first use of torch kernels, thread pools and lazy imports is not the step's memory
meta_model(Path(warm["base"]))  # transformers' modeling code (model_info may answer from the state folder)
merge_lora(Path(warm["base"]), Path(warm["adapter"]), Path(warm["out"]), Merge(strategy="streaming"))
for name, job in jobs.items():
    if job["kind"] == "merge":
        fn = lambda: merge_lora(Path(job["base"]), Path(job["adapter"]), Path(job["out"]), Merge(strategy=job["strategy"]))
    else:
        recipe = Recipe(**job["recipe"])
        fn = lambda: get_method(recipe.method).handler(recipe.config(), QuantizeJob(Path(job["base"]), Path(job["out"]), None, "cpu", print))
    out[name] = measure(fn)
print(json.dumps(out))
"""


@pytest.fixture(scope="module", autouse=True)
def prefect_ready():
    """Start Prefect (server, logging) outside capsys, so its handlers keep a live stream (as test_bad_inputs)."""
    from prefect import flow

    flow(lambda: None, name="warm-up")()


def measure_steps(jobs: dict) -> dict[str, int]:
    """Run CHILD in a fresh interpreter (fixed malloc mmap threshold, so freed tensors leave RSS)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(python_script(CHILD, json.dumps(jobs)), capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def demo_profile(demo_assets, store: Path, **changes) -> dict:
    """profiles/demo.yaml pointed at the test demo build and a private store."""
    data = yaml.safe_load((REPO / "profiles" / "demo.yaml").read_text().replace("${QUANTMILL_DEMO}", str(demo_assets.root)))
    data["storage"]["root"] = str(store)
    data.update(changes)
    return data


def test_plan_within_25_percent_of_measured_peaks(demo_assets, tmp_path):
    # the demo (5 MiB) measures fixed costs; a 60 MiB bf16 model, whose MLP weights dominate, measures the data terms
    syn = synthetic_model(tmp_path / "syn", hidden=1024, layers=2, vocab=2048, dtype="bfloat16", shard_mb=16)
    syn_adapter = synthetic_adapter(tmp_path / "syn-adapter", syn)
    models = {"demo": (demo_assets.model_dir, demo_assets.adapter_dir), "synthetic": (syn, syn_adapter)}
    jobs = {"warm": {"base": str(demo_assets.model_dir), "adapter": str(demo_assets.adapter_dir), "out": str(tmp_path / "w")},
            "demo/quantize-rtn": {"kind": "quantize", "recipe": {"method": "rtn", "bits": 8, "group_size": 64},
                                  "base": str(demo_assets.model_dir), "out": str(tmp_path / "q")}}
    for label, (base, adapter) in models.items():
        for strategy in ("cpu", "streaming"):
            jobs[f"{label}/merge-{strategy}"] = {"kind": "merge", "strategy": strategy, "base": str(base),
                                                 "adapter": str(adapter), "out": str(tmp_path / f"{label}-{strategy}")}
    got = measure_steps(jobs)
    plan = {"demo/quantize-rtn": quantize_memory(folder_weights(demo_assets.model_dir), "rtn", 8, 64, "cpu", None)[0]}
    for label, (base, adapter) in models.items():
        w = folder_weights(base)
        names = targeted(w, json.loads((adapter / "adapter_config.json").read_text()))
        abytes = (adapter / "adapter_model.safetensors").stat().st_size
        plan.update({f"{label}/merge-{s}": merge_memory(w, abytes, s, names)[0] for s in ("cpu", "streaming")})
    for step, estimate in plan.items():
        # 25%, or 1 MiB where the whole step is a few MiB (the demo's streaming merge holds one 1 MiB tensor)
        assert abs(estimate - got[step]) <= max(0.25 * got[step], MiB), (step, estimate, got[step])
    assert got["synthetic/merge-streaming"] < got["synthetic/merge-cpu"] / 2


def test_plan_command_prints_the_demo_table(demo_assets, tmp_path, capsys):
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(demo_profile(demo_assets, tmp_path / "store")))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    for piece in ("memory plan", "download", "merge", "cpu (lora)", "calibrate", "evaluate/baseline",
                  "quantize/rtn-w8g64", "quantize/bnb-nf4", "every step fits"):
        assert piece in out, out
    assert main(["plan", str(path), "--set", "merge.strategy=streaming"]) == 0
    assert "streaming (lora)" in capsys.readouterr().out


def test_plan_flags_what_does_not_fit(demo_assets, tmp_path):
    profile = load_profile(_write(tmp_path, demo_profile(demo_assets, tmp_path / "store")))
    small = Machine(ram=RUNTIME_BYTES + 4 * MiB, vram=0, disk=MiB, cuda=False)
    rows = {r.step: r for r in plan_profile(profile, small)}
    assert rows["merge"].how == "streaming (lora)" and rows["merge"].fits  # auto picks streaming: 1.6 MiB fits
    assert not rows["quantize/rtn-w8g64"].fits and "more memory" in rows["quantize/rtn-w8g64"].advice
    assert not rows["disk (all steps)"].fits and "storage.root" in rows["disk (all steps)"].advice
    forced = load_profile(_write(tmp_path, demo_profile(demo_assets, tmp_path / "store", merge={"strategy": "cpu"})))
    merge_row = next(r for r in plan_profile(forced, small) if r.step == "merge")
    assert not merge_row.fits and "merge.strategy: streaming" in merge_row.advice
    big = Machine(ram=RUNTIME_BYTES + (64 << 30), vram=80 << 30, disk=1 << 40, cuda=True)
    rows = {r.step: r for r in plan_profile(profile, big)}
    assert rows["merge"].device == "cuda" and rows["quantize/bnb-nf4"].vram > 0 and all(r.fits for r in rows.values())


def test_strategy_choice_and_config_only_estimate(demo_assets):
    w = folder_weights(demo_assets.model_dir)
    need_cpu = merge_memory(w, 0, "cpu")[0]
    assert choose_merge_strategy(w, 0, "auto", Machine(need_cpu * 2, 0, 0, False))[0] == "cpu"
    assert choose_merge_strategy(w, 0, "auto", Machine(need_cpu // 2, 0, 0, False))[0] == "streaming"
    assert choose_merge_strategy(w, 0, "auto", Machine(need_cpu // 2, need_cpu * 2, 0, True))[0] == "gpu"
    assert choose_merge_strategy(w, 0, "streaming", Machine(1 << 40, 0, 0, False))[0] == "streaming"
    with pytest.raises(QuantmillError, match="merge.strategy: gpu"):
        choose_merge_strategy(w, 0, "gpu", Machine(1 << 40, 0, 0, False))
    approx = config_weights(json.loads((demo_assets.model_dir / "config.json").read_text()))
    assert abs(approx.params - w.params) <= 0.02 * w.params  # norms are the only tensors it leaves out


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_preflight_refuses_a_run_whose_peak_will_not_fit_naming_the_step(demo_assets, tmp_path, capsys, monkeypatch):
    import psutil

    path = _write(tmp_path, demo_profile(demo_assets, tmp_path / "store", merge={"strategy": "streaming"}))
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=2 * MiB))  # a full machine
    assert main(["run", str(path)]) == 2
    last = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()][-1]
    assert last.startswith("error: calibrate: needs about ") and "at its peak (process " in last, last
    assert "2.0 MiB available beyond this process" in last, last
    assert not list((tmp_path / "store" / "objects").glob("quantize-*"))  # refused before any heavy step


def test_run_peak_is_the_largest_step_not_the_sum(demo_assets, tmp_path):
    from quantmill.plan import run_peak, step_peaks

    profile = load_profile(_write(tmp_path, demo_profile(demo_assets, tmp_path / "store")))
    rows = plan_profile(profile, Machine(ram=64 << 30, vram=0, disk=1 << 40, cuda=False))
    peaks = step_peaks(rows)
    assert run_peak(rows).peak == max(peaks.values()) < rows[-1].base + sum(r.ram for r in rows)  # not the sum
    assert all(p >= RUNTIME_BYTES for p in peaks.values())  # every step's peak includes the process baseline
    by = {r.step: r for r in rows}  # libraries a step imports stay loaded: later steps start higher
    assert by["download"].base == RUNTIME_BYTES < by["evaluate/rtn-w8g64"].base <= by["evaluate/dynamic-int8"].base
