# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""How long reading a merged layer's packed codes takes alone, beside the fused kernel's one-row call (CUDA).

The fused kernel's one-row programs each read one K block of codes, a (16 words x 256 columns) tile of GPTQ's
``qweight`` (``in_features / 8`` x ``out_features`` int32), and then do the arithmetic. A probe kernel that reads
the same tiles in the same grid and does nothing with them but an XOR gives the floor any kernel reading the codes
this way has: what the fused call takes beyond it is arithmetic, the split sums and the launch. Beside it the same
probe on codes stored tile by tile (each 16 KB tile contiguous, as Marlin repacks its weights at load), and a plain
device copy. GPU us per call from CUDA-graph replays over enough copies of the codes to exceed the L2 cache (as in
decoding, every call reads from HBM); TB/s is the codes' bytes over that time (scales and zeros not counted).

On an H200 (benchmarks/results/gpu.md, ninth pass, run 41) the codes alone take 4.1 / 7.8 / 7.3 us on 7B's q / gate /
down at 32 splits, where the fused call took 9.6 / 17.7 / 17.7: more than half its time was arithmetic and epilogue,
not reading (7.9 / 14.4 / 14.0 since the one-row code conversion became two integer operations, run 43).

    python benchmarks/code_read_floor.py
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the gpu_bench package beside this file

import torch
from gpu_bench.checkpoints import LAYER_SHAPES
from gpu_bench.tiles import random_float_zero_layer
from gpu_bench.timing import graph_us, graph_us_each, hbm_copies

from peft_qalora.kernels import float_zero_gemm

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_WORDS, _COLUMNS = 16, 256  # the one-row tile: a 128-channel K block of 4-bit codes by 256 output columns
_MIN_BYTES = 160 << 20  # beyond the H200's 50 MB L2

if triton is not None:

    @triton.jit
    def _read_codes(codes_ptr, out_ptr, N, K_WORDS, TILED: tl.constexpr, WORDS: tl.constexpr, COLUMNS: tl.constexpr):
        """XOR of every word of this program's K blocks, split along K as the fused kernel's one-row grid is."""
        pid_n, pid_k = tl.program_id(0), tl.program_id(2)
        offs_w = tl.arange(0, WORDS)
        offs_c = tl.arange(0, COLUMNS)
        acc = tl.zeros((WORDS, COLUMNS), dtype=tl.int32)
        for block in range(pid_k, K_WORDS // WORDS, tl.num_programs(2)):
            if TILED:  # tile (block, pid_n) stored contiguously, row-major inside
                tile = block * tl.num_programs(0) + pid_n
                ptrs = codes_ptr + tile * (WORDS * COLUMNS) + offs_w[:, None] * COLUMNS + offs_c[None, :]
            else:  # GPTQ's layout, as the fused kernel reads it
                ptrs = codes_ptr + (block * WORDS + offs_w[:, None]) * N + pid_n * COLUMNS + offs_c[None, :]
            acc ^= tl.load(ptrs, eviction_policy="evict_first")
        tl.store(out_ptr + pid_k * N + pid_n * COLUMNS + offs_c, tl.xor_sum(acc, axis=0))


def read_us(k: int, n: int, split: int, tiled: bool) -> float:
    """GPU us per read of a (k / 8) x n code matrix in one-row tiles, ``split`` programs along K."""
    k_words = k // 8
    copies = max(2, -(-_MIN_BYTES // (k_words * n * 4)))
    codes = [torch.randint(0, 2**31 - 1, (k_words, n), device="cuda", dtype=torch.int32) for _ in range(copies)]
    out = torch.empty(split, n, device="cuda", dtype=torch.int32)
    grid = (n // _COLUMNS, 1, split)

    def read_all() -> None:
        for c in codes:
            _read_codes[grid](c, out, n, k_words, TILED=tiled, WORDS=_WORDS, COLUMNS=_COLUMNS, num_warps=4)

    return graph_us(read_all) / copies


def fused_us(k: int, n: int) -> float:
    """GPU us of the merged layer's default one-row call (bf16), over copies beyond the L2 cache."""
    layer, _, _ = random_float_zero_layer(k, n, 128, "cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    return graph_us_each(lambda m: float_zero_gemm(m, x), hbm_copies(layer))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", type=int, nargs="+", default=[8, 16, 32])
    args = parser.parse_args(argv)
    if triton is None or not torch.cuda.is_available():
        raise SystemExit("code_read_floor.py needs a CUDA GPU and Triton: it times kernels on the device.")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}; 4-bit codes, one-row tiles of {_WORDS} words x {_COLUMNS} columns")
    print()
    print("| layer | split | codes alone, GPTQ layout (us, TB/s) | codes alone, tile-contiguous (us, TB/s) "
          "| fused one-row call (us) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, (k, n) in LAYER_SHAPES.items():
        fused = fused_us(k, n)
        for split in args.splits:
            cells = []
            for tiled in (False, True):
                us = read_us(k, n, split, tiled)
                cells.append(f"{us:.2f} ({k // 8 * n * 4 / us / 1e6:.2f})")
            print(f"| {name} | {split} | {cells[0]} | {cells[1]} | {fused:.2f} |")
        torch.cuda.empty_cache()
    a = torch.empty(256 << 18, device="cuda", dtype=torch.int32)  # 256 MB
    b = torch.empty_like(a)
    us = graph_us(lambda: b.copy_(a))
    print()
    print(f"Device copy of 256 MB: {us:.1f} us, {2 * a.numel() * 4 / us / 1e6:.2f} TB/s (read + write).")


if __name__ == "__main__":
    main()
