# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The fused float-zero kernel's tiles: which tile, split and code format a call of given shape launches with.

Pure Python over the shapes (no tensors), from the sweeps of ``benchmarks/gpu.py --phases tiles`` on an H200
(benchmarks/results/gpu.md, issue 14); cached per shape, because decoding asks once per layer call. The kernels and
their launch are in :mod:`.fused_float_zero`.
"""

from __future__ import annotations

import functools
import os

import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads it at import too
# outputs this wide (gate_proj, up_proj at 7B) get their own tiles, one row the fragment kernel too (sweeps on an H200)
_WIDE_OUTPUTS = 8192


def _block_k(group_size: int) -> int:
    """The largest power of two up to 128 that divides the group size (0 if below 16: tl.dot's minimum)."""
    block = 128
    while block >= 16:
        if group_size % block == 0:
            return block
        block //= 2
    return 0


def _code_format(dtype: torch.dtype, bits: int) -> tuple[int, float, bool]:
    """(bit pattern, offset, fold) that turn a code into a 16-bit float with bit operations instead of a convert.

    ``q | 0x4300`` read as bf16 is ``128 + q`` for ``q < 128`` (bf16 has 8 significant bits); ``q | 0x6400`` read as
    fp16 is ``1024 + q`` for ``q < 1024``. For bf16 the offset comes out once per group (``x_sum * 128``: fp32
    rounding of ~2e-5 relative to the group's sum, beside bf16's 4e-3 output rounding); for fp16 a fold would cost
    ~2e-4, half of fp16's own rounding, so the offset is subtracted per code (exact). 8-bit codes in bf16 convert.
    """
    if dtype == torch.bfloat16:
        return (0x4300, 128.0, True) if bits <= 4 else (0, 0.0, False)
    return 0x6400, 1024.0, False


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count if torch.cuda.is_available() else 132


def _mma_config(rows: int, in_features: int, out_features: int, block_k: int) -> dict:
    """The fragment kernel's tile (:mod:`.fused_mma`) for ``rows`` (1, 8 or 16: a bucket), from run 46's sweep on an
    H200 (benchmarks/results/gpu.md, tenth pass): 4 warps, 128 output columns per program; up to 8 rows, 8 splits on
    wide outputs (gate_proj) and 16 with two K blocks per iteration elsewhere; 16 rows, 4 splits on wide outputs,
    16 on long inputs (down_proj) and 8 otherwise (q_proj). Never more splits than K blocks."""
    wide = out_features >= _WIDE_OUTPUTS
    if rows <= 8:
        split_k, steps = (8, 1) if wide else (16, 2)
    else:
        split_k, steps = (4 if wide else 16 if in_features > 8192 else 8), 1
    blocks = in_features // block_k
    while split_k > 1 and split_k * steps > blocks:
        split_k //= 2
    return {
        "MMA": True,
        "BLOCK_M": 8 if rows <= 8 else 16,
        "BLOCK_K": block_k,
        "WARPS": 4,
        "STEPS": steps,
        "SPLIT_K": split_k,
        "SUM_CHUNK": 4,
    }


@functools.lru_cache(maxsize=256)
def _pick_config(
    rows: int, in_features: int, out_features: int, block_k: int, processors: int = 132, mma: bool = False
) -> dict:
    """Tile, warps and split for ``rows`` (1, 8, 16, 32 or 64: a bucket) x ``in_features`` @ ``out_features``.

    ``mma``: the fragment kernel (:mod:`.fused_mma`) applies; it takes 2-16 rows, and one row on wide outputs
    (gate_proj at one row: 13.3-13.5 us against the fp32 multiply-adds' 14.4; q and down 1.01-1.04x, run 46).

    From the sweeps of ``benchmarks/gpu.py --phases tiles`` on an H200 (benchmarks/results/gpu.md, issue 14): one row
    runs fp32 multiply-adds 256 columns wide, summed per K block, one K block per program up to 32 splits; 2-16 rows
    the swapped product (``SWAP_AB``: out^T = W^T x^T, 64 output columns against 16 rows, 8 splits, or 128 columns
    and 4 splits on outputs of 8192 columns or more; 0.74-0.90x the GPU time of the 16x256 tile it replaced, run 23)
    with Marlin's unpacking (``PAIRED_UNPACK``, two codes per 32-bit operation; 0.66-0.78x, run 25) and 2 stages;
    more a 64x64 tile (faster at 32 rows than a 32-row tile), whose programs share K (``SPLIT_K``, at most 16) until
    there are about 2 per multiprocessor.
    """
    if mma and (1 < rows <= 16 or (rows == 1 and out_features >= _WIDE_OUTPUTS)):
        return _mma_config(rows, in_features, out_features, block_k)
    swap = 1 < rows <= 16
    # the swapped tile 128 columns wide with 4 splits on wide outputs: 0.90x the GPU time of 64 with 8 on gate_proj
    # (4096 -> 11008) at 4 and 16 rows, where q_proj and down_proj (4096 columns) take 1.4-1.7x (seventh pass)
    wide = swap and out_features >= _WIDE_OUTPUTS
    if rows == 1:
        block_m, block_n = 1, 256
    elif swap:  # out^T = W^T x^T: 64 output columns as the tensor cores' 64-row operand, the input rows as 16
        block_m, block_n = 16, 128 if wide else 64
    else:
        block_m, block_n = 64, 64
    block_n = min(block_n, max(16, 1 << (out_features - 1).bit_length()))
    steps = max(1, 128 // block_k)  # 128 channels per iteration for smaller groups too
    tiles = _cdiv(out_features, block_n) * _cdiv(rows, block_m)
    chunks = _cdiv(in_features, block_k * steps)
    split_k = 1
    if rows == 1:  # latency-bound: one K block per program, up to 32 (0.93-0.98x the GPU time of 8-16 on gate and
        # down, 1.03x on q; benchmarks/results/gpu.md, seventh pass), and no more programs than measured there
        # (gate's 1376: about 10 per multiprocessor)
        while split_k < 32 and split_k * 2 <= chunks and tiles * split_k * 2 <= 12 * processors:
            split_k *= 2
    elif swap:  # 8 splits on all three 7B shapes at 64 columns (512-1376 programs), against 4 or 16 (run 20)
        while split_k < (4 if wide else 8) and split_k * 2 <= chunks:
            split_k *= 2
    else:
        target = 2 * processors
        while (
            split_k < 16
            and split_k * 2 <= chunks
            and abs(tiles * split_k * 2 - target) <= abs(tiles * split_k - target)
        ):
            split_k *= 2
    # every constexpr passed explicitly: Inductor's wrapper of a user kernel misreads omitted defaults (static-cache
    # generate at batch 16 failed with "launcher() missing ... '_grid_2'", benchmarks/results/gpu.md)
    config = {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "STEPS": steps,
        "SPLIT_K": split_k,
        "ROW_SUM_EACH_BLOCK": rows == 1,
        "SWAP_AB": swap,
        "PER_CODE_LOAD": False,
        "PAIRED_UNPACK": swap,  # 0.66-0.78x the GPU time of unpacking each code alone at 4-16 rows (run 25)
    }
    if not _INTERPRET:  # the interpreter knows no warps or stages
        # the paired swapped tile: 2 stages 0.95-1.0x the GPU time of 3 at 4 and 16 rows on all three shapes (run 27)
        config.update(num_warps=4, num_stages=2 if swap else 3)
    return config


def _cdiv(a, b):
    # not triton.cdiv: a Triton constexpr function, whose call costs microseconds on every launch (Triton 3.8)
    return -(-a // b)


def _plan(config: dict, dtype: torch.dtype, bits: int) -> tuple[int, int, int, dict]:
    """``(split_k, BLOCK_M, BLOCK_N, kernel keywords)`` from a tile: all of a call's Python but the launch.

    The keywords of a fragment-kernel tile hold ``MMA: True``, which picks the kernel and is not one of its own.
    """
    config = dict(config)
    config.pop("SUM_IN_KERNEL", None)  # decided per call (eager or traced), not per tile
    split_k = config.pop("SPLIT_K")
    code_bits, code_offset, fold = _code_format(dtype, bits)
    if config.get("MMA"):
        kwargs = {"CODE_BITS": code_bits, "CODE_OFFSET": code_offset, "FOLD_OFFSET": fold, **config}
        kwargs["num_warps"] = config["WARPS"]
        return split_k, config["BLOCK_M"], 32 * config["WARPS"], kwargs
    code_bits = config.pop("CODE_BITS", code_bits)  # a benchmark may ask for converted codes (0)
    code_offset, fold = config.pop("CODE_OFFSET", code_offset), config.pop("FOLD_OFFSET", fold)
    kwargs = {"BITS": bits, "CODE_BITS": code_bits, "CODE_OFFSET": code_offset, "FOLD_OFFSET": fold, **config}
    # the paired unpacking makes tensor-core operands (not the one-row path's fp32) from the codes' bits (not
    # converted codes) and loads whole words (not a per-code load)
    kwargs["PAIRED_UNPACK"] = (
        bool(config.get("PAIRED_UNPACK"))
        and config["BLOCK_M"] > 1
        and bool(code_bits)
        and not config.get("PER_CODE_LOAD")
    )
    # one row converts codes in inline PTX where NVIDIA's compiler runs (not the interpreter, not ROCm); a caller's
    # tile may ask for the portable form instead (INLINE_PTX=False: the same bits, tested on the GPU)
    kwargs["INLINE_PTX"] = (
        bool(config.get("INLINE_PTX", True)) and config["BLOCK_M"] == 1 and not _INTERPRET and torch.version.hip is None
    )
    return split_k, config["BLOCK_M"], config["BLOCK_N"], kwargs


@functools.lru_cache(maxsize=256)
def _launch_plan(
    bucket: int,
    in_features: int,
    out_features: int,
    block_k: int,
    processors: int,
    dtype: torch.dtype,
    bits: int,
    mma: bool = False,
) -> tuple[int, int, int, dict]:
    """The plan for the default tile, cached: decoding asks once per layer call."""
    return _plan(_pick_config(bucket, in_features, out_features, block_k, processors, mma), dtype, bits)


def _caller_plan(config: dict, block_k: int, dtype: torch.dtype, bits: int) -> tuple[int, int, int, dict]:
    """The plan for a caller's tile (benchmarks, tests): K blocks may never span two groups."""
    if config.get("MMA"):
        defaults = {"BLOCK_M": 16, "WARPS": 4, "STEPS": 1, "SPLIT_K": 1, "SUM_CHUNK": 4}
        config = {**defaults, **config, "BLOCK_K": min(config.get("BLOCK_K", block_k), block_k)}
        return _plan(config, dtype, bits)
    config = {
        "STEPS": 1,
        "SPLIT_K": 1,
        "ROW_SUM_EACH_BLOCK": False,
        "SWAP_AB": False,
        "PER_CODE_LOAD": False,
        "PAIRED_UNPACK": False,
        **config,
    }
    config["BLOCK_K"] = min(config.get("BLOCK_K", block_k), block_k)
    if _INTERPRET:  # launch options the interpreter does not take; on CUDA they reach Triton's compile options
        for option in ("num_warps", "num_stages", "maxnreg"):
            config.pop(option, None)
    return _plan(config, dtype, bits)
