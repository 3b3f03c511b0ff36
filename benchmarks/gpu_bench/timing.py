# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""How the benchmark measures time: ``Timer`` (CUDA events on CUDA, ``perf_counter`` elsewhere) for whole steps and
generations, ``time_call`` (do_bench GPU time and wall time per call), ``bench_us`` and the CUDA-graph replays of
``graph_us`` / ``graph_us_each`` for single kernels, and ``hbm_copies``, the deep copies of a layer that make every
timed call read its weights from HBM rather than from the L2 cache.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Timer:
    """Milliseconds of a region: CUDA events on CUDA, perf_counter elsewhere."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __enter__(self) -> Timer:
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def time_call(fn: Callable[[], Any], args: argparse.Namespace) -> dict:
    """GPU time (triton do_bench median) and wall time per call in a back-to-back loop (CPU dispatch included)."""
    if args.device.startswith("cuda"):
        import triton.testing

        gpu_ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    else:
        gpu_ms = float("nan")
    for _ in range(10):
        fn()
    sync(args.device)
    n = 200 if args.device.startswith("cuda") else 3
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(args.device)
    return {"gpu_us": gpu_ms * 1e3, "loop_us": (time.perf_counter() - start) / n * 1e6}


def bench_us(fn: Callable[[], Any], quick: bool = False) -> float:
    """GPU us per call, do_bench median. Its events enclose the Python launch: under CPU load (run 6 compiled Marlin
    beside the sweep) a kernel shorter than its launch reads as the launch time; graph_us() does not."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median") * 1e3


def graph_us(fn: Callable[[], Any], rep: int = 25) -> float:
    """GPU us per call replayed from a CUDA graph (no launch overhead): the kernel time that decoding with CUDA
    graphs (a compiled static-cache ``generate``) pays; NaN where ``fn`` cannot be captured."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3
    except Exception:  # noqa: BLE001 - e.g. a kernel that synchronizes
        torch.cuda.synchronize()
        return float("nan")


def graph_us_each(call: Callable[[Any], Any], items: list) -> float:
    """``graph_us`` of ``call(item)`` for every item in turn, per call. Each item holds its own weights and together
    they exceed the L2 cache (H200: 50 MB), so every call reads its weights from HBM, as a decoding step does;
    repeating one 4096x4096 layer (9 MB) would time it from L2."""
    return graph_us(lambda: [call(item) for item in items]) / len(items)


def hbm_copies(layer: torch.nn.Module, min_bytes: int = 128 << 20) -> list[torch.nn.Module]:
    """``layer`` and enough deep copies of it that their tensors total ``min_bytes`` (beyond any L2 cache)."""
    size = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    return [layer] + [copy.deepcopy(layer) for _ in range(max(0, -(-min_bytes // size) - 1))]
