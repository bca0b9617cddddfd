"""Method config: rtn (round-to-nearest, GPTQ checkpoint format)."""

from __future__ import annotations

from quantmill.methods.base import GPTQFamilyConfig
from quantmill.methods.registry import MethodFacts, MiB, register_config


class RTNConfig(GPTQFamilyConfig):
    """Round-to-nearest: bits, group_size (-1 = per-channel), sym; no calibration."""


register_config(
    "rtn",
    RTNConfig,
    handler="quantmill.quantize.rtn:quantize_rtn",
    calibrated=False,
    summary="Round-to-nearest weight-only baseline, saved as a GPTQ v1 checkpoint.",
    facts=MethodFacts(memory=(2.0, 100 * MiB, None), library="rtn", loader_library="gptqmodel", eval_dequant=3.0,
                      cpu_load_bytes=4, loader=("gptq", "pip install gptqmodel optimum"),
                      requirements=("gptqmodel", "optimum")),
)
