"""Deployment presets (`quantmill run --preset NAME --model PATH`) and method aliases."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from quantmill.errors import QuantmillError
from quantmill.flows.cli import main
from quantmill.presets import available, resolve
from quantmill.recipes import Recipe
from tests import fresh
from tests.servers import served_env

pytestmark = pytest.mark.usefixtures("prefect_ready")  # `main` with capsys: Prefect's log handlers outside it

NAMES = ["cpu-int8", "gpu-8bit", "gpu-4bit", "gptq-4bit", "awq-4bit", "sweep-small"]
CANONICAL = {"cpu-int8": "dynamic-int8", "gpu-8bit": "bnb-int8", "gpu-4bit": "bnb-nf4", "gptq-4bit": "gptq",
             "awq-4bit": "awq"}


def test_presets_listed_one_line_each(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(available()) == sorted(NAMES)
    for name in NAMES:
        mine = [ln for ln in lines if ln.split()[0] == name]
        assert len(mine) == 1 and len(mine[0]) > len(name) + 10, lines


@pytest.mark.parametrize(("alias", "canonical"), [("dynamic", "dynamic-int8"), ("bnb-8bit", "bnb-int8"),
                                                   ("bnb-4bit", "bnb-nf4")])
def test_alias_recorded_under_canonical_name(alias, canonical):
    recipe = Recipe(method=alias)
    assert recipe.method == canonical
    assert recipe.name == Recipe(method=canonical).name and recipe.params == Recipe(method=canonical).params


def test_unknown_method_lists_methods_and_aliases():
    with pytest.raises(Exception) as exc:
        Recipe(method="bnb-3bit")
    text = str(exc.value)
    assert "unknown quantization method 'bnb-3bit'" in text and "bnb-nf4" in text and "bnb-4bit (= bnb-nf4)" in text


def test_alias_clash_refused_at_registration():
    from quantmill.methods.base import GroupedConfig
    from quantmill.methods.registry import register_method

    class Clash(GroupedConfig):
        pass

    with pytest.raises(ValueError, match="already a method"):
        register_method("clash-test", Clash, aliases=("rtn",))(lambda c, j: None)
    with pytest.raises(ValueError, match="another method's alias"):
        register_method("clash-test", Clash, aliases=("dynamic",))(lambda c, j: None)
    from quantmill.methods import get_method

    with pytest.raises(QuantmillError):
        get_method("clash-test")  # nothing was registered


def test_every_preset_resolves_with_a_model(demo_assets):
    for name in NAMES:
        profile = resolve(name, model=str(demo_assets.model_dir))
        recipes, skipped = profile.all_recipes()
        assert recipes and not skipped, name
        assert profile.name == name and profile.model.path == str(demo_assets.model_dir)
        assert profile.registry.model_name == "model-quantized"
        assert Path(profile.calibration.source.path).is_file() and Path(profile.evaluation.source.path).is_file()
        if name in CANONICAL:
            assert [r.method for r in recipes] == [CANONICAL[name]]
        if name in ("gptq-4bit", "awq-4bit"):
            assert recipes[0].params["group_size"] == 128 and recipes[0].params["bits"] == 4
    # the sweep compares exactly the single presets' recipes (so their runs reuse its results)
    sweep = {r.name: r.params for r in resolve("sweep-small", model=str(demo_assets.model_dir)).all_recipes()[0]}
    singles = {r.name: r.params for n in CANONICAL for r in resolve(n, model=str(demo_assets.model_dir)).recipes}
    assert sweep == singles


def test_calibration_and_adapter_from_the_command_line(demo_assets):
    profile = resolve("gptq-4bit", model=str(demo_assets.model_dir), adapter=str(demo_assets.adapter_dir),
                      calibration=str(demo_assets.calib_path), overrides=["calibration.num_samples=16"])
    assert profile.adapter.path == str(demo_assets.adapter_dir)
    assert profile.calibration.source.path == str(demo_assets.calib_path) and profile.calibration.num_samples == 16
    hub = resolve("gptq-4bit", model="org/model@0123abc", calibration="wikitext:wikitext-2-raw-v1:train")
    assert (hub.model.repo_id, hub.model.revision) == ("org/model", "0123abc")
    src = hub.calibration.source
    assert (src.dataset, src.config, src.split) == ("wikitext", "wikitext-2-raw-v1", "train")
    assert hub.registry.model_name == "model-quantized"


@pytest.mark.parametrize(("argv", "expected"), [
    (["run", "--preset", "gpu-5bit", "--model", "."], "unknown preset; presets: awq-4bit"),
    (["run", "--preset", "gpu-4bit"], "needs --model"),
    (["run", "--preset", "gpu-4bit", "--model", "/no/such/model"], "--model /no/such/model: not a folder"),
    (["run", "--preset", "gpu-4bit", "--model", "MODEL", "--calibration", "/no/such.txt"], "file not found"),
    (["run", "--model", "MODEL"], "--model: only with --preset"),
    (["run", "--preset", "gpu-4bit", "--model", "MODEL", "--set", "recipes.0.method=bnb-5bit"], "bnb-5bit"),
])
def test_bad_preset_command_lines(argv, expected, demo_assets, capsys):
    argv = [str(demo_assets.model_dir) if a == "MODEL" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


# --- end to end: every preset on the demo model (CPU), from the command line ----------------------------------


# The presets' default calibration text and window length, with 8 windows instead of their 128: AWQ on 128 x 512
# tokens takes minutes on a busy 2-core machine, and the test is about the presets running, not their quality;
# for the same reason an eighth of their evaluation tokens and no generation-speed measurement (test_evaluate's).
CHEAPER = ("--set", "calibration.num_samples=8", "--set", "evaluation.max_tokens=2048",
           "--set", "evaluation.speed.enabled=false")


def _cli(home: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return fresh.run_cli(*args, *CHEAPER, cwd=cwd, env=served_env(home), timeout=1500)  # a new process (tests/fresh.py)


@pytest.fixture(scope="module")
def preset_home(tmp_path_factory, demo_assets):
    """One state folder; sweep-small runs first (it computes every preset's variant once)."""
    home, cwd = tmp_path_factory.mktemp("presets-home"), tmp_path_factory.mktemp("presets-cwd")
    out = _cli(home, cwd, "run", "--preset", "sweep-small", "--model", str(demo_assets.model_dir))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return home, cwd, out


def _run_id(stdout: str) -> str:
    return re.search(r"MLflow run: (\w+)", stdout).group(1)


def _client(home: Path):
    import mlflow

    uri = f"sqlite:///{home / 'mlflow.db'}"
    return mlflow.MlflowClient(uri, registry_uri=uri)


@pytest.mark.slow
def test_sweep_small_preset_compares_the_methods(preset_home):
    home, _, out = preset_home
    for variant in ("gptq-w4g128", "awq-w4g128", "bnb-int8", "bnb-nf4", "dynamic-int8"):
        assert re.search(rf"│ {re.escape(variant)} ", out.stdout), out.stdout
    profile = json.loads(Path(_client(home).download_artifacts(_run_id(out.stdout), "profile.json")).read_text())
    assert profile["name"] == "sweep-small" and profile["sweep"]["grid"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cpu-int8", "gpu-8bit", "gpu-4bit", "gptq-4bit", "awq-4bit"])
def test_each_preset_runs_on_the_demo_model(name, preset_home, demo_assets):
    import torch

    home, cwd, _ = preset_home
    extra = ["--set", "recipes=[{method: bnb-4bit}]"] if name == "gpu-4bit" else []  # the alias people type
    out = _cli(home, cwd, "run", "--preset", name, "--model", str(demo_assets.model_dir), *extra)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    method = CANONICAL[name]
    row = [ln for ln in out.stdout.splitlines() if ln.startswith("│ ") and f" {method} " in ln]
    assert len(row) == 1 and " pass " in row[0], out.stdout
    assert re.search(r"quantize\s+cached", out.stdout), out.stdout  # sweep-small computed the same variant
    if name.startswith("gpu-") and not torch.cuda.is_available():
        assert f"note: no CUDA device: {method} run on bitsandbytes' CPU backend" in out.stdout
    client = _client(home)
    run_id = _run_id(out.stdout)
    profile = json.loads(Path(client.download_artifacts(run_id, "profile.json")).read_text())
    assert profile["name"] == name and profile["model"]["path"] == str(demo_assets.model_dir)
    assert [r["method"] for r in profile["recipes"]] == [method]  # bnb-4bit recorded as bnb-nf4
    assert [r["method"] for r in json.loads(client.get_run(run_id).data.params["profile.recipes"])] == [method]
    versions = client.search_model_versions("name='model-quantized'")
    assert method in {mv.tags["method"] for mv in versions}
    assert not any(cwd.iterdir()), list(cwd.iterdir())
