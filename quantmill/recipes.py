"""Recipes: one variant each (a registered method and its validated parameters), and the sweep grid that expands
into recipes (core)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, GetJsonSchemaHandler, ValidationError, field_validator, model_validator

from quantmill.errors import first_error
from quantmill.schema_base import Strict


class Recipe(Strict):
    """One variant: a registered method and its parameters (validated by the method's config)."""

    method: str = Field(description="Registered quantization method")
    name: str | None = Field(None, description="Unique variant name (default: method-bits-group)")
    params: dict[str, Any] = Field({}, description="The method's options as one mapping (or written inline)")

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        """One branch per registered method with that method's options (the registry builds it)."""
        from quantmill.methods.registry import recipe_json_schema

        name = {"title": "Name", "type": "string", "description": cls.model_fields["name"].description}
        return {"title": "Recipe", "description": cls.__doc__, **recipe_json_schema(handler, {"name": name})}

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
    def _check(self) -> Recipe:
        from quantmill.methods import build_config, get_method

        self.method = get_method(self.method).name  # an alias (e.g. bnb-4bit) is recorded as its canonical name
        config = build_config(self.method, self.params)
        self.params = config.model_dump(mode="json")
        if self.name is None:
            self.name = config.variant_name()
        return self

    def config(self):  # noqa: ANN201 - MethodConfig, imported lazily
        """The method's typed config."""
        from quantmill.methods import build_config

        return build_config(self.method, self.params)


class Sweep(Strict):
    """A grid of recipes (methods x bits x group sizes) and the task runner the sweep fans them out on."""

    class Grid(Strict):
        """One block of the grid; an axis a method does not have (e.g. bits of bnb-nf4) is ignored for it."""

        methods: list[str] = Field(min_length=1, description="Registered method names")
        bits: list[int] = Field([], description="Bit widths tried (for methods that have `bits`)")
        group_sizes: list[int] = Field([], description="Group sizes tried (for methods that have `group_size`)")
        params: dict[str, Any] = Field({}, description="Options given to every recipe of the block")

        @field_validator("methods")
        @classmethod
        def _known(cls, v: list[str]) -> list[str]:
            from quantmill.methods import get_method

            for name in v:
                get_method(name)  # an unknown name lists the known ones
            return v

    class Runner(Strict):
        """Threads in the flow process (default), or Dask: a local cluster, or a scheduler `address`."""

        kind: Literal["threads", "dask"] = Field("threads", description="Threads in the flow process, or Dask")
        max_workers: int = Field(2, gt=0, description="Variants run at once (threads, or local Dask workers)")
        address: str | None = Field(None, description="Dask scheduler address (default: a local cluster)")
        threads_per_worker: int = Field(1, gt=0, description="Threads per local Dask worker")
        memory_limit: str | None = Field(None, description="Memory limit per local Dask worker, e.g. '8GiB'")

        @model_validator(mode="after")
        def _address(self) -> Sweep.Runner:
            if self.address is not None and self.kind != "dask":
                raise ValueError("address is a Dask scheduler address; set kind: dask")
            return self

    grid: list[Grid] = Field([], description="Blocks of the grid; their recipes join the profile's `recipes`")
    runner: Runner = Field(Runner(), description="Task runner the variants are fanned out on")

    def expand(self) -> tuple[list[Recipe], list[str]]:
        """Recipes of the grid, and one line per combination a method cannot do (skipped, reported)."""
        from itertools import product

        from quantmill.methods import get_method

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
                        skipped.append(f"{method} {params}: {first_error(exc)[1]}")
                        continue
                    if recipe.name in recipes and recipes[recipe.name].params != recipe.params:
                        skipped.append(f"{method} {params}: same name as an earlier grid recipe ({recipe.name}); "
                                       "list it under recipes with its own name")
                        continue
                    recipes.setdefault(recipe.name, recipe)
        return list(recipes.values()), skipped
