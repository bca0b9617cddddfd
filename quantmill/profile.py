"""Run profiles: strict pydantic models loaded from YAML, with `--set` overrides."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantmill.errors import ProfileError

HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Strict(BaseModel):
    """Base for profile sections: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def expand(path: str) -> str:
    """Expand ${VARS} and ~ in a path-like string (${QUANTMILL_HOME} defaults to the state folder)."""
    from quantmill import state

    for var in ("${QUANTMILL_HOME}", "$QUANTMILL_HOME"):
        path = path.replace(var, str(state.home()))  # also in processes nobody configured (e.g. a worker's run)
    return os.path.expanduser(os.path.expandvars(path))


class Source(Strict):
    """A Hugging Face repo id at a pinned revision, or a local directory."""

    repo_id: str | None = None
    revision: str | None = None
    path: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> "Source":
        if (self.repo_id is None) == (self.path is None):
            raise ValueError("give exactly one of 'repo_id' (Hugging Face) or 'path' (local directory)")
        if self.repo_id is not None:
            if not HF_REPO.match(self.repo_id):
                raise ValueError(f"repo_id {self.repo_id!r} is not of the form 'owner/name'")
            if not self.revision:
                raise ValueError("a hub model needs a pinned 'revision' (commit sha or tag) for reproducible runs")
        if self.path is not None:
            self.path = expand(self.path)
        return self

    @property
    def label(self) -> str:
        """Human-readable origin."""
        return f"{self.repo_id}@{self.revision}" if self.repo_id else str(self.path)


class TextSource(Strict):
    """Text from a local .txt/.jsonl/.csv file or a Hugging Face dataset."""

    path: str | None = None
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    @model_validator(mode="after")
    def _one_of(self) -> "TextSource":
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'path' (local .txt/.jsonl/.csv) or 'dataset' (hub dataset name)")
        if self.path is not None:
            self.path = expand(self.path)
            if Path(self.path).suffix.lower() not in {".txt", ".jsonl", ".csv"}:
                raise ValueError(f"path {self.path!r}: use a .txt, .jsonl or .csv file")
        return self

    @property
    def label(self) -> str:
        """Human-readable origin."""
        return self.path or f"{self.dataset}/{self.config or ''}:{self.split}[{self.text_field}]"


class Calibration(Strict):
    """How calibration windows are drawn."""

    source: TextSource
    num_samples: int = Field(64, gt=0, le=100_000)
    seq_len: int = Field(128, gt=0)
    seed: int = 0


class Gates(Strict):
    """Quality gates; unset bounds use per-method defaults (perplexity) or are not checked."""

    max_ppl_increase_pct: float | None = Field(None, ge=0)
    max_kl: float | None = Field(None, ge=0)
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    max_size_bytes: int | None = Field(None, gt=0)
    min_compression: float | None = Field(None, gt=0)
    max_latency_ms_p50: float | None = Field(None, gt=0)
    max_latency_ms_p95: float | None = Field(None, gt=0)
    max_accuracy_drop: float | None = Field(None, ge=0, le=1)


class Evaluation(Strict):
    """Held-out evaluation text, what is measured besides perplexity, and gates."""

    class Speed(Strict):
        """Generation-speed measurement (greedy decoding of prompts cut from the eval windows)."""

        enabled: bool = True
        batch_sizes: list[int] = Field([1, 8], min_length=1)
        prompt_tokens: int = Field(32, gt=0)
        new_tokens: int = Field(32, gt=1)
        warmup: int = Field(1, ge=0)
        repeats: int = Field(3, gt=0)

        @field_validator("batch_sizes")
        @classmethod
        def _positive(cls, v: list[int]) -> list[int]:
            if any(b < 1 for b in v):
                raise ValueError("batch sizes must be positive integers, e.g. [1, 8]")
            return sorted(set(v))

    class Accuracy(Strict):
        """Labelled examples in a CSV, scored by the log-likelihood of each choice."""

        path: str
        question_field: str = "question"
        choices_field: str = "choices"
        answer_field: str = "answer"
        labels: list[str] | None = Field(None, min_length=2)
        max_examples: int = Field(1000, gt=0)

        @field_validator("path")
        @classmethod
        def _csv(cls, v: str) -> str:
            v = expand(v)
            if Path(v).suffix.lower() != ".csv":
                raise ValueError(f"path {v!r}: use a .csv file (question, choices, answer columns)")
            return v

    class LmEval(Strict):
        """lm-evaluation-harness tasks (run only when `lm_eval` and the task data are available)."""

        tasks: list[str] = Field(min_length=1)
        num_fewshot: int = Field(0, ge=0)
        limit: int | None = Field(None, gt=0)

    source: TextSource
    max_tokens: int = Field(16384, gt=0)
    window: int | None = Field(None, gt=1)
    stride: int | None = Field(None, gt=0)
    kl_topk: int = Field(128, gt=0)
    batch_size: int = Field(8, gt=0)
    speed: Speed | None = Speed()
    accuracy: Accuracy | None = None
    lm_eval: LmEval | None = None
    gates: Gates = Gates()
    method_gates: dict[str, Gates] = {}

    @model_validator(mode="after")
    def _stride(self) -> "Evaluation":
        if self.stride is not None and self.window is not None and self.stride > self.window:
            raise ValueError(f"stride {self.stride} exceeds window {self.window}; use stride <= window")
        return self


class Registry(Strict):
    """Where passing variants are registered."""

    model_name: str = Field(min_length=1)
    aliases: list[str] = ["candidate", "champion"]
    champion_objective: Literal["smallest_size", "lowest_perplexity"] = "smallest_size"

    @field_validator("model_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[\w.-]+$", v):
            raise ValueError("use letters, digits, '.', '_' or '-'")
        return v


class Storage(Strict):
    """Artifact store root: a local folder or an fsspec URL (s3://, gs://, file://...) shared by workers."""

    root: str = Field("${QUANTMILL_HOME}/artifacts", validate_default=True)
    keep: Literal["all", "registered"] = "all"  # registered: drop unregistered variants' checkpoints when a run ends

    @field_validator("root")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand(v)


class Recipe(Strict):
    """One variant: a registered method and its parameters (validated by the method's config)."""

    method: str
    name: str | None = None
    params: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _collect(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = {"method", "name", "params"}
            extra = {k: v for k, v in data.items() if k not in known}
            data = {k: v for k, v in data.items() if k in known}
            data["params"] = {**data.get("params", {}), **extra}
        return data

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        from tasks.quantize import build_config, get_method

        self.method = get_method(self.method).name  # an alias (e.g. bnb-4bit) is recorded as its canonical name
        config = build_config(self.method, self.params)
        self.params = config.model_dump(mode="json")
        if self.name is None:
            self.name = config.variant_name()
        return self

    def config(self):  # noqa: ANN201 - MethodConfig, imported lazily
        """The method's typed config."""
        from tasks.quantize import build_config

        return build_config(self.method, self.params)


class Sweep(Strict):
    """A grid of recipes (methods x bits x group sizes) and the task runner the sweep fans them out on."""

    class Grid(Strict):
        """One block of the grid; an axis a method does not have (e.g. bits of bnb-nf4) is ignored for it."""

        methods: list[str] = Field(min_length=1)
        bits: list[int] = []
        group_sizes: list[int] = []
        params: dict[str, Any] = {}

        @field_validator("methods")
        @classmethod
        def _known(cls, v: list[str]) -> list[str]:
            from tasks.quantize import get_method

            for name in v:
                get_method(name)  # an unknown name lists the known ones
            return v

    class Runner(Strict):
        """Threads in the flow process (default), or Dask: a local cluster, or a scheduler `address`."""

        kind: Literal["threads", "dask"] = "threads"
        max_workers: int = Field(2, gt=0)
        address: str | None = None
        threads_per_worker: int = Field(1, gt=0)
        memory_limit: str | None = None

        @model_validator(mode="after")
        def _address(self) -> "Sweep.Runner":
            if self.address is not None and self.kind != "dask":
                raise ValueError("address is a Dask scheduler address; set kind: dask")
            return self

    grid: list[Grid] = []
    runner: Runner = Runner()

    def expand(self) -> tuple[list["Recipe"], list[str]]:
        """Recipes of the grid, and one line per combination a method cannot do (skipped, reported)."""
        from itertools import product

        from tasks.quantize import get_method

        recipes: dict[str, Recipe] = {}
        skipped: list[str] = []
        for block in self.grid:
            for method in block.methods:
                axes = get_method(method).config_cls.SWEEP_AXES
                bits = block.bits if "bits" in axes and block.bits else [None]
                groups = block.group_sizes if "group_size" in axes and block.group_sizes else [None]
                for b, g in product(bits, groups):
                    params = {**block.params, **({"bits": b} if b is not None else {}),
                              **({"group_size": g} if g is not None else {})}
                    try:
                        recipe = Recipe(method=method, params=params)
                    except ValidationError as exc:
                        skipped.append(f"{method} {params}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}")
                        continue
                    if recipe.name in recipes and recipes[recipe.name].params != recipe.params:
                        skipped.append(f"{method} {params}: same name as an earlier grid recipe ({recipe.name}); "
                                       "list it under recipes with its own name")
                        continue
                    recipes.setdefault(recipe.name, recipe)
        return list(recipes.values()), skipped


class Merge(Strict):
    """How a LoRA adapter is merged: memory strategy, failure policy, and the base a QLoRA adapter merges into."""

    strategy: Literal["auto", "gpu", "cpu", "streaming"] = "auto"
    on_failure: Literal["stop", "skip_merge"] = "stop"
    qlora_merge: Literal["full_precision", "dequantized"] = "full_precision"
    adapter_training: Literal["auto", "lora", "qlora"] = "auto"


class Profile(Strict):
    """A whole run: model (+adapter) -> calibration -> recipes -> evaluation -> registry."""

    name: str = "quantmill"
    model: Source
    adapter: Source | None = None
    merge: Merge = Merge()
    calibration: Calibration
    recipes: list[Recipe] = []
    sweep: Sweep | None = None
    evaluation: Evaluation
    registry: Registry
    storage: Storage = Storage()
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _unique_names(self) -> "Profile":
        if not self.recipes and not (self.sweep and self.sweep.grid):
            raise ValueError("recipes: give at least one recipe (or a sweep.grid)")
        names = [r.name for r in self.recipes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"recipe names must be unique; repeated: {', '.join(sorted(dup))} (set 'name')")
        if self.sweep and self.sweep.grid:
            recipes, skipped = self.all_recipes()
            if not recipes:
                raise ValueError("sweep.grid: no combination is valid: " + "; ".join(skipped))
        return self

    def all_recipes(self) -> tuple[list[Recipe], list[str]]:
        """The explicit recipes plus the sweep grid's (first wins on a name clash), and skipped grid lines."""
        if not (self.sweep and self.sweep.grid):
            return list(self.recipes), []
        grid, skipped = self.sweep.expand()
        names = {r.name for r in self.recipes}
        return list(self.recipes) + [r for r in grid if r.name not in names], skipped


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set data[a][b][0][c] = value for 'a.b.0.c'."""
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ProfileError(f"--set {dotted}: {key!r} is not an index of a {len(node)}-item list")
            key = int(key)  # type: ignore[assignment]
            if last:
                node[key] = value
            else:
                node = node[key]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ProfileError(f"--set {dotted}: cannot descend into a {type(node).__name__}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ProfileError(f"--set {item!r}: use dotted.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw else None)
    return data


def format_error(source: str, exc: ValidationError) -> str:
    """One line: file, field path, reason."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see profiles/demo.yaml for the schema)"
    elif err["type"] == "missing":
        msg = "required field is missing"
    return f"{source}: {loc or '<root>'}: {msg}"


def parse_profile(data: Any, source: str = "<profile>") -> Profile:
    """Validate a loaded mapping into a Profile, raising ProfileError with the field path."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: the profile must be a YAML mapping of sections")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(format_error(source, exc)) from None


def load_profile(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Profile:
    """Read, override and validate a YAML profile; every failure is one clear line."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"{p}: profile file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "syntax"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        ctx, ctx_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if ctx and ctx_mark:
            problem += f" ({ctx} at line {ctx_mark.line + 1})"
        raise ProfileError(f"{p}: YAML error at {where}: {problem}; fix the YAML syntax") from None
    data = apply_overrides(data if isinstance(data, dict) else {}, overrides or []) if data is not None else data
    return parse_profile(data, str(p))
