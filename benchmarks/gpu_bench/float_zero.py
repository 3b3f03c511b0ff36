# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Switches over the merged ``FloatZeroGPTQLinear`` forward, so that one process can time and compare its paths:
``float_zero_path`` picks the Triton or the torch dequantize, ``torch_float_zero_forward`` runs one call through the
torch one, ``fused_two_kernels`` has a second kernel sum split K, ``triton_tiles`` keeps eager calls off the fragment
kernel, ``jit_launch`` launches through Triton's JIT every time, ``tinygemm_enabled`` / ``tinygemm_forward`` send
small calls through torch's int4 matmul, and ``float_zero_cached_forward`` (with ``drop_cached_weights`` to undo it)
dequantizes each layer once and keeps the bf16 weight, trading memory for speed.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def float_zero_path(triton: bool):
    """Run merged ``FloatZeroGPTQLinear`` layers through the Triton dequantize (CUDA default) or the torch one."""
    from peft_qalora.kernels import set_float_zero_triton

    set_float_zero_triton(triton)
    try:
        yield
    finally:
        set_float_zero_triton(True)


def torch_float_zero_forward(layer, x):
    with float_zero_path(triton=False):
        return layer(x)


@contextlib.contextmanager
def tinygemm_enabled(max_rows: int = 1):
    """Merged layers take torch's int4 matmul for up to ``max_rows`` bf16 rows where it keeps them (``set_tinygemm``,
    off by default, one row when on)."""
    from peft_qalora.kernels import int4_tinygemm

    saved = int4_tinygemm.TINYGEMM_MAX_ROWS
    int4_tinygemm.set_tinygemm(True, max_rows=max_rows)
    try:
        yield
    finally:
        int4_tinygemm.set_tinygemm(False, max_rows=saved)


@contextlib.contextmanager
def fused_two_kernels():
    """Merged layers' split-K calls sum their partials in a second kernel (``sum_in_kernel=False``; one launch is the
    default)."""
    from peft_qalora.kernels import set_fused_gemm

    set_fused_gemm(True, sum_in_kernel=False)
    try:
        yield
    finally:
        set_fused_gemm(True, sum_in_kernel=True)


@contextlib.contextmanager
def triton_tiles():
    """Merged layers' eager calls take the Triton tiles, not the fragment kernel (``mma=False``; it is the default
    where it applies)."""
    from peft_qalora.kernels import set_fused_gemm

    set_fused_gemm(True, mma=False)
    try:
        yield
    finally:
        set_fused_gemm(True, mma=True)


@contextlib.contextmanager
def jit_launch():
    """Every Triton launch of the merged layers goes through Triton's JIT (``set_direct_launch(False)``)."""
    from peft_qalora.kernels import set_direct_launch

    set_direct_launch(False)
    try:
        yield
    finally:
        set_direct_launch(True)


def tinygemm_forward(layer, x):
    with tinygemm_enabled():
        return layer(x)


@contextlib.contextmanager
def float_zero_cached_forward():
    """``FloatZeroGPTQLinear`` that dequantizes once to the activation dtype and keeps it (memory for speed)."""
    from peft_qalora import FloatZeroGPTQLinear
    from peft_qalora.kernels import dequantize_float_zeros
    from peft_qalora.kernels.gptq_cuda import float_zero_supported

    original = FloatZeroGPTQLinear.forward

    def forward(self, x):
        if not float_zero_supported(self, x):
            return original(self, x)
        weight = getattr(self, "_bench_weight_cache", None)
        if weight is None or weight.dtype != x.dtype:
            weight = self._bench_weight_cache = dequantize_float_zeros(self, x.dtype)
        out = x.reshape(-1, self.in_features) @ weight
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    FloatZeroGPTQLinear.forward = forward
    try:
        yield
    finally:
        FloatZeroGPTQLinear.forward = original


def drop_cached_weights(model: torch.nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "_bench_weight_cache"):
            del module._bench_weight_cache
