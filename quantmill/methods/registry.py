"""The quantization method registry: one config model per method, and what is known about each method.

Core floor: pydantic only. A method's config module (quantmill/methods/<method>.py) registers it with
`register_config`, naming its handler (the step floor, torch) by import path: the handler module is imported
the first time `QuantMethod.handler` is read, so validating a profile never loads torch or Prefect.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler, ValidationError

from quantmill.errors import QuantmillError, first_error


class MethodConfig(BaseModel):
    """Base of every method's config; serialises to a typed, versioned dict for lineage."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    SWEEP_AXES: ClassVar[tuple[str, ...]] = ("bits", "group_size")  # fields a sweep grid may vary

    @property
    def weight_bits(self) -> int:
        """Bits per stored weight (for tags and size estimates)."""
        return int(getattr(self, "bits", 16))

    @property
    def weight_group_size(self) -> int | None:
        """Quantization group size, None for per-channel or not applicable."""
        return getattr(self, "group_size", None)

    def variant_name(self) -> str:
        """Default recipe name: method, bits (unless the method's name states them), group size."""
        name = self.TYPE
        if not any(ch.isdigit() for ch in name):
            name += f"-w{self.weight_bits}"
        gs = self.weight_group_size
        return name + (f"g{gs}" if gs and gs > 0 else "")

    def default_max_ppl_increase_pct(self) -> float:
        """Default quality gate: allowed perplexity increase over the baseline, in percent."""
        return 2.0 if self.weight_bits >= 8 else 5.0

    def check_model(self, info: ModelInfo) -> None:
        """Raise ValueError when this config cannot be applied to the model (field and reason)."""
        gs = self.weight_group_size
        if gs and gs > 0:
            for name, in_features in info.linear_in_features.items():
                if in_features % gs:
                    raise ValueError(
                        f"group_size={gs} does not divide in_features={in_features} of {name}; "
                        "choose a divisor (or -1 for per-channel)"
                    )

    def check_device(self, device: str) -> None:
        """Raise ValueError when an option needs hardware this machine lacks."""

    def to_dict(self) -> dict[str, Any]:
        """Serialised config: {'type', 'version', **fields}; what lineage logs."""
        return {"type": self.TYPE, "version": self.VERSION, **self.model_dump(mode="json")}


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about a model, read from its config and weight index."""

    architecture: str
    linear_in_features: dict[str, int] = field(default_factory=dict)
    max_position_embeddings: int | None = None
    linear_out_features: dict[str, int] = field(default_factory=dict)
    other_tensors: dict[str, int] = field(default_factory=dict)  # saved tensors besides targeted weights: numel


@dataclass(frozen=True)
class QuantizeJob:
    """Inputs of one quantization: the full-precision model, calibration tokens, output folder."""

    model_dir: Path
    out_dir: Path
    calibration: Path | None
    device: str
    progress: Callable[[str], None] = print
    sensitivity: dict[str, float] | None = None  # per-linear, for recipes with mixed_precision (the step measures it)


@dataclass
class QuantizeResult:
    """What a handler reports: modules quantized/kept and per-layer errors (for metrics)."""

    quantized_modules: list[str]
    kept_modules: list[str]
    layer_errors: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Any, QuantizeJob], QuantizeResult]


MiB = 1 << 20


@dataclass(frozen=True)
class MethodFacts:
    """What the planner, the model card and the MLflow model know about a method; None: not stated (each reader
    then uses its default for an unknown method). Measured on the demo, a 34 MiB synthetic Llama and
    benchmarks/scale.py with torch 2.13 CPU."""

    # (extra RAM as a multiple of the checkpoint size, library first-use bytes, kept-tensor bytes on CPU or None
    # for the base's half dtype (GPTQ format: bf16/fp16; an fp32 base is kept fp16), 0 for the base dtype)
    memory: tuple[float, int, int | None] | None = None
    # The library the quantize step imports, and the one that loads its checkpoint for evaluation: imported once,
    # it stays in the process (later steps' baseline); methods sharing one are charged once.
    library: str | None = None
    loader_library: str | None = None
    # Evaluating on CPU: bytes per quantized parameter its kernels materialize beside the checkpoint.
    eval_dequant: float | None = None
    # Bytes per parameter the quantizer loads the full-precision model in on CPU (None: the base dtype).
    cpu_load_bytes: int | None = None
    # How to load the checkpoint (model card): vLLM `quantization=` (None: auto-detected) and the pip line.
    loader: tuple[str | None, str] | None = None
    # Packages (besides the base ones) the MLflow model needs to load the checkpoint.
    requirements: tuple[str, ...] | None = None


def fact_table(field_name: str) -> dict[str, Any]:
    """{method: fact} of every registered method that states `field_name` (see MethodFacts)."""
    return {name: value for name, method in sorted(_METHODS.items())
            if (value := getattr(method.facts, field_name)) is not None}


@dataclass(frozen=True)
class QuantMethod:
    """A registered method: its name, config model, handler and whether it needs calibration data.

    `handler_ref` is the handler itself or its import path ("package.module:function"), resolved on first use.
    """

    name: str
    config_cls: type[MethodConfig]
    handler_ref: Handler | str
    calibrated: bool
    summary: str
    facts: MethodFacts = MethodFacts()

    @property
    def handler(self) -> Handler:
        """The handler function (imports its module the first time)."""
        if not isinstance(self.handler_ref, str):
            return self.handler_ref
        module, _, attr = self.handler_ref.partition(":")
        return getattr(importlib.import_module(module), attr)


_METHODS: dict[str, QuantMethod] = {}
_ALIASES: dict[str, str] = {}  # other names people type (e.g. from other tools' docs) -> canonical method name
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def _check_names(name: str, config_cls: type[MethodConfig], aliases: tuple[str, ...]) -> None:
    for n in (name, *aliases):
        if not _NAME.match(n):
            raise ValueError(f"method name {n!r} must be lower-case words joined by '-'")
    if not issubclass(config_cls, MethodConfig):
        raise TypeError(f"{config_cls.__name__} must subclass MethodConfig")


def _add(method: QuantMethod, aliases: tuple[str, ...]) -> None:
    name = method.name
    if name in _METHODS and _METHODS[name].handler_ref != method.handler_ref:
        raise ValueError(f"quantization method {name!r} is already registered")
    method.config_cls.TYPE = method.config_cls.TYPE or name
    for alias in aliases:
        if alias in _METHODS or _ALIASES.get(alias, name) != name:
            raise ValueError(f"alias {alias!r} of {name!r} is already a method or another method's alias")
    if name in _ALIASES:
        raise ValueError(f"quantization method {name!r} is already an alias of {_ALIASES[name]!r}")
    _METHODS[name] = method
    _ALIASES.update({alias: name for alias in aliases})


def register_config(  # noqa: PLR0913 - keyword-only: the fields of one registration
    name: str, config_cls: type[MethodConfig], *, handler: str, calibrated: bool, summary: str,
    aliases: tuple[str, ...] = (), facts: MethodFacts = MethodFacts(),
) -> None:
    """Register method `name` (also accepted as any of `aliases`): its config model, handler import path
    ("package.module:function"), whether it needs calibration data, its one-line summary (the form shows it) and
    its facts (memory, libraries, loading)."""
    _check_names(name, config_cls, aliases)
    if ":" not in handler:
        raise ValueError(f"handler of {name!r} must be 'package.module:function', not {handler!r}")
    _add(QuantMethod(name, config_cls, handler, calibrated, summary, facts), aliases)


def register_method(
    name: str, config_cls: type[MethodConfig], *, calibrated: bool = False, aliases: tuple[str, ...] = ()
) -> Callable[[Handler], Handler]:
    """Decorator registering `handler` as method `name` (also accepted as any of `aliases`) with its config model
    (for methods defined outside quantmill, e.g. in a plugin or a test)."""
    _check_names(name, config_cls, aliases)

    def decorate(handler: Handler) -> Handler:
        doc = (handler.__doc__ or "").strip().splitlines()
        _add(QuantMethod(name, config_cls, handler, calibrated, doc[0] if doc else ""), aliases)
        return handler

    return decorate


def known_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_METHODS)


def method_aliases() -> dict[str, str]:
    """Accepted alias -> canonical method name."""
    return dict(_ALIASES)


def get_method(name: str) -> QuantMethod:
    """The registered method (an alias resolves to it), or a QuantmillError listing the known ones."""
    try:
        return _METHODS[_ALIASES.get(name, name)]
    except KeyError:
        aliases = ", ".join(f"{a} (= {m})" for a, m in sorted(_ALIASES.items()))
        raise QuantmillError(
            f"unknown quantization method {name!r}; known methods: {', '.join(known_methods())}"
            + (f"; aliases: {aliases}" if aliases else "")
        ) from None


def build_config(name: str, params: dict[str, Any]) -> MethodConfig:
    """Validate a recipe's parameters against the method's config model."""
    method = get_method(name)
    try:
        return method.config_cls(**params)
    except ValidationError as exc:
        loc, msg, kind = first_error(exc)
        loc = loc or "params"
        if kind == "extra_forbidden":
            msg = f"unknown option for method {name!r} (options: {', '.join(method.config_cls.model_fields)})"
        raise QuantmillError(f"{loc}: {msg}") from None


def recipe_json_schema(handler: GetJsonSchemaHandler, common: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """JSON schema of a recipe, built from the registry: `anyOf` one object per method, told apart by `method`.

    Each branch (titled with the method's name: the labels of the form's method control) holds `method`
    (a one-value enum), the `common` properties (e.g. `name`) and the method's own options inline, with
    their types, bounds, enums, defaults and descriptions; `additionalProperties: false` refuses the rest.
    `params`, the same options as one nested object (as YAML profiles may write them), is accepted through
    `patternProperties`, so one schema validates both spellings while the form shows the inline one.
    A newly registered method appears here without any change to the profile code. `anyOf` rather than pydantic's
    `oneOf`: Prefect's v1 UI renders only `anyOf` (v2 both); `discriminator` is an OpenAPI hint validators ignore.
    """
    branches = []
    for name in known_methods():
        method = _METHODS[name]
        ref = handler(method.config_cls.__pydantic_core_schema__)
        options = handler.resolve_ref_schema(ref)
        for key, option in options.get("properties", {}).items():
            option.setdefault("title", key.replace("_", " ").title())  # pydantic leaves nested models untitled
            if "const" in option and "enum" not in option:  # a one-value Literal: a (one-entry) dropdown in the form
                option["enum"] = [option["const"]]
        method_field = {"title": "Method", "description": "Registered quantization method (the branch's title)",
                        "type": "string", "enum": [name], "const": name, "default": name}
        branches.append({
            "title": name, "description": method.summary, "type": "object",
            "properties": {"method": method_field, **common, **options.get("properties", {})},
            "required": ["method", *options.get("required", [])],
            "patternProperties": {"^params$": ref},
            "additionalProperties": False,
        })
    return {"anyOf": branches, "discriminator": {"propertyName": "method"}}
