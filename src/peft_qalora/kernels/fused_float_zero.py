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
than a conversion (``fused_tiles._code_format``). Programs that share K write fp32 partial sums, which a second kernel adds
in a fixed order. Nothing is rounded to 16 bits but the activations (as given) and the output: the fp32 zero keeps its
full precision, where a 16-bit zero near 8 rounds by up to 0.004 steps (DESIGN.md, "The fold"), and the weight is
never rounded either (the dequantize-then-matmul path rounds it once). Design and measurements: docs/design.md, "The
merged layer at decoding sizes".

Applies to 2/4/8-bit codes, fp16/bf16 activations on CUDA, groups contiguous along the input (no act-order), any
group size whose largest power-of-two divisor up to 128 is at least 16, and a last group shorter than the others
(masked), for inputs that need no gradient (the kernel has no backward). Elsewhere :func:`float_zero_gemm` returns
``None`` and the caller takes another path. It is registered as
the custom op ``torch.ops.peft_qalora.float_zero_mm`` (``torch.library.triton_op``), so ``torch.compile`` traces
through it with no graph break and CUDA graphs capture its launch.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # Triton is optional: CPU installs may not have it
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # noqa: BLE001  # pragma: no cover - depends on the install
    _HAS_TRITON = False

from .fused_tiles import _INTERPRET, _block_k, _caller_plan, _cdiv, _launch_plan, _multiprocessors

# Up to this many rows the fused kernel runs; above it dequantize-then-cuBLAS (benchmarks/results/gpu.md, issue 14).
FUSED_MAX_ROWS = 64
_FUSED = True
# Eager split-K calls may add their partial sums inside the kernel (one launch) instead of in a second kernel. Off:
# faster on an H200 (7B eager decoding 24.7 -> 26.0 tokens/s at batch 1, 427 -> 478 at 16), but with it on, the merged
# model's 64-row logits moved 0.25 from the unmerged model's, against 0.0043 with two kernels (benchmarks/results/
# gpu.md, runs 12 and 14): a fault at some shape the small CUDA test does not reach. Compiled graphs take two kernels.
_SUM_IN_KERNEL = False


def set_fused_gemm(enabled: bool, max_rows: int | None = None, sum_in_kernel: bool | None = None) -> None:
    """Turn the fused small-batch kernel on (default) or off, and optionally set the largest row count it takes and
    whether eager calls that split K add the partial sums in the kernel itself (one launch per call; off by default)."""
    global _FUSED, FUSED_MAX_ROWS, _SUM_IN_KERNEL
    _FUSED = bool(enabled)
    if max_rows is not None:
        FUSED_MAX_ROWS = int(max_rows)
    if sum_in_kernel is not None:
        _SUM_IN_KERNEL = bool(sum_in_kernel)


if _HAS_TRITON:

    @triton.jit
    def _float_zero_mm_kernel(
        x_ptr,
        qweight_ptr,
        scales_ptr,
        zeros_ptr,
        out_ptr,  # (rows, N) in the activation dtype, or (split_k, rows, N) fp32 partial sums
        M,
        N,
        K,
        group_size,
        split_k,
        stride_xm,
        result_ptr,  # SUM_IN_KERNEL: (rows, N) in the activation dtype, which the last program of each tile writes
        counter_ptr,  # SUM_IN_KERNEL: int32 per output tile, zero between calls (the last program resets it)
        BITS: tl.constexpr,
        CODE_BITS: tl.constexpr,  # != 0: a code becomes the 16-bit float CODE_OFFSET + q by bit pattern
        CODE_OFFSET: tl.constexpr,
        FOLD_OFFSET: tl.constexpr,  # take CODE_OFFSET out once per group (bf16) instead of per code (fp16)
        BLOCK_M: tl.constexpr,  # 1: fp32 multiply-adds for one row instead of a padded tensor-core tile
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # divides the group size: a K block never spans two groups
        STEPS: tl.constexpr,  # K blocks per loop iteration (more loads in flight)
        ROW_SUM_EACH_BLOCK: tl.constexpr,  # one row: reduce every K block instead of once at the end
        SUM_IN_KERNEL: tl.constexpr,  # split K: the last program of a tile adds the partial sums (one launch)
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        per_word: tl.constexpr = 32 // BITS
        words_per_block: tl.constexpr = BLOCK_K // per_word
        maxq: tl.constexpr = (1 << BITS) - 1
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, words_per_block)
        # Each word is loaded once and unpacked with shifts: code j of word w is input channel per_word * w + j.
        shifts = tl.arange(0, per_word) * BITS
        channel = offs_w[:, None] * per_word + tl.arange(0, per_word)[None, :]  # (words, per_word), from the block
        mask_m = offs_m < M
        mask_n = offs_n < N
        k_words = K // per_word
        if BLOCK_M == 1:
            acc3 = tl.zeros((words_per_block, per_word, BLOCK_N), dtype=tl.float32)
            acc_row = tl.zeros((BLOCK_N,), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        chunk: tl.constexpr = BLOCK_K * STEPS
        for k0 in range(pid_k * chunk, K, split_k * chunk):
            for step in tl.static_range(STEPS):
                start = k0 + step * BLOCK_K
                word_rows = start // per_word + offs_w
                words = tl.load(
                    qweight_ptr + word_rows[:, None] * N + offs_n[None, :],
                    mask=(word_rows[:, None] < k_words) & mask_n[None, :],
                    other=0,
                    eviction_policy="evict_first",  # each code is read once: leave the cache to x
                )
                codes = (words[:, None, :] >> shifts[None, :, None]) & maxq  # (words, per_word, BLOCK_N)
                group = start // group_size
                live = mask_n & (start < K)
                scale = tl.load(scales_ptr + group * N + offs_n, mask=live, other=0.0).to(tl.float32)
                zero = tl.load(zeros_ptr + group * N + offs_n, mask=live, other=0.0)
                if BLOCK_M == 1:
                    k3 = start + channel
                    x3 = tl.load(x_ptr + pid_m * stride_xm + k3, mask=k3 < K, other=0.0).to(tl.float32)
                    # a code's exact fp32 value: its bits in the mantissa of 2**23, minus 2**23 (no int->float cvt)
                    value = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    x_sum = tl.sum(tl.sum(x3, axis=1), axis=0)
                    if ROW_SUM_EACH_BLOCK:
                        part = tl.sum(tl.sum(x3[:, :, None] * value, axis=1), axis=0)
                        acc_row += scale * (part - x_sum * zero)
                    else:  # multiply-adds only; the sum across threads happens once
                        acc3 += x3[:, :, None] * (value * scale[None, None, :])
                        acc_row -= scale * zero * x_sum
                else:
                    offs_k = start + tl.arange(0, BLOCK_K)
                    x = tl.load(
                        x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k[None, :] < K),
                        other=0.0,
                    )
                    if CODE_BITS != 0:  # (q | CODE_BITS) read as a 16-bit float is CODE_OFFSET + q, exactly
                        values = (codes | CODE_BITS).to(tl.int16).to(x.dtype, bitcast=True)
                        if not FOLD_OFFSET:
                            values = values - CODE_OFFSET  # exact: q is representable
                    else:
                        values = codes.to(x.dtype)
                    # integer codes are exact in bf16/fp16 and their products with x exact in fp32
                    part = tl.dot(x, tl.reshape(values, (BLOCK_K, BLOCK_N)))
                    x_sum = tl.sum(x.to(tl.float32), axis=1)
                    if CODE_BITS != 0 and FOLD_OFFSET:
                        part -= x_sum[:, None] * CODE_OFFSET
                    acc += scale[None, :] * (part - x_sum[:, None] * zero[None, :])
        if BLOCK_M == 1:
            acc = (tl.sum(tl.sum(acc3, axis=1), axis=0) + acc_row)[None, :]
        offs_out = offs_m[:, None] * N + offs_n[None, :]
        mask_out = mask_m[:, None] & mask_n[None, :]
        tl.store(out_ptr + pid_k * M * N + offs_out, acc.to(out_ptr.dtype.element_ty), mask=mask_out)
        if SUM_IN_KERNEL:
            # What _sum_splits_kernel does, without its launch: the program that finishes a tile last adds the
            # tile's partial sums in split order (the same fp32 sums, so the same bits) and rounds them once.
            tl.debug_barrier()  # every thread's partial sums are stored before the release below
            tile = pid_m * tl.num_programs(0) + pid_n
            arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == split_k - 1:
                total = tl.load(out_ptr + offs_out, mask=mask_out, other=0.0, cache_modifier=".cg")
                for s in range(1, split_k):
                    total += tl.load(out_ptr + s * M * N + offs_out, mask=mask_out, other=0.0, cache_modifier=".cg")
                tl.store(result_ptr + offs_out, total.to(result_ptr.dtype.element_ty), mask=mask_out)
                tl.atomic_xchg(counter_ptr + tile, 0)  # ready for the next call

    @triton.jit
    def _sum_splits_kernel(partial_ptr, out_ptr, total, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        """``out = sum(partial[s] for s in range(SPLIT_K))`` in fp32, rounded once: fixed order, reproducible."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        acc = tl.load(partial_ptr + offs, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLIT_K):
            acc += tl.load(partial_ptr + s * total + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _eager(kernel):
    return kernel  # launch as is (``wrap_triton`` when traced)


_COUNTERS: dict[tuple, torch.Tensor] = {}


def _tile_counters(device: torch.device, weight_address: int, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters, one per output tile, for one layer's in-kernel split-K sums (the kernel re-zeroes them).

    One set per layer's weight, so that layers running at once on different streams never share a counter.
    """
    key = (device, weight_address, tiles)
    counters = _COUNTERS.get(key)
    if counters is None:
        counters = _COUNTERS[key] = torch.zeros(tiles, device=device, dtype=torch.int32)
    return counters


def _launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    out_features: int,
    config: dict | None,
    wrap=_eager,
    sum_in_kernel: bool = False,
) -> torch.Tensor:
    rows, in_features = x.shape
    block_k = _block_k(group_size)
    if config is None:  # cached per shape: this runs once per layer call while decoding
        # the tile depends on the rows through their bucket only: under torch.compile ``rows`` may be symbolic, and
        # these comparisons become guards (one graph per bucket), where hashing it would fail
        bucket = 1 if rows == 1 else 16 if rows <= 16 else 32 if rows <= 32 else 64
        processors = _multiprocessors(x.device.index or 0)
        plan = _launch_plan(bucket, in_features, out_features, block_k, processors, x.dtype, bits)
    else:
        plan = _caller_plan(config, block_k, x.dtype, bits)
    split_k, block_m, block_n, kwargs = plan
    sum_in_kernel = sum_in_kernel and split_k > 1
    if split_k == 1:
        out = torch.empty((rows, out_features), device=x.device, dtype=x.dtype)
    else:
        out = torch.empty((split_k, rows, out_features), device=x.device, dtype=torch.float32)
    grid = (_cdiv(out_features, block_n), _cdiv(rows, block_m), split_k)
    if sum_in_kernel:
        result = torch.empty((rows, out_features), device=x.device, dtype=x.dtype)
        counters = _tile_counters(x.device, qweight.data_ptr(), grid[0] * grid[1])
    elif wrap is _eager:
        result = counters = out  # not read
    else:  # traced: distinct (empty) tensors, so that no argument of the traced kernel aliases another
        result, counters = x.new_empty(0), x.new_empty(0, dtype=torch.int32)
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
        split_k,
        x.stride(0),
        result,
        counters,
        SUM_IN_KERNEL=sum_in_kernel,
        **kwargs,
    )
    if sum_in_kernel:
        return result
    if split_k == 1:
        return out
    total = rows * out_features
    result = torch.empty((rows, out_features), device=x.device, dtype=x.dtype)
    block = 1024
    wrap(_sum_splits_kernel)[(_cdiv(total, block),)](out, result, total, SPLIT_K=split_k, BLOCK=block)
    return result


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
    if not fused_supported(layer, x, max_rows):
        return None
    flat = x.reshape(-1, layer.in_features)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    args = (flat, layer.qweight, layer.scales, layer.zeros, layer.bits, _layout_group_size(layer))
    if config is None and torch.compiler.is_compiling():
        out = torch.ops.peft_qalora.float_zero_mm(*args)
    else:  # eager: launch directly, without the dispatcher's overhead per call
        sum_in_kernel = _SUM_IN_KERNEL if config is None else config.get("SUM_IN_KERNEL", _SUM_IN_KERNEL)
        out = _launch(*args, layer.out_features, config, sum_in_kernel=sum_in_kernel)
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], layer.out_features)
