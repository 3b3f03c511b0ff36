# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""One-row decoding of merged 4-bit layers through torch's int4 matmul (tinygemm, ``aten._weight_int4pack_mm``).

tinygemm computes ``w = (q - 8) * scale + offset`` per group with bf16 scales and offsets, one bf16 multiply-add per
weight, fp32 sums. A merged layer's weight is ``s * (q - z') = (q - 8) * s + s * (8 - z')``, so its offset is
``s * (8 - z')``. On a symmetric base (integer zero 8, what GPTQModel writes by default) that is the adapter's shift
``s * (8 - z')`` alone, which bf16 rounds by at most 2^-8 of itself (8 significant bits), so the adapter's shift
survives to 0.4% of itself; on other integer zeros the offset is up to 8 steps, which bf16 would round by up to 0.016
steps, more than an adapter's whole shift. So tinygemm takes a layer only where every merged zero lies within half a
step of ``2^(bits-1)`` (:func:`tinygemm_keeps_shift`, checked once per layer); others keep the fused kernel.
:func:`tinygemm_offset_error` measures the rounding in steps (an H200 run's random 7B adapter: 1.4-2.8e-4 steps).
The scale rounds from fp16 to bf16, as GPTQModel's Marlin rounds it for bf16 activations, and each weight rounds to
bf16 once, as the dequantize + cuBLAS path rounds it above 64 rows.

Why: one C++ op per layer call, where the fused Triton kernel makes two Triton launches (eager decoding is bound by
the CPU's launches: benchmarks/results/gpu.md, issue 14), and on an H200 (run 8, CUDA-graph replays from HBM)
6.8 / 14.8 / 15.1 us at one row for 7B q / gate / down projections against Marlin's 9.7 / 13.1 / 15.3 (run 9) and the
fused kernel's 11.2 / 20.0 / 20.2; at 16 rows it takes 22 / 55 / 53 us, slower than the fused kernel, so by default
it takes one row (``max_rows`` raises that: eager decoding at 16 rows may still gain from one launch). What it costs:
the bf16 scales move the merged model's held-out perplexity by +0.155% from the fp32 model, where the fused kernel's
arithmetic moves it by -0.012% (benchmarks/results/bf16_exactness_cpu.md, 16,384 tokens, emulated on the CPU).

Measured (H200, 7B shapes, runs 11 and 14 of gpu.md): 13.9-14.8 us per eager call at one row where Marlin's loop
took 34-70 us, and batch-1 greedy decoding 46.8 tokens/s against the fused kernel's 31.0 in the same run (Marlin: 30.2
in another run). Off by default (:func:`set_tinygemm`) all the same: its operands are a second copy of the codes in
tinygemm's tiled layout plus bf16 scales and offsets (a 7B model: about 3.4 GB more, nearly the weights again), built
on a layer's first eligible call and kept in its ``_kernel_cache``, and it has not yet been timed beside Marlin in
one run. Eager only: under ``torch.compile`` the fused kernel runs.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..gptq import unpack_qweight

# Rows up to which tinygemm runs when enabled: one. At 16 rows its GPU time is 1.3-1.6x the fused kernel's, though
# eager batch-16 decoding still ran faster with 16 (one launch instead of two; gpu.md run 14): set_tinygemm(max_rows=).
TINYGEMM_MAX_ROWS = 1
GROUP_SIZES = (32, 64, 128, 256)  # what the kernel takes
_ENABLED = False


def set_tinygemm(enabled: bool, max_rows: int | None = None) -> None:
    """Route one-row CUDA calls of eligible merged 4-bit layers through tinygemm (off by default; see module doc)."""
    global _ENABLED, TINYGEMM_MAX_ROWS
    _ENABLED = bool(enabled)
    if max_rows is not None:
        TINYGEMM_MAX_ROWS = int(max_rows)


@functools.lru_cache(maxsize=None)
def _device_has_tinygemm(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0) and hasattr(torch.ops.aten, "_weight_int4pack_mm")


def _inner_k_tiles(in_features: int) -> int:
    """tinygemm's K tiling (2, 4 or 8 tiles of 16 channels), 0 where ``in_features`` fits none."""
    return next((tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0), 0)


def _layout_fits(layer: nn.Module) -> bool:
    """Whether the layer's shapes and group layout are ones tinygemm takes (the offsets are checked separately)."""
    return (
        layer.bits == 4
        and layer.qweight.dtype == torch.int32
        and layer.group_size in GROUP_SIZES
        and layer.in_features % layer.group_size == 0
        and _inner_k_tiles(layer.in_features) > 0
        and layer.out_features % 8 == 0
        and layer._group_order() is None
        and layer.has_regular_groups()
    )


def scales_and_offsets(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """tinygemm's per-group ``(scale, offset)`` for ``layer`` in fp32: ``s`` and ``s * (8 - z')`` (groups x out)."""
    scales = layer.scales.float()
    return scales, scales * (2 ** (layer.bits - 1) - layer.zeros)


def tinygemm_keeps_shift(layer: nn.Module) -> bool:
    """Whether every merged zero is within half a step of the symmetric zero ``2^(bits-1)``: then each offset is the
    adapter's shift alone and bf16 keeps it to 2^-8 of itself (an absolute bound in steps would refuse large shifts,
    whose rounding is as small relative to them)."""
    return bool(((layer.zeros.float() - 2 ** (layer.bits - 1)).abs() < 0.5).all())


def tinygemm_offset_error(layer: nn.Module) -> float:
    """The largest change bf16 makes to the layer's offsets, in quantization steps (of its fp16 scales)."""
    scales, offsets = scales_and_offsets(layer)
    rounded = offsets.to(torch.bfloat16).float()
    return float(((rounded - offsets).abs() / scales.abs().clamp_min(torch.finfo(torch.float32).tiny)).max())


def tinygemm_operands(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed codes and bf16 ``(scale, offset)`` pairs (groups x out x 2) for the layer's device; cached."""
    cache = layer._kernel_cache
    if "tinygemm" not in cache:
        codes = unpack_qweight(layer.qweight, layer.bits, layer.in_features).t()  # (out, in), codes 0..15
        if codes.is_cuda:
            # two codes per byte, even input channel in the high nibble: the layout _convert_weight_to_int4pack reads
            pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, _inner_k_tiles(layer.in_features))
        else:  # the CPU build of the same kernel (tests)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        scales, offsets = scales_and_offsets(layer)
        cache["tinygemm"] = (packed, torch.stack([scales, offsets], dim=-1).to(torch.bfloat16).contiguous())
    return cache["tinygemm"]


def tinygemm_matmul(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ W`` for a 2-D bf16 ``x`` through tinygemm on the layer's device (no eligibility checks; see the caller)."""
    packed, pairs = tinygemm_operands(layer)
    if x.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(x, packed, layer.group_size, pairs)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, layer.group_size, pairs)


def tinygemm_supported(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`tinygemm_gemm` computes ``layer(x)``: enabled, eager CUDA, bf16, one row, a layout and offsets
    tinygemm keeps (checked once per layer and cached)."""
    if not _ENABLED:  # the default: no cost on the decoding path
        return False
    rows = x.numel() // max(1, x.shape[-1])
    if not (
        0 < rows <= TINYGEMM_MAX_ROWS
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and layer.qweight.device == x.device
        and not torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() and x.requires_grad)  # the int4 op has no backward
        and _device_has_tinygemm(x.device.index or 0)
    ):
        return False
    cache = layer._kernel_cache
    if "tinygemm_fits" not in cache:
        cache["tinygemm_fits"] = _layout_fits(layer) and tinygemm_keeps_shift(layer)
    return cache["tinygemm_fits"]


def tinygemm_gemm(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``layer(x)`` for a merged ``FloatZeroGPTQLinear`` through tinygemm, or ``None`` where it does not apply."""
    if not tinygemm_supported(layer, x):
        return None
    flat = x.reshape(-1, layer.in_features).contiguous()
    out = tinygemm_matmul(layer, flat)
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], layer.out_features)
