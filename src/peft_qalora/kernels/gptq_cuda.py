# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""CUDA paths for training through, and generating with, GPTQ layers.

* :func:`gptq_recompute_forward`: the frozen GPTQ base of a QA-LoRA layer as ``x @ dequant(W)`` whose backward
  dequantizes again instead of keeping the dense weight. GPTQModel's ``TorchLinear``/``TritonV2Linear`` in train mode
  dequantize with torch ops and call ``torch.matmul`` on the result, so autograd keeps every layer's dense bf16 weight
  alive until the backward: the peak memory of a training step holds a full bf16 copy of the model on top of the
  4-bit one. Here only the packed tensors are referenced; the weight is dequantized by GPTQModel's Triton kernel once
  in the forward and once in the backward (memory-bound, a few percent of the matmul at training batch sizes).
* :func:`dequantize_float_zeros` / :func:`float_zero_forward`: a Triton dequantize for the merged layer
  (``FloatZeroGPTQLinear``: packed codes, fp16 scales, fp32 real-valued zeros). The scale and zero are applied in
  fp32 and the result is rounded once to the activation dtype, exactly what the torch path computes, in one pass
  over the packed codes instead of several full-size int32/fp32 temporaries.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from ..gptq import effective_group_size
from .fused_float_zero import float_zero_gemm
from .int4_tinygemm import tinygemm_gemm

try:  # Triton is optional: CPU installs may not have it
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    _HAS_TRITON = False

_RECOMPUTE = True
_FLOAT_ZERO_TRITON = True


def set_recompute(enabled: bool) -> None:
    """Turn the dequantize-again backward for GPTQ bases on CUDA on (default) or off (GPTQModel's own path)."""
    global _RECOMPUTE
    _RECOMPUTE = bool(enabled)


def set_float_zero_triton(enabled: bool) -> None:
    """Let merged ``FloatZeroGPTQLinear`` layers on CUDA use the Triton dequantize (default) or the torch one."""
    global _FLOAT_ZERO_TRITON
    _FLOAT_ZERO_TRITON = bool(enabled)


def _gptqmodel_triton_dequant() -> Callable | None:
    try:
        from gptqmodel.nn_modules.triton_utils.dequant import dequant
    except Exception:
        return None
    return dequant


def recompute_supported(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`gptq_recompute_forward` can stand in for ``base(x)`` (with a gradient for ``x``).

    Same function; the weight is rounded once, from fp32 to ``x.dtype``, where GPTQModel's torch path rounds it to the
    scales' fp16 first.
    """
    if not (_RECOMPUTE and _HAS_TRITON and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
        return False
    try:
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    except Exception:
        return False
    return (
        isinstance(base, TorchLinear)  # TritonV2Linear derives from it
        and getattr(base, "adapter", None) is None
        and not getattr(base, "online_full_had", False)  # no SpinQuant/QuaRot input rotation
        and not getattr(base, "online_partial_had", False)
        and base.bits in (2, 4, 8)
        and base.qzero_format() == 2  # the Triton dequant reads zeros without the v1 offset
        and base.qweight.is_cuda
        and base.qweight.is_contiguous()
        and base.qzeros.is_contiguous()
        and base.scales.is_contiguous()
        and base.g_idx.numel() == base.in_features
        and _gptqmodel_triton_dequant() is not None
    )


class _DequantMatmul(torch.autograd.Function):
    """``x @ W`` with ``W = dequant()``; the backward calls ``dequant()`` again rather than saving ``W``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dequant: Callable[[], torch.Tensor]) -> torch.Tensor:
        ctx.dequant = dequant
        return x @ dequant()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad @ ctx.dequant().t() if ctx.needs_input_grad[0] else None
        return grad_x, None


def gptq_recompute_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``base(x)`` for a GPTQModel ``TorchLinear``-family layer on CUDA, without keeping the dense weight for backward.

    Call only where :func:`recompute_supported` is true.
    """
    dequant = _gptqmodel_triton_dequant()
    qweight, scales, qzeros, g_idx = base.qweight, base.scales, base.qzeros, base.g_idx
    bits, pack_bits, maxq, dtype = base.bits, base.pack_dtype_bits, base.maxq, x.dtype

    def weight() -> torch.Tensor:
        return dequant(dtype, qweight, scales, qzeros, g_idx, bits, pack_bits, maxq)

    out = _DequantMatmul.apply(x.reshape(-1, base.in_features), weight)
    if base.bias is not None:
        out = out + base.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], base.out_features)


if _HAS_TRITON:

    @triton.jit
    def _dequant_float_zeros_kernel(
        qweight_ptr,
        scales_ptr,
        zeros_ptr,
        out_ptr,
        K,
        N,
        group_size,
        BITS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        per_word: tl.constexpr = 32 // BITS
        words = tl.load(qweight_ptr + (offs_k[:, None] // per_word) * N + offs_n[None, :], mask=mask, other=0)
        codes = (words >> ((offs_k[:, None] % per_word) * BITS)) & ((1 << BITS) - 1)
        group = offs_k // group_size
        at = group[:, None] * N + offs_n[None, :]
        scale = tl.load(scales_ptr + at, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + at, mask=mask, other=0.0)
        weight = (codes.to(tl.float32) - zero) * scale
        tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], weight.to(out_ptr.dtype.element_ty), mask=mask)

    # Tile shapes tried once per (K, N, bits) on the first call; the kernel is memory-bound.
    _DEQUANT_CONFIGS = [
        triton.Config({"BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w)
        for bk, bn, w in ((32, 128, 4), (64, 128, 4), (64, 256, 8), (128, 128, 8), (16, 256, 4), (128, 256, 8))
    ]
    _dequant_float_zeros_autotuned = triton.autotune(configs=_DEQUANT_CONFIGS, key=["K", "N", "BITS"])(
        _dequant_float_zeros_kernel
    )


def float_zero_supported(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether the Triton dequantize applies: CUDA, half precision, 2/4/8 bits, groups contiguous along the rows."""
    return (
        _HAS_TRITON
        and _FLOAT_ZERO_TRITON
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and layer.bits in (2, 4, 8)
        and layer.qweight.is_cuda
        and layer.qweight.dtype == torch.int32
        and layer.qweight.is_contiguous()
        and layer._group_order() is None
        and layer.has_regular_groups()  # group k // group_size, the last group possibly shorter
    )


# One fixed tile (default) or a tile autotuned once per (K, N, bits). Measured on an H100 with a 7B-shaped model
# (benchmarks/results/gpu.md): the autotuner picks tiles that are a little faster on the GPU, but its Python dispatch
# (tens of microseconds per call) made greedy decoding, one call per layer per token, 20-35% slower end to end.
_AUTOTUNE = False
_FIXED_TILE = (64, 128, 4)  # BLOCK_K, BLOCK_N, num_warps


def set_dequant_tile(autotune: bool = False, tile: tuple[int, int, int] | None = None) -> None:
    """Choose between a fixed ``(BLOCK_K, BLOCK_N, num_warps)`` tile (default) and the autotuned one."""
    global _AUTOTUNE, _FIXED_TILE
    _AUTOTUNE = bool(autotune)
    if tile is not None:
        _FIXED_TILE = tuple(tile)


def dequantize_float_zeros(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The merged layer's weight (in_features x out_features) in ``dtype``: ``(q - z') * s`` computed in fp32."""
    K, N = layer.in_features, layer.out_features
    out = torch.empty((K, N), device=layer.qweight.device, dtype=dtype)
    zeros = layer.zeros if layer.zeros.dtype == torch.float32 else layer.zeros.float()
    group_size = effective_group_size(layer)
    operands = (layer.qweight, layer.scales.contiguous(), zeros.contiguous(), out, K, N, group_size)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU interpreter (tests): one fixed tile
        grid = (triton.cdiv(K, 32), triton.cdiv(N, 128))
        _dequant_float_zeros_kernel[grid](*operands, BITS=layer.bits, BLOCK_K=32, BLOCK_N=128)
        return out

    if not _AUTOTUNE:
        block_k, block_n, warps = _FIXED_TILE
        grid = (triton.cdiv(K, block_k), triton.cdiv(N, block_n))
        _dequant_float_zeros_kernel[grid](*operands, BITS=layer.bits, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=warps)
        return out

    def grid(meta):
        return (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(N, meta["BLOCK_N"]))

    _dequant_float_zeros_autotuned[grid](*operands, BITS=layer.bits)
    return out


def autotuned_tiles() -> dict:
    """The tile the autotuner chose for each (K, N, bits) seen so far."""
    if not _HAS_TRITON:
        return {}
    cache = getattr(_dequant_float_zeros_autotuned, "cache", {})
    return {str(key): str(config) for key, config in cache.items()}


def float_zero_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``layer(x)`` on CUDA, or ``None`` where no Triton path applies (the caller falls back to torch).

    With ``set_tinygemm(True)``, one row through torch's int4 matmul where it keeps the layer (int4_tinygemm.py); up to
    ``fused_float_zero.FUSED_MAX_ROWS`` rows the fused kernel (codes, scales and zeros read once, no dense weight);
    above, or where it does not apply, the Triton dequantize then cuBLAS.
    """
    one_row = tinygemm_gemm(layer, x)  # off unless set_tinygemm(True): one row, bf16, offsets bf16 keeps
    if one_row is not None:
        return one_row
    if not _FLOAT_ZERO_TRITON:
        return None
    fused = float_zero_gemm(layer, x)  # 1-64 rows: the fused kernel, no dense weight
    if fused is not None:
        return fused
    if not float_zero_supported(layer, x):
        return None
    flat = x.reshape(-1, layer.in_features)
    out = flat @ dequantize_float_zeros(layer, x.dtype)
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], layer.out_features)
