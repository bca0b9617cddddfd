"""Quantize step: one handler module per method; the methods' configs and registry live in quantmill.methods."""

from quantmill.methods import (  # noqa: F401 - re-exported
    MethodConfig,
    QuantizeJob,
    QuantizeResult,
    build_config,
    get_method,
    known_methods,
    register_method,
)
from quantmill.tasks.quantize.step import quantize  # noqa: F401 - the step's task, the package's API
