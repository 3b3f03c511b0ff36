# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The merged layer's CPU cost per fused-kernel call: the package's Python alone, or with the real Triton launches.

Eager decoding is bound by the CPU (benchmarks/results/gpu.md, issue 14): per layer call, the package's dispatch and
launch preparation add to Triton's launch cost. Without a GPU (the default) the two Triton kernels are replaced by
stubs that accept the launch and do nothing, and the CPU tensors are let through (the interpreter switch), so what
is timed is the package's code alone: the checks, the tile and launch plan, the output allocations. With ``--device
cuda`` the real kernels launch, once with every launch through Triton's JIT (``set_direct_launch(False)``) and once
launching the cached compiled kernels directly (the default, ``kernels/triton_launch.py``), timed alternately;
beside them, one ``torch.empty`` of the output's size, as a unit. Wall time per call of an eager loop, medians of
repeated loops, 7B q_proj shape (4096 x 4096, g128), bf16 (at one row the GPU needs ~11 us per call on an H200, so a
loop time above that is the CPU's)::

    python benchmarks/fused_launch_overhead.py
    python benchmarks/fused_launch_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from peft_qalora import FloatZeroGPTQLinear
from peft_qalora.gptq import pack_qweight
from peft_qalora.kernels import fused_call, fused_float_zero, set_direct_launch


class _StubKernel:
    """Takes ``kernel[grid](*args, **kwargs)`` and launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn: Callable[[], object], calls: int, repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    for _ in range(calls // 10):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    k = n = 4096
    layer = FloatZeroGPTQLinear(4, 128, k, n)
    layer.qweight = pack_qweight(torch.randint(0, 16, (k, n)), 4)
    layer.scales = torch.rand(k // 128, n).half()
    layer.zeros = torch.full((k // 128, n), 8.0)
    if args.device == "cpu":
        fused_call._float_zero_mm_kernel = _StubKernel()
        fused_call._sum_splits_kernel = _StubKernel()
        fused_float_zero._INTERPRET = True  # let CPU tensors through the device check
        print("| rows | float_zero_gemm, kernels stubbed, us per call | one torch.empty, us |")
        print("|---|---|---|")
    else:
        layer = layer.cuda()
        print("| rows | float_zero_gemm, JIT launch, us per call | direct launch (default), us | one torch.empty, us |")
        print("|---|---|---|---|")
    sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None
    for rows in (1, 16):
        x = torch.randn(1, rows, k).bfloat16().to(args.device)

        def gemm(x=x):
            return fused_float_zero.float_zero_gemm(layer, x)

        empty = per_call_us(lambda: torch.empty(rows, n, dtype=torch.bfloat16, device=args.device), args.calls, 3)
        if args.device == "cpu":
            print(f"| {rows} | {per_call_us(gemm, args.calls, args.repeats):.1f} | {empty:.1f} |")
            continue
        jit, direct = [], []
        for _ in range(args.repeats):  # alternately, so that drift of the machine hits both alike
            set_direct_launch(False)
            jit.append(per_call_us(gemm, args.calls, 1, sync))
            set_direct_launch(True)
            direct.append(per_call_us(gemm, args.calls, 1, sync))
        print(f"| {rows} | {statistics.median(jit):.1f} | {statistics.median(direct):.1f} | {empty:.1f} |")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
