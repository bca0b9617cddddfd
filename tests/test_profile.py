"""Profile validation: bad profiles fail before any work with file, field path and reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantmill.errors import ProfileError
from quantmill.profile_io import load_profile
from tests.conftest import REPO


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
    assert prof.recipes[0].config().to_dict() == {"type": "rtn", "version": 1, "group_size": 32, "bits": 4, "sym": True}


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
        [sys.executable, "-m", "quantmill.flows.cli", "validate", str(path)], capture_output=True, text=True, cwd=REPO
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


# --- The JSON schema: what the Prefect run form renders and what the server validates parameters with ---


def flow_schema() -> dict:
    """The quantize deployment's parameter schema, built the way `prefect deploy` builds it."""
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    return parameter_schema_from_entrypoint("quantmill.flows.pipeline.quantize_pipeline").model_dump_for_openapi()


def server_errors(profile: dict, schema: dict) -> list[str]:
    """What Prefect's server-side validation (enforce_parameter_schema) says about a profile."""
    from prefect.utilities.schema_tools.validation import validate

    return [e.message for e in validate({"profile": profile}, schema)]


def recipe_branches(schema: dict) -> dict[str, dict]:
    """The recipe schema's branches by method name."""
    defs = schema.get("definitions") or schema["$defs"]
    return {b["properties"]["method"]["const"]: b for b in defs["Recipe"]["anyOf"]}


def test_schema_offers_every_registered_method_with_its_own_options():
    from quantmill.methods import known_methods

    schema = flow_schema()
    branches = recipe_branches(schema)
    assert sorted(branches) == known_methods() and {"gptq", "awq", "rtn", "bnb-nf4"} <= set(branches)
    required = set(schema["definitions"]["Profile"]["required"])
    assert {"model", "calibration", "recipes", "evaluation", "registry"} <= required
    for name, branch in branches.items():
        assert branch["title"] == name and branch["required"][0] == "method"
        assert branch["properties"]["method"]["enum"] == [name]
        assert branch["additionalProperties"] is False
    gptq = branches["gptq"]["properties"]
    assert {"bits", "group_size", "sym", "desc_act", "damp_percent", "kernel", "mixed_precision", "name"} <= set(gptq)
    assert gptq["bits"]["enum"] == [2, 3, 4, 8] and gptq["bits"]["default"] == 4
    assert gptq["damp_percent"]["exclusiveMinimum"] == 0 and gptq["damp_percent"]["exclusiveMaximum"] == 1
    assert "desc_act" not in branches["awq"]["properties"]
    assert branches["awq"]["properties"]["backend"]["enum"] == ["gptqmodel", "autoawq"]
    assert branches["awq"]["properties"]["bits"]["enum"] == [4]
    assert branches["bnb-nf4"]["properties"]["bits"]["enum"] == [4]
    assert branches["bnb-int8"]["properties"]["bits"]["enum"] == [8]


def test_every_field_of_the_form_has_a_description():
    schema = flow_schema()
    missing = []
    for def_name, definition in schema["definitions"].items():
        objects = [(def_name, definition)] + [(f"{def_name}[{b['title']}]", b) for b in definition.get("anyOf", [])]
        for where, obj in objects:
            missing += [f"{where}.{k}" for k, v in obj.get("properties", {}).items() if not v.get("description")]
    assert missing == []


def test_usually_given_paths_are_plain_text_and_storage_keeps_its_placeholder(tmp_path, monkeypatch):
    schema = flow_schema()
    defs = schema["definitions"]
    assert defs["Source"]["properties"]["path"] == {
        "type": "string", "title": "Path", "description": defs["Source"]["properties"]["path"]["description"]}
    assert defs["TextSource"]["properties"]["path"]["type"] == "string"
    assert defs["Storage"]["properties"]["root"]["default"] == "${QUANTMILL_HOME}/artifacts"
    assert "default" not in defs["Profile"]["properties"]["storage"]  # no instance expanded where the schema is built
    # The placeholder is expanded when a profile is validated: in a flow run, with the worker's environment.
    monkeypatch.setenv("QUANTMILL_HOME", str(tmp_path / "worker"))
    assert load_profile(write(tmp_path, base_profile(tmp_path))).storage.root == str(tmp_path / "worker" / "artifacts")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["recipes"][0].update(method="gtpq"),
        lambda d: d["recipes"][0].update(bitz=4),
        lambda d: d.update(recipes=[{"method": "rtn", "params": {"bitz": 4}}]),
        lambda d: d["recipes"][0].update(bits=5),
        lambda d: d.update(recipes=[{"method": "awq", "bits": 8}]),
        lambda d: d.update(recipes=[{"method": "bnb-nf4", "bits": 8}]),
        lambda d: d.update(recipes=[]),
        lambda d: d.pop("recipes"),
        lambda d: d.update(recipes=[{"method": "gptq", "damp_percent": 1.5}]),
    ],
    ids=["method-typo", "unknown-option", "unknown-param", "rtn-bits-5", "awq-bits-8", "nf4-bits-8", "no-recipes",
         "recipes-missing", "out-of-bounds"],
)
def test_schema_refuses_what_profile_validation_refuses(tmp_path, mutate):
    data = base_profile(tmp_path)
    mutate(data)
    with pytest.raises(ProfileError):
        load_profile(write(tmp_path, data))
    assert server_errors(data, flow_schema()) != []


def test_schema_accepts_both_yaml_spellings_and_the_demo_profile(tmp_path):
    schema = flow_schema()
    data = base_profile(tmp_path)
    data["recipes"] = [{"method": "rtn", "bits": 4, "group_size": 32},
                       {"method": "gptq", "name": "g", "params": {"bits": 8, "desc_act": True}},
                       {"method": "bnb-nf4", "compute_dtype": "float16"}]
    assert server_errors(data, schema) == []
    load_profile(write(tmp_path, data))
    grid_only = {**base_profile(tmp_path), "recipes": [], "sweep": {"grid": [{"methods": ["rtn"], "bits": [4, 8]}]}}
    assert server_errors(grid_only, schema) == []
    load_profile(write(tmp_path, grid_only))
    assert server_errors({**grid_only, "sweep": {"grid": []}}, schema) != []
    assert server_errors(yaml.safe_load((REPO / "profiles" / "demo.yaml").read_text()), schema) == []


def test_a_newly_registered_method_appears_in_the_form_without_touching_profile_code(tmp_path, monkeypatch):
    from typing import Literal

    from pydantic import Field

    from quantmill.methods import registry

    class ToyConfig(registry.MethodConfig):
        """A test-only method."""

        bits: Literal[3, 5] = Field(5, description="Bits per weight")
        smoothing: float = Field(0.5, ge=0, le=1, description="Smoothing factor")

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))

    @registry.register_method("toy-q", ToyConfig)
    def quantize_toy(config, job):
        """Toy quantizer (never run)."""

    schema = flow_schema()
    toy = recipe_branches(schema)["toy-q"]
    assert toy["description"] == "Toy quantizer (never run)."
    assert toy["properties"]["smoothing"] == {"default": 0.5, "description": "Smoothing factor", "maximum": 1,
                                              "minimum": 0, "title": "Smoothing", "type": "number"}
    data = base_profile(tmp_path)
    data["recipes"] = [{"method": "toy-q", "bits": 3, "smoothing": 0.25}]
    assert server_errors(data, schema) == []
    assert load_profile(write(tmp_path, data)).recipes[0].name == "toy-q-w3"
    data["recipes"][0]["smoothing"] = 2
    assert server_errors(data, schema) != []
