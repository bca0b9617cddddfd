"""The demo profile end to end through the real CLI, Prefect and a SQLite MLflow registry."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from quantmill.hashing import hash_tree
from tests import fresh
from tests.conftest import REPO, model_cache
from tests.servers import served_env

STEPS = ("download", "merge", "calibrate", "eval-data", "evaluate", "quantize", "register")
BITS = {"rtn": "8", "bnb-int8": "8", "bnb-nf4": "4", "dynamic-int8": "8", "gptq": "4"}  # the demo's recipes + GPTQ
PASSED = sorted(BITS)  # every one of them passes its gate


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    """`quantmill ARGS` in a new process (forked: tests/fresh.py) against the state folder `home`."""
    env = served_env(home, QUANTMILL_DEMO_ROOT=str(model_cache()))
    proc = fresh.run_cli(*args, cwd=REPO, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def step_states(output: str) -> list[tuple[str, str]]:
    """(task, state) pairs from the CLI's 'steps:' line."""
    line = re.search(r"steps: .*?:(.*?)\n(?:aliases|$)", output, re.S)
    assert line, output[-2000:]
    return re.findall(r"([\w-]+)=(\w+)", line.group(1))


def mlflow_client(home: Path):
    import mlflow

    uri = f"sqlite:///{home / 'mlflow.db'}"
    return mlflow.MlflowClient(uri, registry_uri=uri)


@pytest.mark.slow
def test_demo_registers_variants_then_reruns_cached(demo_run, demo_rerun, demo_assets):
    """The demo (+ GPTQ) from a fresh state folder, the same run again (all cached), then with more evaluation
    tokens (only the evaluation recomputes); the console tests read the same two first runs."""
    home, first = demo_run.home, demo_run.out
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    assert "perplexity: token-level exp(mean NLL) over 64 windows of 256 tokens, stride 256" in first.stdout
    client = mlflow_client(home)
    versions = client.search_model_versions("name='quantmill-demo'")
    assert sorted(mv.tags["method"] for mv in versions) == PASSED, first.stdout[-3000:]
    base_sha = hash_tree(Path(demo_assets.model_dir))
    adapter_sha = hash_tree(Path(demo_assets.adapter_dir))
    run = None
    for mv in versions:
        t = mv.tags
        assert t["gate"] == "passed"
        assert t["base_sha256"] == base_sha and t["adapter_sha256"] == adapter_sha
        assert t["merged_sha256"] and t["merged_sha256"] != base_sha
        assert len(t["calibration_digest"]) == (64 if t["calibration_used"] == "true" else 0)
        assert t["bits"] == BITS[t["method"]]
        delta = 100 * (float(t["perplexity"]) / float(t["baseline_perplexity"]) - 1)
        assert abs(delta - float(t["ppl_delta_pct"])) < 1e-3
        assert float(t["ppl_delta_pct"]) <= 5.0
        variant_run = client.get_run(mv.run_id)  # the variant's child run
        assert variant_run.data.metrics["perplexity"] == pytest.approx(float(t["perplexity"]), rel=1e-5)
        assert variant_run.data.metrics["size_bytes"] == float(t["size_bytes"])
        run = client.get_run(variant_run.data.tags["mlflow.parentRunId"])
    assert run.data.params["profile.registry.model_name"] == "quantmill-demo"
    baseline_run = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' "
                                      "and tags.mlflow.runName = 'evaluate/baseline'")[0]
    assert baseline_run.data.params["preparation"] == "one document read as is, tokenized once"
    assert (baseline_run.data.params["window"], baseline_run.data.params["stride"]) == ("256", "256")
    assert int(baseline_run.data.params["tokens"]) == int(baseline_run.data.params["windows"]) * 255
    rtn = next(mv for mv in versions if mv.tags["method"] == "rtn")
    assert rtn.tags["group_size"] == "64"
    champion = client.get_model_version_by_alias("quantmill-demo", "champion")
    assert int(champion.tags["size_bytes"]) == min(int(mv.tags["size_bytes"]) for mv in versions)

    second = demo_rerun.out
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    states = dict(step_states(second.stdout))
    for step in STEPS:
        assert states.get(step) == "Cached", (step, states)
    assert len(client.search_model_versions("name='quantmill-demo'")) == len(versions)

    # More evaluation tokens for one of the recipes (speed not measured: the evaluation recomputes either way).
    third = run_cli(home, "demo", "--set", "evaluation.max_tokens=4096", "--set", "evaluation.speed=null",
                    "--set", "recipes=[{method: rtn, bits: 8, group_size: 64}]")
    pairs = step_states(third.stdout)
    states = {}
    for name, st in pairs:
        states.setdefault(name, set()).add(st)
    for step in ("download", "merge", "calibrate", "quantize"):
        assert states[step] == {"Cached"}, (step, pairs)
    assert states["eval-data"] == {"Completed"} and states["evaluate"] == {"Completed"}, pairs
    assert [name for name, _ in pairs].count("evaluate") == 2, pairs  # the baseline and the one variant
