# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The merged layer's own Python per fused-kernel call, without a GPU: everything ``float_zero_gemm`` does but launch.

Eager decoding is bound by the CPU (benchmarks/results/gpu.md, issue 14): per layer call, the package's dispatch and
launch preparation add to Triton's launch cost. Here the two Triton kernels are replaced by stubs that accept the
launch and do nothing, and the CPU tensors are let through (the interpreter switch), so what is timed is the
package's code alone: the checks, the tile and launch plan, the output allocations. Beside it, one ``torch.empty`` of
the output's size, as a unit. Medians of repeated loops, 7B q_proj shape (4096 x 4096, g128), bf16::

    python benchmarks/fused_launch_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from peft_qalora import FloatZeroGPTQLinear
from peft_qalora.gptq import pack_qweight
from peft_qalora.kernels import fused_float_zero


class _StubKernel:
    """Takes ``kernel[grid](*args, **kwargs)`` and launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    for _ in range(calls // 10):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    k = n = 4096
    layer = FloatZeroGPTQLinear(4, 128, k, n)
    layer.qweight = pack_qweight(torch.randint(0, 16, (k, n)), 4)
    layer.scales = torch.rand(k // 128, n).half()
    layer.zeros = torch.full((k // 128, n), 8.0)
    fused_float_zero._float_zero_mm_kernel = _StubKernel()
    fused_float_zero._sum_splits_kernel = _StubKernel()
    fused_float_zero._INTERPRET = True  # let CPU tensors through the device check
    print("| rows | float_zero_gemm, us per call | one torch.empty, us |")
    print("|---|---|---|")
    for rows in (1, 16):
        x = torch.randn(1, rows, k).bfloat16()
        gemm = per_call_us(lambda: fused_float_zero.float_zero_gemm(layer, x), args.calls, args.repeats)
        empty = per_call_us(lambda: torch.empty(rows, n, dtype=torch.bfloat16), args.calls, args.repeats)
        print(f"| {rows} | {gemm:.1f} | {empty:.1f} |")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
