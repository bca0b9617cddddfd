"""Profile validation: bad profiles fail before any work with file, field path and reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantmill.errors import ProfileError
from quantmill.profile import load_profile

REPO = Path(__file__).resolve().parents[1]


def base_profile(tmp_path: Path) -> dict:
    """A valid profile pointing at files under tmp_path."""
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "calib.txt").write_text("hello world\n")
    (tmp_path / "eval.txt").write_text("held out\n")
    return {
        "model": {"path": str(tmp_path / "model")},
        "calibration": {"source": {"path": str(tmp_path / "calib.txt")}, "num_samples": 4, "seq_len": 16},
        "recipes": [{"method": "rtn", "bits": 4, "group_size": 32}],
        "evaluation": {"source": {"path": str(tmp_path / "eval.txt")}},
        "registry": {"model_name": "m"},
    }


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "profile.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_valid_profile_round_trips(tmp_path):
    prof = load_profile(write(tmp_path, base_profile(tmp_path)))
    assert prof.recipes[0].name == "rtn-w4g32"
    assert prof.recipes[0].config().to_dict()["type"] == "rtn"
    assert prof.recipes[0].config().to_dict()["version"] >= 1


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["model"].update(colour="red"), "model.colour: unknown key"),
        (lambda d: d.update(extra_section={}), "extra_section: unknown key"),
        (lambda d: d["recipes"][0].update(method="nope"), "unknown quantization method 'nope'; known methods: "),
        (lambda d: d["recipes"][0].update(bitz=4), "recipes.0: bitz: unknown option for method 'rtn'"),
        (lambda d: d["recipes"][0].update(bits=5), "recipes.0: bits"),
        (lambda d: d.update(recipes=[]), "recipes: "),
        (lambda d: d["calibration"].update(num_samples=0), "calibration.num_samples: "),
        (lambda d: d.update(model={"repo_id": "org/model"}), "pinned 'revision'"),
        (lambda d: d.update(model={"repo_id": "org/m", "revision": "abc", "path": "/x"}), "exactly one of"),
        (lambda d: d["evaluation"]["source"].update(path="/x/eval.parquet"), "use a .txt, .jsonl or .csv file"),
        (lambda d: d.pop("registry"), "registry: required field is missing"),
        (lambda d: d["recipes"].append({"method": "rtn", "bits": 4, "group_size": 32}), "recipe names must be unique"),
    ],
)
def test_bad_profiles_name_file_and_field(tmp_path, mutate, expected):
    data = base_profile(tmp_path)
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    msg = str(err.value)
    assert msg.startswith(str(path)), msg
    assert expected in msg, msg
    assert "\n" not in msg


def test_yaml_syntax_error_has_line_number(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  path: /x\nrecipes: [\n  - method: rtn\n")
    with pytest.raises(ProfileError, match=r"bad.yaml: YAML error at line \d+"):
        load_profile(p)


def test_set_overrides_dotted_keys_and_list_indexes(tmp_path):
    path = write(tmp_path, base_profile(tmp_path))
    prof = load_profile(path, ["recipes.0.bits=8", "calibration.seed=7", "registry.model_name=other"])
    assert prof.recipes[0].params["bits"] == 8 and prof.recipes[0].name == "rtn-w8g32"
    assert prof.calibration.seed == 7 and prof.registry.model_name == "other"
    with pytest.raises(ProfileError, match="recipes.5"):
        load_profile(path, ["recipes.5.bits=8"])


def test_cli_validate_exits_nonzero_with_one_line(tmp_path):
    data = base_profile(tmp_path)
    data["recipes"][0]["method"] = "nope"
    path = write(tmp_path, data)
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "validate", str(path)], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "unknown quantization method 'nope'" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_demo_profile_is_valid(monkeypatch):
    monkeypatch.setenv("QUANTMILL_DEMO", "/nonexistent-demo")
    prof = load_profile(REPO / "profiles" / "demo.yaml")
    assert {r.method for r in prof.recipes} >= {"rtn", "bnb-int8", "bnb-nf4"}
    assert prof.model.path == "/nonexistent-demo/model"
