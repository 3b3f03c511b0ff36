# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The fused float-zero kernel for 4-bit codes at decoding sizes, on the tensor cores' register fragments (Gluon).

The same product as :mod:`.fused_kernels`, ``x @ (s * (q - z'))`` summed per group in fp32, for 1-16 rows. Triton's
``tl.dot`` takes its operands from shared memory in the layout it chooses, so the codes' tile went through shared
memory on every K block (783k shared loads per call on gate_proj at 16 rows, benchmarks/results/gpu.md, run 37).
Here the layouts are explicit (Triton's Gluon), and each thread loads exactly the words whose codes its own
``mma.sync.m16n8k16`` fragments hold, from GPTQ's packed layout as it is, with no repacking:

- *Along K.* A thread of the A fragment holds K slots ``{2t, 2t+1, 2t+8, 2t+9}`` of each 16-wide step, ``t`` being
  its lane mod 4: two steps take 8 codes, one word's worth. The sum over K does not care in which order the channels
  come, so the kernel feeds the tensor cores a permuted K: word ``t + 4h`` (of a 32-channel chunk ``h``) fills lane
  ``t``'s slots of two steps, and the activations are loaded in the same order, 8 consecutive channels per thread
  (one 16-byte load), permuted in registers.
- *Along N.* The output columns are permuted as well: a thread's four fragment rows are four consecutive columns, so
  its words come in one 16-byte load; the epilogue puts the columns back in order (one shared-memory pass per tile).
- *The codes.* One shift and one LOP3 turn the codes at bits ``4j`` and ``4j + 16`` of a word into two 16-bit floats
  ``128 + q`` (bf16) or ``1024 + q`` (fp16, where a ``sub.f16x2`` takes the 1024 out exactly); that pair is one
  fragment register, so no code is moved after it is made.
- *The group sums of x*, which the zero multiplies, come from one more ``mma`` against a fragment of ones, already in
  the accumulator's layout.

Everything else is the Triton kernel's algebra: fp32 products of x with integer codes (exact), fp32 accumulation,
scale and fp32 zero applied once per group, split-K partial sums added in split order by the last program of a tile
(or by the second kernel). Measured on an H200 against the Triton kernel's default tiles (benchmarks/results/gpu.md,
tenth pass, runs 45-46): 0.72-0.87x the GPU time at 4 and 16 rows on all three 7B shapes and 0.93x at one row on
gate_proj; at one row on q/down_proj the fp32 multiply-add kernel stays (1.01-1.04x). The plan is in
:mod:`.fused_tiles`, the launch in :mod:`.fused_call`.

Needs NVIDIA's compiler (no interpreter, no ROCm), compute capability 8.0 or newer, and Triton 3.6 or newer with
Gluon's ``mma_v2`` and linear layouts (run on a GPU with 3.6, compiled with 3.8; elsewhere the Triton tiles run);
:func:`mma_supported` says where it applies.
"""

from __future__ import annotations

import functools

import torch

from .fused_tiles import _INTERPRET

_OLDEST_TRITON = (3, 6)  # Gluon's API moves between releases: older ones were never run with this kernel

try:  # Gluon is experimental in Triton: its absence or a changed API only turns this kernel off
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.runtime.jit import constexpr_function

    _release = tuple(int(part) for part in triton.__version__.split(".")[:2])
    _HAS_GLUON = (
        _release >= _OLDEST_TRITON and hasattr(gl, "DistributedLinearLayout") and hasattr(gl, "inline_asm_elementwise")
    )
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # Triton 3.6's name, and 3.8's
except Exception:  # noqa: BLE001  # pragma: no cover - depends on the install
    _HAS_GLUON = False


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)  # mma.sync with bf16 operands


def mma_supported(device: torch.device, bits: int, block_k: int, in_features: int) -> bool:
    """Whether the fragment kernel computes a layer with these codes on ``device``: 4-bit codes, K blocks of 32, 64
    or 128 channels that tile ``in_features`` exactly (the kernel masks columns, not channels), CUDA on sm_80+."""
    return (
        _HAS_GLUON
        and not _INTERPRET
        and torch.version.hip is None
        and device.type == "cuda"
        and bits == 4
        and block_k in (32, 64, 128)
        and in_features % block_k == 0
        and _capable(device.index if device.index is not None else torch.cuda.current_device())
    )


if _HAS_GLUON:

    @constexpr_function
    def _word_layout(WORDS, WARPS):
        """(WORDS, 32 * WARPS, 4) over (word along K, column, code pair): lane ``4g + t`` holds the words ``t + 4h``
        of columns ``4g .. 4g + 3`` (+ 32 per warp), all four code pairs of each in registers."""
        chunks = [[4 << i, 0, 0] for i in range((WORDS // 4).bit_length() - 1)]
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 1, 0], [0, 2, 0], [0, 0, 1], [0, 0, 2]] + chunks,
            lane_bases=[[1, 0, 0], [2, 0, 0], [0, 4, 0], [0, 8, 0], [0, 16, 0]],
            warp_bases=[[0, 32 << i, 0] for i in range(WARPS.bit_length() - 1)],
            block_bases=[],
            shape=[WORDS, 32 * WARPS, 4],
        )

    @constexpr_function
    def _x_layout(BLOCK_M, WORDS, WARPS):
        """(BLOCK_M, WORDS, 8) activations: lane ``4g + t`` holds rows ``g`` (and ``g + 8``), channels
        ``8 (t + 4h) .. 8 (t + 4h) + 7``; every warp holds all of them."""
        chunks = [[0, 4 << i, 0] for i in range((WORDS // 4).bit_length() - 1)]
        rows = [[8, 0, 0]] if BLOCK_M == 16 else []
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4]] + chunks + rows,
            lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[0, 0, 0] for _ in range(WARPS.bit_length() - 1)],
            block_bases=[],
            shape=[BLOCK_M, WORDS, 8],
        )

    @gluon.jit
    def _a_fragments(
        words,
        shifts,
        a_layout: gl.constexpr,
        dtype: gl.constexpr,
        CODE_BITS: gl.constexpr,
        FOLD_OFFSET: gl.constexpr,
        WARPS: gl.constexpr,
        BLOCK_K: gl.constexpr,
    ):
        """The two A operands (column tiles ``i = 0, 1``) of one K block, from its (words, 32 * WARPS) words."""
        words3, shifts3 = gl.broadcast(gl.expand_dims(words, 2), shifts)
        both: gl.constexpr = CODE_BITS | (CODE_BITS << 16)
        # (word >> 4j) & 0x000F000F | both: codes j and j + 4 as the 16-bit floats offset + q, one register
        if FOLD_OFFSET:  # bf16: the offset comes out once per group
            asm: gl.constexpr = f"{{ .reg .b32 t; shr.u32 t, $1, $2; lop3.b32 $0, t, 983055, {both}, 0xEA; }}"
        else:  # fp16: out of each pair now, exactly
            asm: gl.constexpr = (
                f"{{ .reg .b32 t, c; shr.u32 t, $1, $2; lop3.b32 t, t, 983055, {both}, 0xEA; "
                f"mov.b32 c, {both}; sub.f16x2 $0, t, c; }}"
            )
        pairs = gl.inline_asm_elementwise(asm, "=r,r,r", [words3, shifts3], dtype=gl.int32, is_pure=True, pack=1)
        low = pairs.to(gl.int16).to(dtype, bitcast=True)  # code j
        high = (pairs >> 16).to(gl.int16).to(dtype, bitcast=True)  # code j + 4
        values = gl.join(low, high)
        chunks: gl.constexpr = BLOCK_K // 32
        # (word = 4 chunk + t, column = 32 warp + 4 g + 2 i + r, pair j, half e) -> (A row 16 warp + 8 r + g, K slot
        # 32 chunk + 8 j + 2 t + e, tile i): the permutation the module docstring describes
        values = gl.reshape(values, [chunks, 4, WARPS, 8, 2, 2, 4, 2])
        values = gl.permute(values, [2, 5, 3, 0, 6, 1, 7, 4])
        values = gl.reshape(values, [16 * WARPS, BLOCK_K, 2])
        a0, a1 = gl.split(values)
        return gl.convert_layout(a0, a_layout), gl.convert_layout(a1, a_layout)  # already there: no data moves

    @gluon.jit
    def _k_block(
        words,
        x,
        start,
        scales_ptr,
        zeros_ptr,
        N,
        group_size,
        col0,
        col1,
        mask0,
        mask1,
        ones,
        zero_acc,
        out0,
        out1,
        shifts,
        a_layout: gl.constexpr,
        b_layout: gl.constexpr,
        CODE_BITS: gl.constexpr,
        CODE_OFFSET: gl.constexpr,
        FOLD_OFFSET: gl.constexpr,
        WARPS: gl.constexpr,
        BLOCK_K: gl.constexpr,
        BLOCK_M: gl.constexpr,
    ):
        """One K block (one group's part) into the two column tiles' fp32 accumulators."""
        group = start // group_size
        s0 = gl.load(scales_ptr + group * N + col0, mask=mask0, other=0.0).to(gl.float32)
        s1 = gl.load(scales_ptr + group * N + col1, mask=mask1, other=0.0).to(gl.float32)
        z0 = gl.load(zeros_ptr + group * N + col0, mask=mask0, other=0.0)
        z1 = gl.load(zeros_ptr + group * N + col1, mask=mask1, other=0.0)
        a0, a1 = _a_fragments(words, shifts, a_layout, x.dtype, CODE_BITS, FOLD_OFFSET, WARPS, BLOCK_K)
        # (row, word = 4 chunk + t, channel 4 e + j) -> (K slot 32 chunk + 8 j + 2 t + e, row): the codes' order
        x = gl.reshape(x, [BLOCK_M, BLOCK_K // 32, 4, 2, 4])
        x = gl.permute(x, [1, 4, 2, 3, 0])
        x = gl.convert_layout(gl.reshape(x, [BLOCK_K, BLOCK_M]), b_layout)  # registers only
        p0 = mma_v2(a0, x, zero_acc)
        p1 = mma_v2(a1, x, zero_acc)
        x_sum = mma_v2(ones, x, zero_acc)  # the block's sum of x per row, in every accumulator row
        if FOLD_OFFSET:  # one product per operation, as in the Triton kernel: x_sum * offset is exact
            p0 -= x_sum * CODE_OFFSET
            p1 -= x_sum * CODE_OFFSET
        out0 += gl.expand_dims(s0, 1) * (p0 - x_sum * gl.expand_dims(z0, 1))
        out1 += gl.expand_dims(s1, 1) * (p1 - x_sum * gl.expand_dims(z1, 1))
        return out0, out1

    @gluon.jit
    def _float_zero_mma_kernel(
        x_ptr,
        qweight_ptr,
        scales_ptr,
        zeros_ptr,
        out_ptr,  # (rows, N) in the activation dtype, or (split_k, rows, N) fp32 partial sums
        M,
        N,
        K,
        group_size,
        stride_xm,
        result_ptr,  # SUM_IN_KERNEL: (rows, N) in the activation dtype, which the last program of each tile writes
        counter_ptr,  # SUM_IN_KERNEL: int32 per output tile, zero between calls (the last program resets it)
        SPLIT_K: gl.constexpr,
        SUM_IN_KERNEL: gl.constexpr,
        CODE_BITS: gl.constexpr,
        CODE_OFFSET: gl.constexpr,
        FOLD_OFFSET: gl.constexpr,
        BLOCK_M: gl.constexpr,  # 8 (up to 8 rows) or 16: the mma's N
        BLOCK_K: gl.constexpr,  # 32, 64 or 128, dividing the group size and K
        WARPS: gl.constexpr,  # each warp takes 32 output columns: two 16-row A tiles
        STEPS: gl.constexpr,  # 1 or 2 K blocks per iteration, loaded together
        SUM_CHUNK: gl.constexpr,  # split-K partial sums loaded this many at a time
    ):
        BLOCK_N: gl.constexpr = 32 * WARPS
        WORDS: gl.constexpr = BLOCK_K // 8
        dtype: gl.constexpr = x_ptr.dtype.element_ty
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        code_layout: gl.constexpr = _word_layout(WORDS, WARPS)
        word_layout: gl.constexpr = gl.SliceLayout(2, code_layout)
        x_layout: gl.constexpr = _x_layout(BLOCK_M, WORDS, WARPS)

        pid_n = gl.program_id(0)
        pid_k = gl.program_id(2)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, word_layout))
        word_rows = gl.arange(0, WORDS, layout=gl.SliceLayout(1, word_layout))
        word_offs = gl.expand_dims(word_rows, 1) * N + gl.expand_dims(offs_n, 0)
        word_mask = gl.expand_dims(offs_n < N, 0)
        shifts = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, code_layout))) * 4
        shifts = gl.expand_dims(gl.expand_dims(shifts, 0), 0)
        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, gl.SliceLayout(2, x_layout)))
        x_words = gl.arange(0, WORDS, layout=gl.SliceLayout(0, gl.SliceLayout(2, x_layout)))
        x_chan = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, x_layout)))
        x_offs = (
            gl.expand_dims(gl.expand_dims(rows, 1), 2) * stride_xm
            + gl.expand_dims(gl.expand_dims(x_words, 0), 2) * 8
            + gl.expand_dims(gl.expand_dims(x_chan, 0), 0)
        )
        x_mask = gl.expand_dims(gl.expand_dims(rows < M, 1), 2)
        # tile i's accumulator row m holds output column n0 + 32 (m // 16) + 4 (m % 8) + 2 i + (m // 8) % 2
        m = gl.arange(0, 16 * WARPS, layout=gl.SliceLayout(1, mma))
        col0 = n0 + (m // 16) * 32 + (m % 8) * 4 + (m // 8) % 2
        col1 = col0 + 2
        mask0 = col0 < N
        mask1 = col1 < N
        ones = gl.full([16 * WARPS, BLOCK_K], 1.0, dtype, a_layout)
        zero_acc = gl.zeros([16 * WARPS, BLOCK_M], gl.float32, mma)
        out0 = gl.zeros([16 * WARPS, BLOCK_M], gl.float32, mma)
        out1 = gl.zeros([16 * WARPS, BLOCK_M], gl.float32, mma)
        for start in range(pid_k * BLOCK_K * STEPS, K, gl.num_programs(2) * BLOCK_K * STEPS):
            words = gl.load(qweight_ptr + (start // 8) * N + word_offs, mask=word_mask, other=0)
            x = gl.load(x_ptr + start + x_offs, mask=x_mask, other=0.0)
            if STEPS == 2:  # the second block's loads issued before the first block's arithmetic
                second = start + BLOCK_K
                live = second < K
                words2 = gl.load(qweight_ptr + (second // 8) * N + word_offs, mask=word_mask & live, other=0)
                x2 = gl.load(x_ptr + second + x_offs, mask=x_mask & live, other=0.0)
            out0, out1 = _k_block(
                words, x, start, scales_ptr, zeros_ptr, N, group_size, col0, col1, mask0, mask1, ones, zero_acc,
                out0, out1, shifts, a_layout, b_layout, CODE_BITS, CODE_OFFSET, FOLD_OFFSET, WARPS, BLOCK_K, BLOCK_M,
            )  # fmt: skip
            if STEPS == 2:  # noqa: SIM102 - a constant and a runtime value: Triton takes no `and` of the two
                if live:
                    out0, out1 = _k_block(
                        words2, x2, second, scales_ptr, zeros_ptr, N, group_size, col0, col1, mask0, mask1, ones,
                        zero_acc, out0, out1, shifts, a_layout, b_layout, CODE_BITS, CODE_OFFSET, FOLD_OFFSET, WARPS,
                        BLOCK_K, BLOCK_M,
                    )  # fmt: skip
        # both tiles back into column order, in a layout of 4 consecutive columns per thread for the stores
        out = gl.reshape(gl.join(out0, out1), [WARPS, 2, 8, BLOCK_M, 2])  # (warp, m // 8 % 2, m % 8, row, tile)
        out = gl.reshape(gl.permute(out, [3, 0, 2, 4, 1]), [BLOCK_M, BLOCK_N])
        store_layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [WARPS, 1], [1, 0])
        out = gl.convert_layout(out, store_layout)
        out_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, store_layout))
        out_cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, store_layout))
        mask = gl.expand_dims(out_rows < M, 1) & gl.expand_dims(out_cols < N, 0)
        offs = gl.expand_dims(out_rows, 1) * N + gl.expand_dims(out_cols, 0)
        if SPLIT_K == 1:
            gl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            gl.store(out_ptr + pid_k * M * N + offs, out, mask=mask)
            if SUM_IN_KERNEL:  # as the Triton kernel: the tile's last program adds the partial sums in split order
                _cta_barrier()  # every thread's partial sums are stored before the release below
                arrived = gl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
                if arrived == SPLIT_K - 1:
                    total = gl.load(out_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
                    for first in range(1, SPLIT_K, SUM_CHUNK):
                        for j in gl.static_range(SUM_CHUNK):
                            split = first + j
                            total += gl.load(
                                out_ptr + split * M * N + offs, mask=mask & (split < SPLIT_K), other=0.0,
                                cache_modifier=".cg",
                            )  # fmt: skip
                    gl.store(result_ptr + offs, total.to(result_ptr.dtype.element_ty), mask=mask)
                    gl.atomic_xchg(counter_ptr + pid_n, 0)  # ready for the next call
