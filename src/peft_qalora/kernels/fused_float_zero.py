# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""A fused small-batch matmul for merged layers: ``x @ (s * (q - z'))`` without a dense weight.

``FloatZeroGPTQLinear`` keeps GPTQ's packed codes ``q``, fp16 scales ``s`` and fp32 real-valued zeros ``z'``. For the
few rows of decoding, dequantizing the whole weight and calling cuBLAS reads and writes the weight several times
(benchmarks/results/gpu.md: 75-116 us per 7B layer where Marlin takes 10-17 us). This kernel reads the packed codes,
scales and zeros once and never writes a weight. It uses the fold's algebra rather than a dequantized tile: inside a
group ``g`` the scale and zero are constant, so

    out[m, n] = sum_g s[g, n] * (sum_{k in g} x[m, k] q[k, n]  -  z'[g, n] * sum_{k in g} x[m, k])

The inner sum multiplies the activations by the integer codes, which bf16/fp16 hold exactly, on the tensor cores
(``tl.dot``, fp32 accumulation), or for one row with fp32 multiply-adds; scale and zero are applied per group in
fp32. Each packed word is loaded once and unpacked with shifts, and a code becomes a float by its bit pattern rather
than a conversion (``fused_tiles._code_format``). Programs that share K write fp32 partial sums, which the last of
them per output tile adds in a fixed order (eager calls: one launch) or a second kernel does (compiled graphs). Nothing
is rounded to 16 bits but the activations (as given) and the output: the fp32 zero keeps its full precision, where a
16-bit zero near 8 rounds by up to 0.004 steps (DESIGN.md, "The fold"), and the weight is never rounded either (the
dequantize-then-matmul path rounds it once). Design and measurements: docs/design.md, "The merged layer at decoding
sizes".

Applies to 2/4/8-bit codes, fp16/bf16 activations on CUDA, groups contiguous along the input (no act-order), any
group size whose largest power-of-two divisor up to 128 is at least 16, and a last group shorter than the others
(masked), for inputs that need no gradient (the kernel has no backward). Elsewhere :func:`float_zero_gemm` returns
``None`` and the caller takes another path. It is registered as
the custom op ``torch.ops.peft_qalora.float_zero_mm`` (``torch.library.triton_op``), so ``torch.compile`` traces
through it with no graph break and CUDA graphs capture its launch. Eager decoding, which the CPU bounds, reuses one
prepared call per layer and input shape (:mod:`.fused_call`) that launches the compiled kernels directly
(:mod:`.triton_launch`). The kernels themselves are in :mod:`.fused_kernels`, their tiles in :mod:`.fused_tiles`;
eager calls of 4-bit layers at 2-16 rows take the fragment kernel of :mod:`.fused_mma` where it applies.
"""

from __future__ import annotations

import torch
from torch import nn

from .fused_call import FusedCall
from .fused_kernels import _HAS_TRITON
from .fused_tiles import _INTERPRET, _block_k

# Up to this many rows the fused kernel runs; above it dequantize-then-cuBLAS (benchmarks/results/gpu.md, issue 14).
FUSED_MAX_ROWS = 64
_FUSED = True
# Split-K calls add their partial sums inside the kernel (one launch) instead of in a second kernel: the same bits
# (CUDA tests at 7B shapes, 1-64 rows), and eager decoding is launch-bound: 7B greedy decoding on an H200 at
# 1.13-1.24x the two kernels' tokens/s (benchmarks/results/gpu.md, runs 17 and 18). torch.compile reads the switch
# when it traces a graph.
_SUM_IN_KERNEL = True
# Eager calls of 4-bit layers at 2-16 rows (and one row on wide outputs) take the kernel on the tensor cores'
# register fragments (kernels/fused_mma.py) where it applies: 0.72-0.87x the Triton tiles' GPU time (gpu.md, run 46).
_MMA = True
_SWITCHES = (_FUSED, FUSED_MAX_ROWS, _SUM_IN_KERNEL, _MMA)  # part of every prepared call's key: a change prepares anew


def set_fused_gemm(
    enabled: bool, max_rows: int | None = None, sum_in_kernel: bool | None = None, mma: bool | None = None
) -> None:
    """Turn the fused small-batch kernel on (default) or off, and optionally set the largest row count it takes,
    whether calls that split K add the partial sums in the kernel itself (one launch per call, the default) or in a
    second kernel, and whether eager calls may take the fragment kernel (``mma``, on by default where it applies:
    4-bit codes, CUDA sm_80+, Triton with Gluon) instead of the Triton tiles. ``torch.compile`` reads the switches
    when it traces a graph; a traced graph always runs the Triton tiles."""
    global _FUSED, FUSED_MAX_ROWS, _SUM_IN_KERNEL, _MMA, _SWITCHES
    _FUSED = bool(enabled)
    if max_rows is not None:
        FUSED_MAX_ROWS = int(max_rows)
    if sum_in_kernel is not None:
        _SUM_IN_KERNEL = bool(sum_in_kernel)
    if mma is not None:
        _MMA = bool(mma)
    _SWITCHES = (_FUSED, FUSED_MAX_ROWS, _SUM_IN_KERNEL, _MMA)


if _HAS_TRITON:
    from torch.library import triton_op

    @triton_op("peft_qalora::float_zero_mm", mutates_args=())
    def float_zero_mm(
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int,
        sum_in_kernel: bool = True,
    ) -> torch.Tensor:
        """``x @ (s * (q - z'))`` for a 2-D ``x`` (rows x in_features); the fused kernel as a traceable op.

        ``sum_in_kernel``: split-K partial sums added by the kernel's last program per tile (one launch; its tile
        counters are zeros made in the graph) rather than by a second kernel. An argument, not the module switch, so
        that it is part of the graph that compile caches key on.
        """
        rows, dtype, device = x.shape[0], x.dtype, x.device
        call = FusedCall(
            qweight, scales, zeros, bits, group_size, rows, dtype, device, sum_in_kernel=sum_in_kernel, traced=True
        )
        return call(x)


def fused_supported(layer: nn.Module, x: torch.Tensor, max_rows: int | None = -1) -> bool:
    """Whether the fused kernel computes ``layer(x)``: see the module docstring for what it covers.

    ``max_rows``: the largest row count (``-1``: ``FUSED_MAX_ROWS``; ``None``: any, for benchmarks).
    """
    rows = x.numel() // max(1, x.shape[-1])
    limit = FUSED_MAX_ROWS if max_rows == -1 else max_rows
    return (
        _HAS_TRITON
        and _FUSED
        and x.shape[-1] == layer.in_features
        and 0 < rows
        and (limit is None or rows <= limit)
        and (x.is_cuda or _INTERPRET)
        and x.dtype in (torch.float16, torch.bfloat16)
        and not (x.requires_grad and torch.is_grad_enabled())  # no backward: dequantize + matmul has one
        and layer.qweight.device == x.device
        and _layout_group_size(layer) > 0
    )


def _layout_group_size(layer: nn.Module) -> int:
    """The layer's group size where the kernel covers its tensors' layout, else 0.

    Cached in the layer's ``_kernel_cache`` (``FloatZeroGPTQLinear`` empties it when its tensors change or move):
    decoding asks once per layer per token, and the checks read a dozen module attributes.
    """
    cache = getattr(layer, "_kernel_cache", None)
    if cache is not None and "fused_group_size" in cache:
        return cache["fused_group_size"]
    group_size = _group_size(layer)
    covered = (
        layer.bits in (2, 4, 8)
        and layer.qweight.dtype == torch.int32
        and layer.qweight.is_contiguous()
        and layer.scales.is_contiguous()
        and layer.zeros.dtype == torch.float32
        and layer.zeros.is_contiguous()
        and layer.in_features % (32 // layer.bits) == 0
        and _block_k(group_size) > 0
        and layer.scales.shape[0] == -(-layer.in_features // group_size)
        and layer._group_order() is None
        and _regular_groups(layer)
    )
    value = group_size if covered else 0
    if cache is not None:
        cache["fused_group_size"] = value
    return value


def _regular_groups(layer: nn.Module) -> bool:
    """Whether channel ``k`` is in group ``k // group_size``, the last group possibly shorter (what GPTQ writes)."""
    check = getattr(layer, "has_regular_groups", None)  # FloatZeroGPTQLinear's own test, where it has one
    return True if check is None else bool(check())


def _group_size(layer: nn.Module) -> int:
    group_size = int(layer.group_size)
    return layer.in_features if group_size <= 0 else group_size


def float_zero_gemm(
    layer: nn.Module, x: torch.Tensor, config: dict | None = None, max_rows: int | None = -1
) -> torch.Tensor | None:
    """``layer(x)`` for a merged ``FloatZeroGPTQLinear`` through the fused kernel, or ``None`` where it does not apply.

    ``config`` (tile, warps, split) and ``max_rows`` (see :func:`fused_supported`) are for benchmarks and tests; by
    default the tile is picked from the row count and shape, and more than ``FUSED_MAX_ROWS`` rows return ``None``.
    """
    if config is None and max_rows == -1 and not torch.compiler.is_compiling():
        prepared = _prepared_call(layer, x)  # the default eager call (decoding's), prepared once per shape
        if prepared is None:
            return None
        call, out_shape = prepared
        out = call(_as_rows(x))
    elif not fused_supported(layer, x, max_rows):
        return None
    else:
        flat = _as_rows(x)
        weights = _kernel_operands(layer)
        if torch.compiler.is_compiling():
            out = torch.ops.peft_qalora.float_zero_mm(flat, *weights, _SUM_IN_KERNEL)
        else:  # a caller's tile, or a row limit of its own: built for this call only
            sum_in_kernel = config.get("SUM_IN_KERNEL", _SUM_IN_KERNEL) if config else _SUM_IN_KERNEL
            call = FusedCall(
                *weights, flat.shape[0], x.dtype, x.device, config=config, sum_in_kernel=sum_in_kernel, mma=_MMA
            )
            out = call(flat)
        out_shape = (*x.shape[:-1], layer.out_features)
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype)
    return out.view(out_shape)


def _kernel_operands(layer: nn.Module) -> tuple:
    """What the kernel reads of a layer: ``(qweight, scales, zeros, bits, group_size)``."""
    return layer.qweight, layer.scales, layer.zeros, layer.bits, _layout_group_size(layer)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous (rows, in_features) matrix, which the kernel indexes as such."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.is_contiguous() else flat.contiguous()


def _prepared_call(layer: nn.Module, x: torch.Tensor) -> tuple[FusedCall, tuple] | None:
    """The layer's prepared default call for inputs like ``x``, with its output shape; ``None`` where the kernel does
    not apply. Kept in the layer's ``_kernel_cache`` per shape, dtype, device and switches."""
    if x.requires_grad and torch.is_grad_enabled():  # no backward: dequantize + matmul has one
        return None
    in_features = x.shape[-1]
    if x.numel() > FUSED_MAX_ROWS * in_features:  # prefill: checked first, so that its many shapes are never kept
        return None
    cache = getattr(layer, "_kernel_cache", None)
    key = ("fused call", _SWITCHES, x.shape, x.dtype, x.device)
    prepared = cache.get(key) if cache is not None else None
    if prepared is None:
        prepared = False
        if fused_supported(layer, x):
            rows = x.numel() // in_features
            call = FusedCall(*_kernel_operands(layer), rows, x.dtype, x.device, sum_in_kernel=_SUM_IN_KERNEL, mma=_MMA)
            prepared = (call, (*x.shape[:-1], layer.out_features))
        if cache is not None:
            cache[key] = prepared
    return prepared or None
