"""Sweeps: a grid of recipes expanded from the profile, fanned out on a local Dask cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantmill.errors import ProfileError
from quantmill.profile_io import parse_profile
from tests.conftest import write_profile
from tests.test_pipeline_e2e import mlflow_client, run_cli, step_states

BASE = {
    "model": {"path": "/m"},
    "calibration": {"source": {"path": "/c.txt"}},
    "evaluation": {"source": {"path": "/e.txt"}},
    "registry": {"model_name": "s"},
}


def test_grid_expands_per_method_axes_and_reports_what_it_skips():
    profile = parse_profile({**BASE, "recipes": [{"method": "rtn", "bits": 8, "group_size": 64, "name": "mine"}],
                             "sweep": {"grid": [{"methods": ["rtn", "awq", "bnb-nf4"], "bits": [4, 8],
                                                 "group_sizes": [64, 128]}]}})
    recipes, skipped = profile.all_recipes()
    names = [r.name for r in recipes]
    # bnb-nf4 has no bits/group axes (one recipe); awq only does 4 bits (8 is skipped with the reason)
    assert names == ["mine", "rtn-w4g64", "rtn-w4g128", "rtn-w8g64", "rtn-w8g128", "awq-w4g64", "awq-w4g128", "bnb-nf4"]
    assert len(skipped) == 2 and all(line.startswith("awq {'bits': 8") and "bits" in line for line in skipped)
    assert recipes[3].params["bits"] == 8 and recipes[3].params["group_size"] == 64


def test_grid_recipes_that_would_share_a_name_are_reported_not_dropped():
    profile = parse_profile({**BASE, "sweep": {"grid": [
        {"methods": ["rtn"], "bits": [4], "group_sizes": [64], "params": {"sym": True}},
        {"methods": ["rtn"], "bits": [4], "group_sizes": [64], "params": {"sym": False}},
    ]}})
    recipes, skipped = profile.all_recipes()
    assert [r.name for r in recipes] == ["rtn-w4g64"] and recipes[0].params["sym"] is True
    assert len(skipped) == 1 and "same name as an earlier grid recipe (rtn-w4g64)" in skipped[0]


def test_grid_without_a_valid_combination_is_a_clear_error():
    with pytest.raises(ProfileError, match=r"sweep.*no combination is valid: awq .*bits"):
        parse_profile({**BASE, "sweep": {"grid": [{"methods": ["awq"], "bits": [8]}]}})
    with pytest.raises(ProfileError, match=r"sweep.grid.0.methods.*unknown quantization method 'gptx'.*known"):
        parse_profile({**BASE, "sweep": {"grid": [{"methods": ["gptx"]}]}})
    with pytest.raises(ProfileError, match=r"recipes: give at least one recipe"):
        parse_profile(BASE)
    with pytest.raises(ProfileError, match=r"sweep.runner.*address.*kind: dask"):
        parse_profile({**BASE, "recipes": [{"method": "rtn"}], "sweep": {"runner": {"address": "tcp://h:8786"}}})


@pytest.mark.slow
def test_dask_sweep_computes_shared_steps_once_and_evaluates_every_variant(tmp_path, make_profile, warm_store):
    name = "sweep-test"
    profile = make_profile(name, [], sweep={"grid": [{"methods": ["rtn"], "bits": [4, 8], "group_sizes": [64]},
                                                     {"methods": ["bnb-int8", "bnb-nf4"]}],
                                            "runner": {"kind": "dask", "max_workers": 2}})
    path = write_profile(tmp_path / "sweep.yaml", profile)
    home = tmp_path / "home"
    warm_store(home / "artifacts")  # the merge, calibration and baseline come back from the store: still one run each
    proc = run_cli(home, "sweep", str(path), "-v")  # -v: the Dask/Prefect lines are shown live
    out = proc.stdout
    assert "Creating a new Dask cluster" in proc.stderr and "Starting temporary server" not in proc.stderr.split(
        "Creating a new Dask cluster")[1]  # workers report to this run's API, not to servers of their own
    states = step_states(out)
    counts: dict[str, int] = {}
    for step, st in states:
        assert st == "Completed", states
        counts[step] = counts.get(step, 0) + 1
    for shared in ("download", "merge", "calibrate", "eval-data", "promote", "publish-report"):
        assert counts[shared] == 1, counts
    assert counts["quantize"] == 4 and counts["gate"] == 4 and counts["register"] == 4, counts
    assert counts["evaluate"] == 5, counts  # the baseline once, then each variant

    client = mlflow_client(home)
    versions = client.search_model_versions(f"name='{name}'")
    evaluated = {mv.tags["variant"] for mv in versions}
    run = client.get_run(client.get_run(versions[0].run_id).data.tags["mlflow.parentRunId"])  # version -> variant run -> parent
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "report/comparison.json", str(tmp_path))).read_text())
    rows = {r["variant"]: r for r in report["rows"][1:]}
    assert set(rows) == {"rtn-w4g64", "rtn-w8g64", "bnb-int8", "bnb-nf4"}
    assert all(r["perplexity"] > 0 for r in rows.values())
    assert {r["gate"] for r in rows.values()} == {"pass"} and evaluated == set(rows)  # every variant registered
    sizes = {mv.tags["variant"]: int(mv.tags["size_bytes"]) for mv in versions}
    assert client.get_model_version_by_alias(name, "champion").tags["variant"] == min(sizes, key=sizes.get)


@pytest.fixture()
def broken_method():
    """A registered method whose handler always raises (removed again after the test)."""
    from quantmill.methods import registry

    class BrokenConfig(registry.MethodConfig):
        bits: int = 8

    @registry.register_method("broken-for-test", BrokenConfig)
    def broken(config, job):
        """Always fails (test only)."""
        raise RuntimeError("kernel exploded")

    yield
    registry._METHODS.pop("broken-for-test")


@pytest.mark.slow
def test_a_failing_variant_does_not_lose_the_others(tmp_path, demo_assets, broken_method):
    """Threads runner, in process: a grid recipe that does not fit the model is skipped, one that raises is
    reported; the rest are registered, and the report lists both."""
    from quantmill import tracking
    from quantmill.flows.sweep import sweep

    name = "sweep-partial"
    profile = parse_profile({
        "name": name,
        "model": {"path": str(demo_assets.model_dir)},
        "calibration": {"source": {"path": str(demo_assets.calib_path)}, "num_samples": 8, "seq_len": 128},
        "recipes": [{"method": "broken-for-test"}],
        "sweep": {"grid": [{"methods": ["rtn"], "bits": [8], "group_sizes": [64, 100]}],  # 100 divides no layer
                  "runner": {"kind": "threads", "max_workers": 2}},
        "evaluation": {"source": {"path": str(demo_assets.eval_path)}, "max_tokens": 1024, "window": 256,
                       "speed": {"enabled": False}},
        "registry": {"model_name": name},
        "storage": {"root": str(tmp_path / "store")},
    })
    state = sweep(profile, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"sweep: 1 of 2 variants failed: broken-for-test-w8 \(RuntimeError: kernel exploded"):
        state.result()
    client = tracking.client()
    versions = client.search_model_versions(f"name='{name}'")
    assert [mv.tags["variant"] for mv in versions] == ["rtn-w8g64"]
    assert client.get_model_version_by_alias(name, "champion").version == versions[0].version
    run = client.get_run(client.get_run(versions[0].run_id).data.tags["mlflow.parentRunId"])  # version -> variant run -> parent
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "report/comparison.json", str(tmp_path))).read_text())
    assert [r["variant"] for r in report["rows"][1:]] == ["rtn-w8g64"]
    skipped, failed = report["notes"]
    assert skipped.startswith("skipped (sweep.grid): rtn-w8g100: group_size=100 does not divide in_features=")
    assert failed == "failed: broken-for-test-w8: RuntimeError: kernel exploded"


def test_runner_choice(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from quantmill.flows.sweep import task_runner
    from quantmill.recipes import Sweep

    threads = task_runner(Sweep.Runner(max_workers=3))
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(ValueError, match=r"sweep.runner.address: .*set PREFECT_API_URL"):
        task_runner(Sweep.Runner(kind="dask", address="tcp://127.0.0.1:8786"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    remote = task_runner(Sweep.Runner(kind="dask", address="tcp://127.0.0.1:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://127.0.0.1:8786"  # not contacted here


def test_dask_runner_without_the_extra_names_it(monkeypatch):
    import sys

    from quantmill.errors import QuantmillError
    from quantmill.flows.sweep import task_runner
    from quantmill.recipes import Sweep

    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # the `dask` extra not installed: import fails
    with pytest.raises(QuantmillError, match=r"^sweep\.runner\.kind: dask needs the `dask` extra: "
                                             r"pip install 'quantmill\[dask\]'$"):
        task_runner(Sweep.Runner(kind="dask", max_workers=2))
