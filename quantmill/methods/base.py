"""Config bases shared by several methods: grouped and GPTQ-family configs, fixed-width configs, device checks."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_serializer

from quantmill.methods.mixed import MixedPlan, MixedPrecision, budget_bytes, plan_mixed
from quantmill.methods.registry import MethodConfig, ModelInfo, QuantizeJob

CPU_INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4pack kernel (gptqmodel's CPU 4-bit path) takes


def require_import(module: str, hint: str) -> None:
    """Raise a one-line ValueError (`hint`) when an optional backend cannot be imported; never fall back silently.

    Any exception counts: a broken install (native dependencies) is as unusable as a missing one.
    """
    import importlib

    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - see the docstring: one line whatever the import raised
        raise ValueError(hint) from None


def check_packable(info: ModelInfo) -> None:
    """Raise ValueError unless every targeted linear's in_features is a multiple of 32 (GPTQ int32 packing)."""
    for name, in_features in info.linear_in_features.items():
        if in_features % 32:
            raise ValueError(f"in_features={in_features} of {name} is not a multiple of 32, which packing needs")


def check_cpu_int4_group(bits: int, group_size: int, device: str) -> None:
    """On CPU, 4-bit checkpoints only load (transformers + gptqmodel) with group sizes the int4pack kernel takes."""
    if device != "cuda" and bits == 4 and group_size not in CPU_INT4_GROUPS:
        raise ValueError(f"group_size={group_size} with bits=4 cannot be loaded on {device}: gptqmodel's CPU int4 "
                         f"kernels take group sizes {list(CPU_INT4_GROUPS)} (per-channel needs a CUDA device)")


class GroupedConfig(MethodConfig):
    """A group_size field (-1 = per-channel) shared by the grouped weight quantizers (rtn, gptq, awq)."""

    group_size: int = Field(128, description="Weights per quantization group; -1: one group per output channel")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        """-1 (per-channel) or a positive group size."""
        if v == 0 or v < -1:
            raise ValueError("group_size must be -1 (per-channel) or a positive integer")
        return v

    @property
    def weight_group_size(self) -> int | None:
        """Group size, None for per-channel."""
        return None if self.group_size == -1 else self.group_size


class GPTQFamilyConfig(GroupedConfig):
    """Fields and checks shared by the GPTQ-format methods (rtn, gptq)."""

    bits: Literal[2, 3, 4, 8] = Field(4, description="Bits per weight")
    sym: bool = Field(True, description="Symmetric quantization (no zero-point)")
    mixed_precision: MixedPrecision | None = Field(
        None, description="Keep the most sensitive linears in fp16 within a size budget")

    @model_serializer(mode="wrap")
    def _omit_unused_mixed(self, handler):  # noqa: ANN001, ANN202
        """Leave `mixed_precision` out when unset, so existing recipes keep their lineage and cache keys."""
        data = handler(self)
        if self.mixed_precision is None:
            data.pop("mixed_precision", None)
        return data

    def variant_name(self) -> str:
        """Default name, with '-mixed' when some linears may stay in fp16."""
        return super().variant_name() + ("-mixed" if self.mixed_precision else "")

    def check_device(self, device: str) -> None:
        """4-bit group sizes the CPU kernels cannot load are rejected on CPU."""
        check_cpu_int4_group(self.bits, self.group_size, device)

    def check_model(self, info: ModelInfo) -> None:
        """Group size must divide in_features; in_features must be a multiple of 32; a mixed budget must be feasible."""
        super().check_model(info)
        check_packable(info)
        if self.mixed_precision and info.linear_out_features:
            budget_bytes(self.mixed_precision, info, self.bits, self.group_size)

    def mixed_plan(self, job: QuantizeJob) -> MixedPlan | None:
        """The fp16-kept linears for this job (None without mixed_precision); needs the job's sensitivity."""
        if self.mixed_precision is None:
            return None
        if job.sensitivity is None:
            raise ValueError("mixed_precision needs per-linear sensitivity (job.sensitivity); the quantize step "
                             "measures it from the calibration data")
        from quantmill.modelinfo import (
            model_info,  # torch: only when a job runs, never on validation
        )

        plan = plan_mixed(self.mixed_precision, model_info(job.model_dir), self.bits, self.group_size, job.sensitivity)
        job.progress(f"mixed precision: keeping {len(plan.kept)} linears in fp16 ({plan.estimated_bytes:,} of "
                     f"{plan.budget_bytes:,} budget bytes): {', '.join(plan.kept) or 'none'}")
        return plan


# Modules kept in full precision by every method unless a recipe says otherwise.
DEFAULT_KEEP = ("lm_head",)


def fixed_bits_schema(schema: dict, bits: int) -> None:
    """JSON schema: `bits` takes the one width the method stores, so the form and the server refuse others."""
    schema["properties"]["bits"]["enum"] = [bits]


class FixedBitsConfig(MethodConfig):
    """Base of methods whose weight width is fixed: `bits` may be stated but must equal FIXED_BITS."""

    FIXED_BITS: ClassVar[int] = 8
    SWEEP_AXES: ClassVar[tuple[str, ...]] = ()
    BITS_HINT: ClassVar[str] = ""
    model_config = ConfigDict(json_schema_extra=lambda schema, cls: fixed_bits_schema(schema, cls.FIXED_BITS))
    bits: int = Field(8, description="Bits per weight, fixed by the method")
    skip_modules: tuple[str, ...] = Field(
        DEFAULT_KEEP, description="Modules left unquantized: exact names or dotted suffixes such as 'o_proj'")

    @field_validator("bits")
    @classmethod
    def _fixed_bits(cls, v: int) -> int:
        """Only the method's own width is accepted; the message names the alternatives."""
        if v != cls.FIXED_BITS:
            name = cls.TYPE or cls.__name__
            raise ValueError(
                f"bits={v} is not supported: {name} always stores {cls.FIXED_BITS}-bit weights; "
                f"drop `bits` (or set bits: {cls.FIXED_BITS}){'; ' + cls.BITS_HINT if cls.BITS_HINT else ''}"
            )
        return v

    @field_validator("skip_modules")
    @classmethod
    def _skip_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        """Module names (exact or a dotted suffix such as 'o_proj'), non-empty and unique."""
        if any(not s.strip() for s in v):
            raise ValueError("skip_modules entries must be non-empty module names such as 'lm_head' or 'o_proj'")
        if len(set(v)) != len(v):
            raise ValueError(f"skip_modules has duplicates: {list(v)}")
        return v

    def check_model(self, info: ModelInfo) -> None:
        """Every skip_modules entry (besides the default lm_head) must name a linear of the model."""
        super().check_model(info)
        for key in self.skip_modules:
            if key in DEFAULT_KEEP:
                continue
            if not any(n == key or n.endswith("." + key) for n in info.linear_in_features):
                example = next(iter(info.linear_in_features), "model.layers.0.mlp.down_proj")
                raise ValueError(f"skip_modules: {key!r} matches no linear module of the model (e.g. {example!r})")


def check_kernel(kernel: str, cpu_ok: tuple[str, ...], device: str) -> None:
    """Raise ValueError naming `kernel` when it needs CUDA and the device is the CPU."""
    if device != "cuda" and kernel not in cpu_ok:
        raise ValueError(f"kernel={kernel!r} needs a CUDA GPU; use one of {list(cpu_ok)} on {device}")
