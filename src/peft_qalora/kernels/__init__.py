# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Optional GPU fast paths. Everything here is used only on CUDA with Triton available; CPU code never needs it."""

from .fused_float_zero import float_zero_gemm, set_fused_gemm
from .gptq_cuda import (
    dequantize_float_zeros,
    float_zero_forward,
    gptq_recompute_forward,
    recompute_supported,
    set_float_zero_triton,
    set_recompute,
)
from .int4_tinygemm import set_tinygemm, tinygemm_gemm
from .triton_launch import set_direct_launch

__all__ = [
    "dequantize_float_zeros",
    "float_zero_forward",
    "float_zero_gemm",
    "gptq_recompute_forward",
    "recompute_supported",
    "set_direct_launch",
    "set_float_zero_triton",
    "set_fused_gemm",
    "set_recompute",
    "set_tinygemm",
    "tinygemm_gemm",
]
