"""Quantization methods: each maps a float weight onto a GridSpec and returns a QuantResult."""
from .gptq import GROUP_FIT_MODES, gptq_quantize
from .hessian import fix_dead_columns, inverse_hessian_factor, percdamp_schedule
from .result import QuantResult, hessian_objective
from .rtn import rtn_quantize

__all__ = ["GROUP_FIT_MODES", "QuantResult", "fix_dead_columns", "gptq_quantize",
           "hessian_objective", "inverse_hessian_factor", "percdamp_schedule", "rtn_quantize"]
