# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The ``tiles`` phase (issue 14): the merged layer's fused kernel alone on random float-zero layers of the 7B
shapes: exactness against the codes, the tile sweep (``tile_grid``), the row count where dequantize + cuBLAS takes
over, torch's int4 kernel (tinygemm) beside it, and the op under ``torch.compile``.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch

from .checkpoints import LAYER_SHAPES, random_scales
from .cli import dtype_of
from .common import RESULTS, free_memory, log, rel
from .float_zero import float_zero_path
from .timing import bench_us, graph_us_each, hbm_copies


def random_float_zero_layer(k: int, n: int, group_size: int, device: str, seed: int = 0):
    """A merged layer with random 4-bit codes, fp16 scales and real-valued fp32 zeros (a trained adapter's shift)."""
    from peft_qalora import FloatZeroGPTQLinear
    from peft_qalora.gptq import pack_qweight

    gen = torch.Generator(device).manual_seed(seed)
    groups = -(-k // group_size)
    codes = torch.randint(0, 16, (k, n), device=device, generator=gen, dtype=torch.int32)
    layer = FloatZeroGPTQLinear(4, group_size, k, n).to(device)
    layer.qweight = pack_qweight(codes, 4)
    layer.scales = random_scales((groups, n), device, gen).half()
    layer.zeros = 8 - 0.01 * torch.randn((groups, n), device=device, generator=gen)
    g = torch.arange(k, device=device) // group_size
    reference = (codes.double() - layer.zeros.double()[g]) * layer.scales.double()[g]  # (k, n), from the codes
    return layer, codes, reference


def tinygemm_operands(codes: torch.Tensor, layer, group_size: int):
    """torch's CUDA int4 kernel (tinygemm): w = (q - 8) * scale + offset, bf16 scales and offsets."""
    n = codes.shape[1]
    packed_u8 = (codes.t()[:, ::2] << 4 | codes.t()[:, 1::2]).to(torch.uint8).contiguous()  # (n, k/2), even k high
    packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
    scales = layer.scales.float()
    offsets = scales * (8 - layer.zeros)
    return packed, torch.stack([scales, offsets], -1).to(torch.bfloat16).contiguous(), n


def tile_grid(rows: int, grid: str = "wide") -> list[dict]:
    """The fused kernel's tiles tried at ``rows`` (those in ``--tile-rows``; others are timed with the default tile).

    ``wide``: one-row fp32 multiply-adds (BLOCK_M 1) and tensor-core tiles over tile widths, K blocks per
    iteration, splits and warps (run 8's sweep). ``focus``: around run 8's best, wider tiles and splits, 8 warps,
    the one-row sum per K block, 64-row (wgmma) tiles for 16 rows, and at 16 and 64 rows the swapped product
    (``SWAP_AB``: out^T = W^T x^T, the codes as the A operand) and GemLite's unpacking (``PER_CODE_LOAD``: a 2-D
    tile of words, each read once per code), each alone and together. ``paired``: at 2-16 rows the swapped tile and its
    neighbours (widths, splits, stages, warps) with and without Marlin's unpacking (``PAIRED_UNPACK``: two codes per
    32-bit operation, x permuted in registers to the order it yields), at 64 rows the 64x64 tile both ways.
    ``mma``: the fragment kernel (``kernels/fused_mma.py``, 1-16 rows) over warps (128 columns per 4), splits and
    K blocks per iteration, as run 46 swept it (benchmarks/results/gpu.md, tenth pass).
    ``occupancy``: the default tiles and their neighbours in splits and widths with Triton's register cap (``maxnreg``)
    and with 8 warps, since an Nsight Compute profile found the kernel latency-bound with occupancy capped by registers
    (benchmarks/results/gpu.md, eighth pass; ``benchmarks/kernel_resources.py`` shows the registers on a CPU).
    """

    def tile(bm: int, bn: int, st: int, sk: int, w: int, **extra: Any) -> dict:
        return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "STEPS": st, "SPLIT_K": sk, "num_warps": w, **extra}

    if grid == "mma":
        if rows > 16:
            return []
        bm = 8 if rows <= 8 else 16
        knobs = [(4, sk, st) for sk in (4, 8, 16, 32) for st in (1, 2)]
        knobs += [(w, sk, 1) for w in (2, 8) for sk in (4, 8, 16)]
        return [{"MMA": True, "BLOCK_M": bm, "WARPS": w, "SPLIT_K": sk, "STEPS": st} for w, sk, st in knobs]
    if grid == "occupancy":
        # as compiled, two register caps (the second above the one-row kernel's 80-120 registers, below the 16-row
        # tile's 168), and 8 warps
        caps = [{}, {"maxnreg": 64}, {"maxnreg": 96 if rows == 1 else 128}, {"num_warps": 8}]
        if rows == 1:
            return [{**tile(1, 256, 1, sk, 4, ROW_SUM_EACH_BLOCK=True), **cap} for sk in (16, 32) for cap in caps]
        if rows <= 16:
            return [
                {**tile(16, bn, 1, sk, 4, SWAP_AB=True, PAIRED_UNPACK=True, num_stages=2), **cap}
                for bn, sk in ((64, 8), (64, 16), (128, 4), (128, 8))
                for cap in caps
            ]
        return [{**tile(64, 64, 1, sk, 4), **cap} for sk in (4, 8) for cap in caps]
    if grid == "paired":  # the default's neighbours, each code unpacked alone and two per operation (Marlin's)
        if rows == 1:
            return []
        if rows <= 16:
            # {}: Triton's 3 stages (the default before run 28), then 2 stages (the default now)
            knobs = [{}, {"STEPS": 2}, {"num_stages": 2}, {"num_stages": 4}, {"num_warps": 8}]
            return [
                {**tile(16, bn, 1, sk, 4, SWAP_AB=True, PAIRED_UNPACK=paired), **knob}
                for paired in (False, True)
                for bn, sk in ((64, 8), (128, 8), (64, 4), (64, 16), (32, 8))
                for knob in (knobs if (bn, sk) == (64, 8) else [{}])
            ]
        return [tile(64, 64, 1, sk, 4, PAIRED_UNPACK=paired) for sk in (4, 8) for paired in (False, True)]
    if grid == "focus":
        if rows == 1:
            return [
                tile(1, bn, st, sk, w, ROW_SUM_EACH_BLOCK=each)
                for bn in (64, 128, 256)
                for st in (1, 2)
                for sk in (4, 8, 16)
                for w in (4, 8)
                for each in (False, True)
            ]
        # SWAP_AB: the codes as the tensor cores' A operand, BLOCK_N rows (wgmma-sized) against the input rows
        swapped = [
            tile(bm, bn, 1, sk, w, SWAP_AB=True)
            for bm in ((16,) if rows == 16 else (16, 64))
            for bn in (64, 128, 256)
            for sk in (4, 8, 16)
            for w in (4, 8)
        ]
        # PER_CODE_LOAD: each code's word read once per code (GemLite's unpacking), plain and swapped
        per_code = [
            tile(bm, bn, 1, sk, 4, PER_CODE_LOAD=True, SWAP_AB=swap)
            for bm in ((16,) if rows == 16 else (64,))
            for bn in (64, 128, 256)
            for sk in (4, 8, 16)
            for swap in (False, True)
        ]
        if rows == 16:
            return (
                [tile(16, bn, 1, sk, w) for bn in (128, 256) for sk in (4, 8, 16) for w in (4, 8)]
                + [tile(64, bn, 1, sk, 4) for bn in (64, 128) for sk in (4, 8)]
                + swapped
                + per_code
            )
        return (
            [tile(64, bn, st, sk, w) for bn in (64, 128) for st in (1,) for sk in (2, 4, 8) for w in (4, 8)]
            + swapped
            + per_code
        )
    tiles = []
    if rows == 1:
        tiles += [
            tile(1, bn, st, sk, w) for bn in (32, 64, 128) for st in (1, 2) for sk in (1, 2, 4, 8) for w in (2, 4)
        ]
    bm = min(64, max(16, triton_next_pow2(rows)))
    tiles += [
        tile(bm, bn, st, sk, w)
        for bn in ((32, 64, 128) if rows <= 16 else (32, 64))
        for st in (1, 2)
        for sk in ((1, 2, 4, 8) if rows <= 16 else (1, 2, 4))
        for w in ((4, 8) if rows == 16 else (4,))
    ]
    return tiles


@torch.no_grad()
def run_tiles(args: argparse.Namespace) -> None:
    """The fused kernel alone: exactness against the codes, a tile sweep, and the row count where cuBLAS takes over.

    Kernel times are CUDA-graph replays (``graph_us``): GPU time only, so a busy CPU (Marlin compiling beside the
    sweep) does not move them.
    """
    from peft_qalora.kernels import dequantize_float_zeros, float_zero_gemm
    from peft_qalora.kernels import fused_tiles as fz
    from peft_qalora.kernels.fused_call import row_bucket
    from peft_qalora.kernels.fused_mma import mma_supported

    dtype = dtype_of(args)
    for name, (k, n) in LAYER_SHAPES.items():
        layer, codes, reference = random_float_zero_layer(k, n, 128, args.device)
        copies = hbm_copies(layer)
        for rows in (1, 16, 32, 64):
            for xdtype in (dtype, torch.float16):
                x = torch.randn(rows, k, device=args.device, dtype=xdtype)
                exact = x.double() @ reference
                fused = float_zero_gemm(layer, x)
                with float_zero_path(triton=False):
                    torch_path = layer(x)  # dequantize in fp32, round the weight to the activation dtype, matmul
                record = {
                    "layer": name,
                    "rows": rows,
                    "dtype": str(xdtype).replace("torch.", ""),
                    "fused_vs_fp64": rel(fused, exact),
                    "torch_path_vs_fp64": rel(torch_path, exact),
                    "fused_vs_torch_path": rel(fused, torch_path),
                    "output_rounding": rel(exact.to(xdtype), exact),
                }
                RESULTS.setdefault("exactness", []).append(record)
                log("exact", json.dumps(record))
        for rows in sorted({1, 4, 16, 32, 64, *args.tile_rows}):
            x = torch.randn(rows, k, device=args.device, dtype=dtype)
            # the tile the default call takes: the fragment kernel's where it applies (its switch on, as by default)
            mma = mma_supported(torch.device(args.device), 4, 128, k)
            default = fz._pick_config(row_bucket(rows, mma), k, n, 128, fz._multiprocessors(0), mma)
            default_us = graph_us_each(lambda m: float_zero_gemm(m, x), copies)
            best = (default_us, default)
            for config in tile_grid(rows, args.tile_grid) if rows in args.tile_rows else []:
                try:
                    us = graph_us_each(lambda m: float_zero_gemm(m, x, config), copies)
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for a tile
                    log("tile error", config, str(exc)[:200])
                    continue
                RESULTS.setdefault("tiles", []).append({"layer": name, "rows": rows, "config": config, "graph_us": us})
                log("tile", json.dumps(RESULTS["tiles"][-1]))  # the log keeps the sweep if the call runs out of time
                if math.isfinite(us) and not us >= best[0]:  # a NaN (capture failed) never wins, and loses to any time
                    best = (us, config)
            # the same best tile with the codes converted (int -> float) instead of built from their bits
            convert = dict(best[1], CODE_BITS=0, CODE_OFFSET=0.0, FOLD_OFFSET=False, SPLIT_K=best[1]["SPLIT_K"])
            tensor_cores = best[1]["BLOCK_M"] > 1 and not best[1].get("MMA")  # the fragment kernel makes no such codes
            convert_us = graph_us_each(lambda m: float_zero_gemm(m, x, convert), copies) if tensor_cores else None
            record = {
                "layer": name,
                "rows": rows,
                "best_us": best[0],
                "best": best[1],
                "best_converting_codes_us": convert_us,
                "default_us": default_us,
                "default": default,
            }
            RESULTS.setdefault("tile_best", []).append(record)
            log("tiles", json.dumps(record))
        # where dequantize-then-cuBLAS overtakes the fused kernel
        for rows in (32, 64, 128, 256, 512):
            x = torch.randn(rows, k, device=args.device, dtype=dtype)
            big = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "STEPS": 2, "SPLIT_K": 1, "num_warps": 4}
            fused_us = graph_us_each(lambda m: float_zero_gemm(m, x, big, max_rows=None), copies)
            deq_us = graph_us_each(lambda m: x @ dequantize_float_zeros(m, dtype), copies)
            RESULTS.setdefault("crossover", []).append(
                {"layer": name, "rows": rows, "fused_us": fused_us, "dequant_cublas_us": deq_us}
            )
            log("crossover", json.dumps(RESULTS["crossover"][-1]))
        # torch's int4 kernel (tinygemm): speed and what its bf16 scales and offsets keep
        try:
            packed, sz, _ = tinygemm_operands(codes, layer, 128)
            packs = [packed] + [packed.clone() for _ in copies[1:]]
            for rows in (1, 16, 4096):
                x = torch.randn(rows, k, device=args.device, dtype=torch.bfloat16)
                out = torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz)
                exact = x.double() @ reference
                RESULTS.setdefault("tinygemm", []).append(
                    {
                        "layer": name,
                        "rows": rows,
                        "gpu_us": graph_us_each(lambda p: torch.ops.aten._weight_int4pack_mm(x, p, 128, sz), packs),
                        "vs_fp64": rel(out, exact),
                        "fused_vs_fp64": rel(float_zero_gemm(layer, x), exact) if rows <= 64 else None,
                    }
                )
                log("tinygemm", json.dumps(RESULTS["tinygemm"][-1]))
        except Exception as exc:  # noqa: BLE001
            RESULTS.setdefault("tinygemm", []).append({"layer": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        # the op under torch.compile: fullgraph raises on a graph break
        try:
            compiled = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
            for rows in (1, 16):
                x = torch.randn(rows, k, device=args.device, dtype=dtype)
                for _ in range(3):
                    y = compiled(x)
                RESULTS["checks"].append(
                    {
                        "compiled_layer": name,
                        "rows": rows,
                        "fullgraph": True,
                        "vs_eager": rel(y, layer(x)),
                        "compiled_us": bench_us(lambda: compiled(x)),
                        "eager_us": bench_us(lambda: layer(x)),
                    }
                )
                log("compile", RESULTS["checks"][-1])
        except Exception as exc:  # noqa: BLE001
            RESULTS["checks"].append({"compiled_layer": name, "error": f"{type(exc).__name__}: {exc}"[:400]})
        layer = codes = reference = copies = None  # freed before the next shape
        free_memory()


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
