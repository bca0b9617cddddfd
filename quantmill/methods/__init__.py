"""Quantization methods as data: each method's config model and facts, registered by name (core floor).

Pydantic only: importing this package (what validating a profile does) loads neither torch nor Prefect. Handlers
live in quantmill.quantize.<method> and are named by import path in each registration.
"""

# Each config module registers its method(s) on import; this list is the set of built-in methods.
from quantmill.methods import (  # noqa: F401 - importing registers the methods
    autoround,
    awq,
    bnb,
    dynamic_int8,
    fp8,
    gguf,
    gptq,
    rtn,
    w8a8,
)
from quantmill.methods.checks import uses_calibration  # noqa: F401 - the package's API
from quantmill.methods.registry import (  # noqa: F401 - the package's API
    MethodConfig,
    MethodFacts,
    ModelInfo,
    QuantizeJob,
    QuantizeResult,
    QuantMethod,
    build_config,
    fact_table,
    get_method,
    known_methods,
    method_aliases,
    recipe_json_schema,
    register_config,
    register_method,
)
