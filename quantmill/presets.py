"""Deployment presets (profiles/presets/*.yaml): a ready profile whose model comes from the command line.

`quantmill run --preset gpu-4bit --model ./my-model [--adapter ./lora] [--calibration FILE|DATASET]` fills
the model, adapter, calibration and registry name into the preset, applies `--set` overrides and validates
the result like any profile; the resolved profile is what the run records in MLflow (profile.json, params).

The default calibration and evaluation text is the Python documentation that ships with every Python
(`pydoc_data.topics`, the demo's topic split: evaluation topics held out), written once into
`$QUANTMILL_HOME/presets/`, so a preset runs offline.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from quantmill import state
from quantmill.errors import ProfileError

PRESETS = Path(__file__).resolve().parents[1] / "profiles" / "presets"
HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)@(?P<rev>[\w.-]+)$")
TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")
GPU_METHODS = ("bnb-int8", "bnb-nf4", "bnb-fp4")


def available() -> dict[str, Path]:
    """Preset name -> file."""
    return {p.stem: p for p in sorted(PRESETS.glob("*.yaml"))}


def summary(path: Path) -> str:
    """A preset's one-line description (its first comment line)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def preset_file(name: str) -> Path:
    """The preset's YAML file, or one line listing the presets."""
    found = available()
    if name not in found:
        raise ProfileError(f"--preset {name!r}: unknown preset; presets: {', '.join(found)} (see `quantmill presets`)")
    return found[name]


def default_texts() -> tuple[Path, Path]:
    """The offline calibration and evaluation text files (written once, atomically)."""
    from quantmill.demo_corpus import demo_text_splits

    folder = state.home() / "presets"
    calib, evaluation = folder / "python-docs-calib.txt", folder / "python-docs-eval.txt"
    if not (calib.is_file() and evaluation.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        splits = demo_text_splits()
        for path, text in ((calib, splits["train"] + "\n\n" + splits["calib"]), (evaluation, splits["eval"])):
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
    return calib, evaluation


def model_source(text: str, flag: str = "--model") -> dict[str, Any]:
    """A local folder, or OWNER/NAME@REVISION on the Hugging Face hub."""
    path = Path(text).expanduser()
    if path.is_dir():
        return {"path": str(path.resolve())}
    m = HUB_REF.match(text)
    if m:
        return {"repo_id": m.group("repo"), "revision": m.group("rev")}
    raise ProfileError(
        f"{flag} {text}: not a folder, nor OWNER/NAME@REVISION (a hub model pinned to a commit or tag); fix the path"
    )


def calibration_source(text: str) -> dict[str, Any]:
    """A local .txt/.jsonl/.csv file, or a hub dataset as NAME[:CONFIG[:SPLIT[:TEXT_FIELD]]]."""
    path = Path(text).expanduser()
    if path.is_file():
        return {"path": str(path.resolve())}
    if path.suffix.lower() in TEXT_SUFFIXES or os.sep in text:
        raise ProfileError(f"--calibration {text}: file not found; give an existing .txt/.jsonl/.csv file or a dataset")
    name, config, split, field = (text.split(":") + [None, None, None])[:4]
    out: dict[str, Any] = {"dataset": name}
    if config:
        out["config"] = config
    if split:
        out["split"] = split
    if field:
        out["text_field"] = field
    return out


def model_name(source: dict[str, Any]) -> str:
    """Registry name from the model: its folder or repo name plus '-quantized'."""
    base = Path(source["path"]).name if "path" in source else source["repo_id"].split("/")[-1]
    return re.sub(r"[^\w.-]", "-", base) + "-quantized"


def resolve(
    name: str, *, model: str, adapter: str | None = None, calibration: str | None = None,
    overrides: list[str] | None = None,
) -> Any:
    """The preset with the command line's model, adapter, calibration and `--set` overrides, validated."""
    from quantmill.profile_io import apply_overrides, parse_profile

    path = preset_file(name)
    data = yaml.safe_load(path.read_text())
    calib_text, eval_text = default_texts()
    data["calibration"]["source"] = calibration_source(calibration) if calibration else {"path": str(calib_text)}
    data["evaluation"]["source"] = {"path": str(eval_text)}
    data["model"] = model_source(model)
    if adapter:
        data["adapter"] = model_source(adapter, "--adapter")
    data["registry"]["model_name"] = model_name(data["model"])
    return parse_profile(apply_overrides(data, overrides or []), f"preset {name}")


def device_note(profile: Any) -> str | None:
    """One line when a GPU preset falls back to the CPU (bitsandbytes' CPU backend: slow on large models)."""
    if profile.device not in ("auto", "cpu"):
        return None
    import torch

    if profile.device == "auto" and torch.cuda.is_available():
        return None
    recipes, _ = profile.all_recipes()
    gpu = sorted({r.method for r in recipes if r.method in GPU_METHODS})
    if not gpu:
        return None
    return (f"note: no CUDA device: {', '.join(gpu)} run on bitsandbytes' CPU backend "
            "(fine for small models, slow for large ones; the checkpoints load on a GPU as usual)")
