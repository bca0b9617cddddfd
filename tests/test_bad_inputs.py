"""The bad-input catalogue: non-zero exit, one clear line naming the field/file, nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from quantmill import state
from quantmill.flows.cli import main
from tests.conftest import demo_profile

pytestmark = pytest.mark.usefixtures("prefect_ready")


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    """A barely-trained tiny Llama with a LoRA adapter (enough to exercise every check)."""
    return tiny_assets


@pytest.fixture()
def profile(tiny, tmp_path):
    """A valid profile dict whose store lives under tmp_path."""
    return demo_profile(tiny, "bad-input", [{"method": "rtn", "bits": 8, "group_size": 64}],
                        calibration={"num_samples": 4, "seq_len": 64},
                        evaluation={"max_tokens": 1024, "window": 128, "speed": {"enabled": True}},
                        registry={"model_name": f"bad-input-{tmp_path.name}"}, storage={"root": str(tmp_path / "store")})


def fails(tmp_path: Path, data: dict | str, capsys, *expected: str) -> str:
    """Run the CLI on the profile; assert exit 2, one clear last line, no artifact, no registry change."""
    path = tmp_path / "profile.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    before = registry_versions()
    rc = main(["run", str(path)])
    err = capsys.readouterr().err
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert rc == 2, err[-3000:]
    assert last.startswith("error: "), err[-3000:]
    for piece in expected:
        assert piece in last, last
    tmp = tmp_path / "store" / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir()), list(tmp.iterdir())
    assert registry_versions() == before
    return last


def registry_versions() -> int:
    """Number of model versions in the test registry (all models)."""
    import mlflow

    uri = f"sqlite:///{state.home() / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    return len(client.search_model_versions())


def test_yaml_syntax_error(tmp_path, capsys):
    fails(tmp_path, "model:\n  path: [unclosed\n", capsys, "profile.yaml", "line 2")


def test_unknown_key(tmp_path, profile, capsys):
    profile["calibration"]["num_sample"] = 3
    fails(tmp_path, profile, capsys, "calibration.num_sample", "unknown key")


def test_unknown_method(tmp_path, profile, capsys):
    profile["recipes"][0] = {"method": "gtpq"}
    fails(tmp_path, profile, capsys, "recipes.0", "'gtpq'", "known methods:", "gptq", "rtn")


def test_bits_a_method_cannot_do(tmp_path, profile, capsys):
    profile["recipes"][0] = {"method": "bnb-nf4", "bits": 3}
    fails(tmp_path, profile, capsys, "recipes.0", "bits")


def test_group_size_not_dividing_in_features(tmp_path, profile, capsys):
    profile["recipes"][0] = {"method": "rtn", "bits": 8, "group_size": 48}
    fails(tmp_path, profile, capsys, "recipes.0", "group_size=48", "in_features=128")


def test_missing_local_model_path(tmp_path, profile, capsys):
    profile["model"]["path"] = str(tmp_path / "no-such-model")
    fails(tmp_path, profile, capsys, "model.path", "no-such-model", "does not exist")


def test_unreachable_hub_repo_offline(tmp_path, profile, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    profile["model"] = {"repo_id": "quantmill-tests/no-such-model", "revision": "0123456789abcdef"}
    fails(tmp_path, profile, capsys, "quantmill-tests/no-such-model", "offline")


def _other_adapter(tmp_path: Path) -> Path:
    """A LoRA adapter trained for a different (narrower) Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=2048)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    out = tmp_path / "other-adapter"
    model.save_pretrained(out)
    return out


def test_adapter_for_another_base_model(tmp_path, profile, capsys):
    profile["adapter"]["path"] = str(_other_adapter(tmp_path))
    fails(tmp_path, profile, capsys, "adapter:", "base", "differs")


def test_adapter_target_modules_absent(tmp_path, profile, tiny, capsys):
    bad = tmp_path / "gpt2-adapter"
    shutil.copytree(tiny.adapter_dir, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["c_attn", "c_proj"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    profile["adapter"]["path"] = str(bad)
    fails(tmp_path, profile, capsys, "adapter:", "c_attn", "do not exist")


def test_calibration_text_too_short(tmp_path, profile, capsys):
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    profile["calibration"]["source"]["path"] = str(short)
    fails(tmp_path, profile, capsys, "calibration", "fewer than num_samples × seq_len")


def test_seq_len_above_context(tmp_path, profile, capsys):
    profile["calibration"]["seq_len"] = 4096
    fails(tmp_path, profile, capsys, "calibration.seq_len", "4096", "context of 512")


def test_empty_evaluation_text(tmp_path, profile, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    profile["evaluation"]["source"]["path"] = str(empty)
    fails(tmp_path, profile, capsys, "evaluation.source", "no text")


def _copy_model(tiny, dest: Path, pickle: bool = False, remote_code: bool = False) -> Path:
    shutil.copytree(tiny.model_dir, dest)
    if pickle:
        import torch
        from safetensors.torch import load_file

        weights = load_file(dest / "model.safetensors")
        torch.save(weights, dest / "pytorch_model.bin")
        (dest / "model.safetensors").unlink()
    if remote_code:
        cfg = json.loads((dest / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLM"}
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_pickle_only_checkpoint_refused(tmp_path, profile, tiny, capsys):
    profile["model"]["path"] = str(_copy_model(tiny, tmp_path / "pickled", pickle=True))
    fails(tmp_path, profile, capsys, "model.path", "pickle", "allow_pickle: true")


def test_remote_code_refused(tmp_path, profile, tiny, capsys):
    profile["model"]["path"] = str(_copy_model(tiny, tmp_path / "custom", remote_code=True))
    fails(tmp_path, profile, capsys, "model", "trust_remote_code: true")


def test_mlflow_server_unreachable(tmp_path, profile, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setattr("quantmill.tracking.time.sleep", lambda s: None)
    last = fails(tmp_path, profile, capsys, "MLFLOW_TRACKING_URI", "127.0.0.1:9", "after 4 attempts")
    assert "unset the variable" in last


def test_disk_too_small(tmp_path, profile, capsys, monkeypatch):
    monkeypatch.setattr("quantmill.inputs.free_bytes", lambda path: 1000)
    fails(tmp_path, profile, capsys, "storage.root", "bytes free", "needs about")


def test_hf_token_never_logged_or_tracked(tmp_path, profile, capsys, caplog, monkeypatch):
    secret = "hf_quantmillTESTsecret0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    profile["recipes"] = [{"method": "bnb-nf4"}]
    profile["evaluation"]["speed"] = {"enabled": False}
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    assert main(["run", str(path)]) == 0
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err + caplog.text
    import mlflow

    uri = f"sqlite:///{state.home() / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(profile["registry"]["model_name"]).experiment_id])
    assert runs
    for run in runs:
        blob = str(run.data.params) + str(run.data.tags)
        assert secret not in blob
    for mv in client.search_model_versions(f"name='{profile['registry']['model_name']}'"):
        assert secret not in str(mv.tags)


# ---------- issue 13: integrity at the boundary, early checks, honest records ----------


def stored_objects(tmp_path: Path) -> list[str]:
    """Names of the artifacts committed to the test store."""
    objects = tmp_path / "store" / "objects"
    return sorted(p.name for p in objects.iterdir()) if objects.exists() else []


def _truncated_model(tiny, dest: Path) -> Path:
    shutil.copytree(tiny.model_dir, dest)
    weights = dest / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    return dest


def test_truncated_base_with_adapter_is_named_and_nothing_cached(tmp_path, profile, tiny, capsys):
    profile["model"]["path"] = str(_truncated_model(tiny, tmp_path / "half"))
    fails(tmp_path, profile, capsys, "model.path", str(tmp_path / "half" / "model.safetensors"), "truncated")
    assert stored_objects(tmp_path) == []


def test_truncated_base_without_adapter_is_named(tmp_path, profile, tiny, capsys):
    profile["model"]["path"] = str(_truncated_model(tiny, tmp_path / "half"))
    profile.pop("adapter")
    fails(tmp_path, profile, capsys, "model.path", "model.safetensors", "truncated")
    assert stored_objects(tmp_path) == []


def test_model_folder_without_tokenizer(tmp_path, profile, tiny, capsys):
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(tiny.model_dir, bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    profile["model"]["path"] = str(bare)
    last = fails(tmp_path, profile, capsys, "model.path", "no tokenizer files", "tokenizer.json", "tokenizer.model")
    assert "Traceback" not in capsys.readouterr().err
    assert "vocab.json + merges.txt" in last
    assert stored_objects(tmp_path) == []


def _adapter_with(tmp_path: Path, tiny, **cfg_changes) -> Path:
    bad = tmp_path / "adapter"
    shutil.copytree(tiny.adapter_dir, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg.update(cfg_changes)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    return bad


def test_adapter_rank_zero_refused(tmp_path, profile, tiny, capsys):
    profile["adapter"]["path"] = str(_adapter_with(tmp_path, tiny, r=0))
    fails(tmp_path, profile, capsys, "adapter", "r: 0", "adapter_config.json", "positive LoRA rank")
    assert stored_objects(tmp_path) == []


def test_adapter_rank_disagreeing_with_tensors_refused(tmp_path, profile, tiny, capsys):
    from safetensors import safe_open

    with safe_open(str(tiny.adapter_dir / "adapter_model.safetensors"), "pt") as f:
        rank = f.get_slice(next(k for k in f.keys() if "lora_A" in k)).get_shape()[0]
    profile["adapter"]["path"] = str(_adapter_with(tmp_path, tiny, r=rank + 1))
    fails(tmp_path, profile, capsys, "adapter: r:", f"declares rank {rank + 1}", f"tensors have rank {rank}")
    assert not [name for name in stored_objects(tmp_path) if name.startswith("merge-")]


def test_set_override_error_names_the_set(tmp_path, profile, capsys):
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    assert main(["run", str(path), "--set", "calibration.num_samples=abc"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --set calibration.num_samples=abc: calibration.num_samples:"), last
    assert str(path) not in last


def test_validate_checks_local_paths(tmp_path, profile, capsys):
    path = tmp_path / "profile.yaml"
    profile["model"]["path"] = str(tmp_path / "no-such-model")
    path.write_text(yaml.safe_dump(profile))
    assert main(["validate", str(path)]) == 2
    assert "model.path" in capsys.readouterr().err.strip().splitlines()[-1]
    profile["model"]["path"] = str(Path(profile["adapter"]["path"]))  # a folder, but no config.json
    path.write_text(yaml.safe_dump(profile))
    assert main(["validate", str(path)]) == 2
    assert "has no config.json" in capsys.readouterr().err.strip().splitlines()[-1]


def test_validate_missing_eval_file(tmp_path, profile, tiny, capsys):
    path = tmp_path / "profile.yaml"
    profile["evaluation"]["source"]["path"] = str(tmp_path / "gone.txt")
    path.write_text(yaml.safe_dump(profile))
    assert main(["validate", str(path)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "evaluation.source.path" in last and "gone.txt" in last and "does not exist" in last


def test_missing_eval_file_fails_before_heavy_steps(tmp_path, profile, capsys):
    profile["evaluation"]["source"]["path"] = str(tmp_path / "gone.txt")
    fails(tmp_path, profile, capsys, "evaluation.source.path", "gone.txt", "does not exist")
    assert stored_objects(tmp_path) == []  # neither merge nor calibration ran


def test_short_calibration_fails_before_merge(tmp_path, profile, capsys):
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    profile["calibration"]["source"]["path"] = str(short)
    fails(tmp_path, profile, capsys, "calibration", "fewer than num_samples × seq_len")
    assert stored_objects(tmp_path) == []  # the merge did not run


def _runs(model_name: str) -> list:
    import mlflow

    uri = f"sqlite:///{state.home() / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name(model_name)
    return client.search_runs([exp.experiment_id]) if exp else []


def test_failed_run_ends_its_mlflow_run_failed(tmp_path, profile, capsys):
    """A failure after the MLflow run started (the merge refuses the adapter): the run ends FAILED with the error."""
    profile["adapter"]["path"] = str(_other_adapter(tmp_path))
    last = fails(tmp_path, profile, capsys, "adapter:", "differs")
    runs = _runs(profile["registry"]["model_name"])
    assert len(runs) == 1
    assert runs[0].info.status == "FAILED"
    assert "differs from this model" in runs[0].data.tags["quantmill.error"]
    assert last.removeprefix("error: ") in runs[0].data.tags["quantmill.error"]


def _can_mount() -> bool:
    import subprocess

    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs `unshare -m` and mount (root or user namespaces) "
                                                          "to give storage.root a read-only or tiny filesystem")


def fails_on_mount(tmp_path: Path, profile: dict, mount: str, *expected: str) -> str:
    """Run the CLI in its own mount namespace where `mount` (shell, $M = tmp_path/mnt) ran first; assert one line."""
    import subprocess
    import sys

    from tests.conftest import REPO, subprocess_env

    mnt, home = tmp_path / "mnt", tmp_path / "home"
    mnt.mkdir()
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    script = f'M="$0"; {mount} && exec "$@"'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, str(mnt), sys.executable, "-m", "quantmill.flows.cli", "run",
                           str(path)], cwd=REPO, env=subprocess_env(home), capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]  # the server's goodbye may follow
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for piece in expected:
        assert piece in lines[-1], lines[-1]
    import mlflow

    uri = f"sqlite:///{home / 'mlflow.db'}"
    if (home / "mlflow.db").exists():
        assert mlflow.MlflowClient(uri, registry_uri=uri).search_model_versions() == []
    return lines[-1]


@needs_mount
def test_storage_root_read_only(tmp_path, profile):
    profile["storage"]["root"] = str(tmp_path / "mnt" / "store")
    fails_on_mount(tmp_path, profile, 'mount -t tmpfs -o size=1m tmpfs "$M" && mount -o remount,ro,bind "$M"',
                   "storage.root", str(tmp_path / "mnt" / "store"), "not writable", "Read-only file system")


@needs_mount
def test_disk_full_checked_before_download_and_merge(tmp_path, profile):
    """A 256 KiB storage.root: the plan (headers) says the merged model alone will not fit, before anything runs."""
    profile["storage"]["root"] = str(tmp_path / "mnt" / "store")
    fails_on_mount(tmp_path, profile, 'mount -t tmpfs -o size=256k tmpfs "$M"', "storage.root", "bytes free",
                   "needs about")


def test_optional_autoround_missing(tmp_path, profile, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "auto_round", None)  # the optional extra is not installed
    profile["recipes"][0] = {"method": "autoround", "bits": 4, "group_size": 64}
    fails(tmp_path, profile, capsys, "recipes.0", "auto-round", "pip install")
