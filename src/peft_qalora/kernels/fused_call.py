# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""One call of the fused float-zero kernel for one input shape, prepared once and launched many times.

Decoding calls every merged layer with the same shape once per token, and eager decoding is bound by the CPU
(benchmarks/results/gpu.md, issue 14): what a call needs besides its input and outputs (the tile, the grid, the
split, the kernel's constants, its compiled form) is worked out once per layer and shape and kept in the layer's
``_kernel_cache``. A call then allocates its outputs and makes one or two direct launches (:mod:`.triton_launch`).
The same object, built afresh each time, serves the traced op (``torch.compile``) and callers that pass their own
tile (benchmarks, tests).
"""

from __future__ import annotations

import torch

from .fused_kernels import _HAS_TRITON
from .fused_mma import _HAS_GLUON, mma_supported
from .fused_tiles import _block_k, _caller_plan, _cdiv, _launch_plan, _multiprocessors
from .triton_launch import CachedLaunch

if _HAS_TRITON:
    from .fused_kernels import _float_zero_mm_kernel, _sum_splits_kernel
if _HAS_GLUON:
    from .fused_mma import _float_zero_mma_kernel

_SUM_BLOCK = 1024
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


def row_bucket(rows, mma: bool = False) -> int:
    """The row count the default tile is picked for: 1, 16, 32 or 64, and 8 for the fragment kernel's 2-8 rows.

    Compared rather than hashed: under ``torch.compile`` ``rows`` may be symbolic, and these comparisons become
    guards (one graph per bucket), where hashing it would fail (run 8, ``unhashable SymInt``).
    """
    if rows == 1:
        return 1
    if mma and rows <= 8:
        return 8
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


class FusedCall:
    """``x @ (s * (q - z'))`` for ``rows`` x ``in_features`` inputs of one dtype on one device.

    ``config``: a caller's tile (benchmarks, tests) instead of the default for the rows' bucket. ``sum_in_kernel``:
    split-K partial sums added by the last program of each tile (one launch). ``mma``: the default tile may be the
    fragment kernel's (:mod:`.fused_mma`) where it applies. ``traced``: launch through ``torch.library.wrap_triton``
    (inside the custom op, under ``torch.compile``), with the Triton kernels only (``wrap_triton`` analyses a kernel
    as Triton source, and Inductor writes it out under ``@triton.jit``: not Gluon); otherwise through
    :class:`~.triton_launch.CachedLaunch`, which launches the compiled kernels directly from the second call on.
    """

    __slots__ = ("rows", "out_features", "dtype", "device", "split_k", "sum_in_kernel", "traced", "weights", "_mm")
    __slots__ += ("_scalars", "_tiles", "_counters", "_sum", "_total")

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int,
        rows,
        dtype: torch.dtype,
        device: torch.device,
        config: dict | None = None,
        sum_in_kernel: bool = False,
        traced: bool = False,
        mma: bool = False,
    ) -> None:
        in_features, out_features = qweight.shape[0] * (32 // bits), qweight.shape[1]
        block_k = _block_k(group_size)
        if config is None:
            processors = _multiprocessors(device.index or 0)
            mma = mma and not traced and mma_supported(device, bits, block_k, in_features)
            bucket = row_bucket(rows, mma)
            plan = _launch_plan(bucket, in_features, out_features, block_k, processors, dtype, bits, mma)
        else:
            plan = _caller_plan(config, block_k, dtype, bits)
        split_k, block_m, block_n, kwargs = plan
        kwargs = dict(kwargs)  # the plan is cached: shared
        fragment = kwargs.pop("MMA", False)
        # the default plan takes the fragment kernel only where it applies (checked above); a caller's tile may ask
        # for it anywhere
        caller_fragment = fragment and config is not None
        if caller_fragment and (traced or rows > block_m or not mma_supported(device, bits, block_k, in_features)):
            raise ValueError(
                f"the fragment kernel (MMA) takes up to BLOCK_M (8 or 16) rows of 4-bit codes on CUDA sm_80+, "
                f"untraced, K a multiple of {block_k}; got {rows} rows, {bits} bits, K={in_features} on {device}"
                f"{' (traced)' if traced else ''}: leave MMA out of the tile"
            )
        kernel = _float_zero_mma_kernel if fragment else _float_zero_mm_kernel
        self.rows, self.out_features, self.dtype, self.device = rows, out_features, dtype, device
        self.split_k, self.traced = split_k, traced
        self.sum_in_kernel = sum_in_kernel and split_k > 1
        self.weights = (qweight, scales, zeros)
        # the inputs are contiguous: their row stride is in_features
        self._scalars = (rows, out_features, in_features, group_size, in_features)
        grid = (_cdiv(out_features, block_n), _cdiv(rows, block_m), split_k)
        self._tiles = grid[0] * grid[1]
        # eager: one set of counters per layer, kept; traced: zeros made inside the graph on every call (a tensor the
        # op kept would be a constant of the graph, which the op has to leave unchanged)
        eager_sums = self.sum_in_kernel and not traced
        self._counters = _tile_counters(device, qweight.data_ptr(), self._tiles) if eager_sums else None
        # the input, the outputs (partial sums, result) and the counters vary from call to call
        constexprs = {"SPLIT_K": split_k, "SUM_IN_KERNEL": self.sum_in_kernel, **kwargs}
        self._mm = self._launcher(kernel, grid, constexprs, (0, 4, 10, 11))
        self._total = rows * out_features
        self._sum = None
        if split_k > 1 and not self.sum_in_kernel:
            sum_grid = (_cdiv(self._total, _SUM_BLOCK), 1, 1)
            self._sum = self._launcher(_sum_splits_kernel, sum_grid, {"SPLIT_K": split_k, "BLOCK": _SUM_BLOCK}, (0, 1))

    def _launcher(self, kernel, grid: tuple, constexprs: dict, varying: tuple[int, ...]):
        if self.traced:
            from torch.library import wrap_triton

            return lambda *args: wrap_triton(kernel)[grid](*args, **constexprs)
        return CachedLaunch(kernel, grid, constexprs, varying)

    @property
    def compiled_variants(self) -> int:
        """How many compiled kernels this call launches directly (see ``CachedLaunch.compiled_variants``)."""
        return sum(launch.compiled_variants for launch in (self._mm, self._sum) if isinstance(launch, CachedLaunch))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The product for a contiguous ``(rows, in_features)`` input."""
        rows, out_features, device = self.rows, self.out_features, self.device
        if self.split_k == 1:
            out = torch.empty((rows, out_features), device=device, dtype=self.dtype)
        else:
            out = torch.empty((self.split_k, rows, out_features), device=device, dtype=torch.float32)
        if self.sum_in_kernel:
            result = torch.empty((rows, out_features), device=device, dtype=self.dtype)
            counters = self._counters
            if counters is None:  # traced
                counters = torch.zeros(self._tiles, device=device, dtype=torch.int32)
        elif self.traced:  # distinct (empty) tensors, so that no argument of the traced kernel aliases another
            result, counters = x.new_empty(0), x.new_empty(0, dtype=torch.int32)
        else:
            result = counters = out  # not read
        self._mm(x, *self.weights, out, *self._scalars, result, counters)
        if self._sum is None:
            return result if self.sum_in_kernel else out
        result = torch.empty((rows, out_features), device=device, dtype=self.dtype)
        self._sum(out, result, self._total)
        return result
