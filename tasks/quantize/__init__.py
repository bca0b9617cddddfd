"""Quantize step: one module per method, all registered in `registry`."""

from quantmill.tasks.quantize.registry import (  # noqa: F401
    MethodConfig,
    QuantizeJob,
    QuantizeResult,
    build_config,
    get_method,
    known_methods,
    register_method,
)

# Importing a method module registers it.
import importlib as _importlib
import pkgutil as _pkgutil

for _m in _pkgutil.iter_modules(__path__):
    if _m.name not in {"registry", "common", "step", "mixed", "sensitivity"}:
        _importlib.import_module(f"{__name__}.{_m.name}")

from quantmill.tasks.quantize.step import quantize  # noqa: E402,F401
