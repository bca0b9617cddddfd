"""Unchanged inputs are checked once: the text check's and the model check's answers are kept in the state folder
(quantmill.memo) keyed by content, so a rerun's checks load no tokenizer and build no model, and a changed file is
checked again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

from quantmill.errors import QuantmillError
from quantmill.inputs import check_run_inputs
from quantmill.modelinfo import model_info
from quantmill.profile import Profile
from tests.conftest import demo_profile, python_script

# In a fresh process: the run's input checks and the preflight's model facts, then whether they imported transformers
# (torch they do: the disk check asks it for a CUDA device, and every run's steps load it anyway).
RECHECK = """
import json, sys
from pathlib import Path
from quantmill.inputs import check_run_inputs
from quantmill.modelinfo import model_info
from quantmill.profile import Profile
profile = Profile.model_validate(json.loads(Path(sys.argv[1]).read_text()))
check_run_inputs(profile)
info = model_info(Path(profile.model.path))
print("RESULT" + json.dumps({"linears": len(info.linear_in_features),
                             "transformers": "transformers" in sys.modules}))
"""


@pytest.fixture()
def setup(tiny_assets, tmp_path, monkeypatch):
    """A model folder and texts of our own (so the test may change them), a fresh state folder, a valid profile."""
    home = tmp_path / "home"
    monkeypatch.setenv("QUANTMILL_HOME", str(home))
    model = Path(shutil.copytree(tiny_assets.model_dir, tmp_path / "model"))
    calib = Path(shutil.copy2(tiny_assets.calib_path, tmp_path / "calib.txt"))
    data = demo_profile(tiny_assets, "memo", [{"method": "rtn", "bits": 8, "group_size": 64}], adapter=None,
                        model={"path": str(model)}, calibration={"source": {"path": str(calib)}, "num_samples": 4,
                                                                  "seq_len": 64},
                        evaluation={"max_tokens": 1024, "window": 128}, storage={"root": str(tmp_path / "store")})
    return home, model, calib, data


def recheck(data: dict, home: Path, tmp_path: Path) -> dict:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    env = {**os.environ, "QUANTMILL_HOME": str(home)}
    proc = subprocess.run(python_script(RECHECK, str(path)), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def test_unchanged_inputs_are_answered_without_tokenizer_or_model(setup, tmp_path):
    home, model, _, data = setup
    profile = Profile.model_validate(data)
    check_run_inputs(profile)
    first = model_info(model)
    assert sorted(p.parent.name for p in (home / "checked").glob("*/*.json")) == ["model-info", "texts"]
    again = recheck(data, home, tmp_path)
    assert again == {"linears": len(first.linear_in_features), "transformers": False}, again


def test_changed_files_are_checked_again(setup, tmp_path):
    home, model, calib, data = setup
    check_run_inputs(Profile.model_validate(data))
    before = asdict(model_info(model))
    # the same calibration path, now too short: checked again (by content), not answered from the last run
    calib.write_text("def f(): pass\n")
    with pytest.raises(QuantmillError, match="fewer than num_samples"):
        check_run_inputs(Profile.model_validate(data))
    with pytest.raises(QuantmillError, match="fewer than num_samples"):  # a failed check is not kept
        check_run_inputs(Profile.model_validate(data))
    # one more decoder layer in config.json: its linears are read again
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (model / "config.json").write_text(json.dumps(config))
    after = asdict(model_info(model))
    per_layer = len(before["linear_in_features"]) // (config["num_hidden_layers"] - 1)
    assert len(after["linear_in_features"]) == len(before["linear_in_features"]) + per_layer


def test_unreadable_answer_is_recomputed(setup):
    home, model, _, _ = setup
    first = asdict(model_info(model))
    (kept,) = (home / "checked" / "model-info").glob("*.json")
    kept.write_text("{not json")
    assert asdict(model_info(model)) == first
    assert json.loads(kept.read_text())["answer"] == first
