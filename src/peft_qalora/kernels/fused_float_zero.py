# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""A fused small-batch matmul for merged layers: ``x @ (s * (q - z'))`` without a dense weight.

``FloatZeroGPTQLinear`` keeps GPTQ's packed codes ``q``, fp16 scales ``s`` and fp32 real-valued zeros ``z'``. For the
few rows of decoding, dequantizing the whole weight and calling cuBLAS reads and writes the weight several times
(benchmarks/results/gpu.md: 75-116 us per 7B layer where Marlin takes 14-22 us). This kernel reads the packed codes,
scales and zeros once and never writes a weight. It uses the fold's algebra rather than a dequantized tile: inside a
group ``g`` the scale and zero are constant, so

    out[m, n] = sum_g s[g, n] * (sum_{k in g} x[m, k] q[k, n]  -  z'[g, n] * sum_{k in g} x[m, k])

The inner sum multiplies the activations by the integer codes, which bf16/fp16 hold exactly, on the tensor cores
(``tl.dot``, fp32 accumulation; a broadcast multiply-add for one row); scale and zero are applied per group in fp32.
Nothing is rounded to 16 bits but the activations (as given) and the output: the fp32 zero keeps its full precision,
where a 16-bit zero near 8 rounds by up to 0.004 steps (DESIGN.md, "The fold"), and the weight is never rounded to
bf16 either (the dequantize-then-matmul path rounds it once).

Applies to 2/4/8-bit codes, fp16/bf16 activations on CUDA, groups contiguous along the input (no act-order), any
group size whose largest power-of-two divisor up to 128 is at least 16, and a last group shorter than the others
(masked). Elsewhere :func:`float_zero_gemm` returns ``None`` and the caller takes another path. It is registered as
the custom op ``torch.ops.peft_qalora.float_zero_mm`` (``torch.library.triton_op``), so ``torch.compile`` traces
through it with no graph break and CUDA graphs capture its launch.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

try:  # Triton is optional: CPU installs may not have it
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # noqa: BLE001  # pragma: no cover - depends on the install
    _HAS_TRITON = False

# Up to this many rows the fused kernel runs; above it dequantize-then-cuBLAS (benchmarks/results/gpu.md, issue 14).
FUSED_MAX_ROWS = 64
_FUSED = True
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads it at import too


def set_fused_gemm(enabled: bool, max_rows: int | None = None) -> None:
    """Turn the fused small-batch kernel on (default) or off, and optionally set the largest row count it takes."""
    global _FUSED, FUSED_MAX_ROWS
    _FUSED = bool(enabled)
    if max_rows is not None:
        FUSED_MAX_ROWS = int(max_rows)


if _HAS_TRITON:

    @triton.jit
    def _float_zero_mm_kernel(
        x_ptr,
        qweight_ptr,
        scales_ptr,
        zeros_ptr,
        out_ptr,
        M,
        N,
        K,
        group_size,
        stride_xm,
        stride_om,
        BITS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # divides the group size: a K block never spans two groups
        STEPS: tl.constexpr,  # K blocks per loop iteration (more loads in flight)
        SPLIT_K: tl.constexpr,  # > 1: programs share the K range and add fp32 partial sums atomically
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        per_word: tl.constexpr = 32 // BITS
        maxq: tl.constexpr = (1 << BITS) - 1
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        chunk: tl.constexpr = BLOCK_K * STEPS
        for k0 in range(pid_k * chunk, K, SPLIT_K * chunk):
            for step in tl.static_range(STEPS):
                start = k0 + step * BLOCK_K
                offs_k = start + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K  # the tail of a last, shorter group (and of the last chunk)
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0,
                )
                words = tl.load(
                    qweight_ptr + (offs_k[:, None] // per_word) * N + offs_n[None, :],
                    mask=mask_k[:, None] & mask_n[None, :],
                    other=0,
                )
                codes = (words >> ((offs_k[:, None] % per_word) * BITS)) & maxq
                if BLOCK_M == 1:  # one row: a broadcast multiply-add, no padded tensor-core tile
                    part = tl.sum(x.to(tl.float32)[:, :, None] * codes.to(tl.float32)[None, :, :], axis=1)
                else:  # integer codes are exact in bf16/fp16; products are exact in the fp32 accumulator
                    part = tl.dot(x, codes.to(x.dtype))
                x_sum = tl.sum(x.to(tl.float32), axis=1)
                group = start // group_size
                live = mask_n & (start < K)
                scale = tl.load(scales_ptr + group * N + offs_n, mask=live, other=0.0).to(tl.float32)
                zero = tl.load(zeros_ptr + group * N + offs_n, mask=live, other=0.0)
                acc += scale[None, :] * (part - x_sum[:, None] * zero[None, :])
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(out, acc, mask=mask, sem="relaxed")


def _block_k(group_size: int) -> int:
    """The largest power of two up to 128 that divides the group size (0 if below 16: tl.dot's minimum)."""
    block = 128
    while block >= 16:
        if group_size % block == 0:
            return block
        block //= 2
    return 0


@functools.lru_cache(maxsize=256)
def _pick_config(rows: int, in_features: int, out_features: int, block_k: int) -> dict:
    """Tile, warps and split for ``rows`` x ``in_features`` @ ``in_features`` x ``out_features``.

    Chosen from the sweep in ``benchmarks/gpu.py --phases tiles`` on an H200 (benchmarks/results/): enough programs
    to cover every multiprocessor several times, and several K blocks per program in flight.
    """
    if rows == 1:
        block_m, block_n, warps = 1, 64, 4
    elif rows <= 16:
        block_m, block_n, warps = 16, 64, 4
    elif rows <= 32:
        block_m, block_n, warps = 32, 64, 4
    else:
        block_m, block_n, warps = 64, 64, 4
    steps = max(1, 256 // block_k)
    tiles = triton.cdiv(out_features, block_n) * triton.cdiv(rows, block_m)
    split_k = 1
    chunks = triton.cdiv(in_features, block_k * steps)
    while tiles * split_k < 4 * 132 and split_k * 2 <= chunks // 4:
        split_k *= 2
    config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "STEPS": steps, "SPLIT_K": split_k}
    if not _INTERPRET:  # the interpreter knows no warps or stages
        config.update(num_warps=warps, num_stages=3)
    return config


def _launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    out_features: int,
    config: dict | None,
    wrap=lambda kernel: kernel,
) -> torch.Tensor:
    rows, in_features = x.shape
    block_k = _block_k(group_size)
    if config is None:  # cached per shape: this runs once per layer call while decoding
        config = _pick_config(rows, in_features, out_features, block_k)
    else:  # a caller's tile (benchmarks): K blocks may never span two groups
        config = dict(config, BLOCK_K=min(config.get("BLOCK_K", block_k), block_k))
        if _INTERPRET:
            config.pop("num_warps", None)
            config.pop("num_stages", None)
    split_k = config["SPLIT_K"]
    if split_k == 1:
        out = torch.empty((rows, out_features), device=x.device, dtype=x.dtype)
    else:
        out = torch.zeros((rows, out_features), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(out_features, config["BLOCK_N"]), triton.cdiv(rows, config["BLOCK_M"]), split_k)
    wrap(_float_zero_mm_kernel)[grid](
        x,
        qweight,
        scales,
        zeros,
        out,
        rows,
        out_features,
        in_features,
        group_size,
        x.stride(0),
        out.stride(0),
        BITS=bits,
        **config,
    )
    return out if split_k == 1 else out.to(x.dtype)


if _HAS_TRITON:
    from torch.library import triton_op, wrap_triton

    @triton_op("peft_qalora::float_zero_mm", mutates_args=())
    def float_zero_mm(
        x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
    ) -> torch.Tensor:
        """``x @ (s * (q - z'))`` for a 2-D ``x`` (rows x in_features); the fused kernel as a traceable op."""
        return _launch(x, qweight, scales, zeros, bits, group_size, qweight.shape[1], None, wrap=wrap_triton)


def fused_supported(layer: nn.Module, x: torch.Tensor, max_rows: int | None = -1) -> bool:
    """Whether the fused kernel computes ``layer(x)``: see the module docstring for what it covers.

    ``max_rows``: the largest row count (``-1``: ``FUSED_MAX_ROWS``; ``None``: any, for benchmarks).
    """
    rows = x.numel() // max(1, x.shape[-1])
    limit = FUSED_MAX_ROWS if max_rows == -1 else max_rows
    return (
        _HAS_TRITON
        and _FUSED
        and 0 < rows
        and (limit is None or rows <= limit)
        and (x.is_cuda or _INTERPRET)
        and x.dtype in (torch.float16, torch.bfloat16)
        and layer.bits in (2, 4, 8)
        and layer.qweight.device == x.device
        and layer.qweight.dtype == torch.int32
        and layer.qweight.is_contiguous()
        and layer.scales.is_contiguous()
        and layer.zeros.dtype == torch.float32
        and layer.zeros.is_contiguous()
        and layer.in_features % (32 // layer.bits) == 0
        and _block_k(_group_size(layer)) > 0
        and layer.scales.shape[0] == -(-layer.in_features // _group_size(layer))
        and layer._group_order() is None
        and _regular_groups(layer)
    )


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
    if not fused_supported(layer, x, max_rows):
        return None
    flat = x.reshape(-1, layer.in_features)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    args = (flat, layer.qweight, layer.scales, layer.zeros, layer.bits, _group_size(layer))
    if config is None and torch.compiler.is_compiling():
        out = torch.ops.peft_qalora.float_zero_mm(*args)
    else:  # eager: launch directly, without the dispatcher's overhead per call
        out = _launch(*args, layer.out_features, config)
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], layer.out_features)
