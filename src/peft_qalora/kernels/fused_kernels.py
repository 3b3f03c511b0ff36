# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The fused float-zero kernels in Triton: the matmul ``x @ (s * (q - z'))`` over packed codes, and its split-K sum.

The algebra, the code formats and the measurements behind them are in :mod:`.fused_float_zero` and docs/design.md
("The merged layer at decoding sizes"); how a call launches them, in :mod:`.fused_call`.
"""

from __future__ import annotations

try:  # Triton is optional: CPU installs may not have it
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # noqa: BLE001  # pragma: no cover - depends on the install
    _HAS_TRITON = False

if _HAS_TRITON:

    @triton.jit
    def _code_values(
        codes, dtype: tl.constexpr, CODE_BITS: tl.constexpr, CODE_OFFSET: tl.constexpr, FOLD: tl.constexpr
    ):
        """Codes as 16-bit floats for the tensor cores (``fused_tiles._code_format``)."""
        if CODE_BITS != 0:  # (q | CODE_BITS) read as a 16-bit float is CODE_OFFSET + q, exactly
            values = (codes | CODE_BITS).to(tl.int16).to(dtype, bitcast=True)
            if not FOLD:
                values = values - CODE_OFFSET  # exact: q is representable
        else:
            values = codes.to(dtype)
        return values

    @triton.jit
    def _paired_code_values(
        words_t,
        dtype: tl.constexpr,
        BITS: tl.constexpr,
        CODE_BITS: tl.constexpr,
        CODE_OFFSET: tl.constexpr,
        FOLD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """(BLOCK_N, BLOCK_K) 16-bit code values from (BLOCK_N, words) packed words, two codes per 32-bit operation.

        Marlin's unpacking: one shift and one mask-and-or (a LOP3) turn the codes at bits ``BITS * i`` and
        ``BITS * i + 16`` into two 16-bit floats in one register, whose halves are then read apart. Along K the values
        come out in paired order (word, then pair, then half), not channel order: the caller permutes the activations
        to match (:func:`_to_paired_order`), which costs registers only, where loading them in that order breaks the
        vector loads (1.3-1.4x slower at 16 rows on an H200, gpu.md sixth pass).
        """
        per_word: tl.constexpr = 32 // BITS
        half: tl.constexpr = per_word // 2
        maxq: tl.constexpr = (1 << BITS) - 1
        shifts = tl.arange(0, half) * BITS
        pairs = ((words_t[:, :, None] >> shifts[None, None, :]) & (maxq | (maxq << 16))) | (
            CODE_BITS | (CODE_BITS << 16)
        )
        low = pairs.to(tl.int16).to(dtype, bitcast=True)  # the code at bit BITS * i of the word
        high = (pairs >> 16).to(tl.int16).to(dtype, bitcast=True)  # the code at bit BITS * i + 16
        values = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))
        if not FOLD:
            values = values - CODE_OFFSET  # exact: q is representable
        return values

    @triton.jit
    def _to_paired_order(t, ROWS: tl.constexpr, WORDS: tl.constexpr, PER_WORD: tl.constexpr):
        """(ROWS, WORDS * PER_WORD) in channel order -> the order of :func:`_paired_code_values` (codes i, i + half)."""
        half: tl.constexpr = PER_WORD // 2
        return tl.reshape(tl.permute(tl.reshape(t, (ROWS, WORDS, 2, half)), (0, 1, 3, 2)), (ROWS, WORDS * PER_WORD))

    @triton.jit
    def _biased_code_values(
        words, BITS: tl.constexpr, INLINE_PTX: tl.constexpr, WORDS: tl.constexpr, BLOCK_N: tl.constexpr
    ):
        """(WORDS, codes per word, BLOCK_N) fp32 values ``2**BITS + q`` of the codes q of (WORDS, BLOCK_N) words.

        Code j sits at bit ``BITS * j`` of its word: rotating the word left by ``23 - BITS - BITS * j`` (mod 32) moves
        it to the top of an fp32 mantissa, and one mask-and-or with the bits of ``2**BITS`` makes the float, exactly.
        Two integer operations per code, where the value ``2**23 + q`` took three and a float add to take ``2**23``
        out again (0.79-0.82x the one-row GPU time on an H200, benchmarks/results/gpu.md, ninth pass). Its product
        with a 16-bit x (at most 11 significant bits times ``BITS + 1``) is exact in fp32; the caller takes
        ``2**BITS * sum(x)`` out once per K block.
        """
        per_word: tl.constexpr = 32 // BITS
        top: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)  # the mantissa bits the code lands on
        exponent: tl.constexpr = (127 + BITS) << 23  # 2**BITS
        shape: tl.constexpr = (WORDS, per_word, BLOCK_N)
        turn = (23 - BITS - tl.arange(0, per_word) * BITS) & 31
        words3 = tl.broadcast_to(words[:, None, :], shape)
        turn3 = tl.broadcast_to(turn[None, :, None], shape)
        if INLINE_PTX:  # a funnel shift and a LOP3 with both constants; Triton's own shifts and masks make four
            return tl.inline_asm_elementwise(
                f"{{ .reg .b32 t; shf.l.wrap.b32 t, $1, $1, $2; lop3.b32 $0, t, {top}, {exponent}, 0xEA; }}",
                "=r,r,r",
                [words3, turn3],
                dtype=tl.float32,
                is_pure=True,
                pack=1,
            )
        words3 = words3.to(tl.uint32, bitcast=True)  # the interpreter (no PTX): the same rotation, logical shifts
        turn3 = turn3.to(tl.uint32)
        turned = (words3 << turn3) | (words3 >> (32 - turn3))
        return ((turned & top) | exponent).to(tl.float32, bitcast=True)

    @triton.jit
    def _load_words(qweight_ptr, word_rows, columns, k_words, N, mask_columns):
        """Packed words ``qweight[word_rows, columns]`` (broadcast), zero past the matrix's edges."""
        return tl.load(
            qweight_ptr + word_rows * N + columns,
            mask=(word_rows < k_words) & mask_columns,
            other=0,
            eviction_policy="evict_first",  # each word is read by one program: leave the cache to x
        )

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
        stride_xm,
        result_ptr,  # SUM_IN_KERNEL: (rows, N) in the activation dtype, which the last program of each tile writes
        counter_ptr,  # SUM_IN_KERNEL: int32 per output tile, zero between calls (the last program resets it)
        BITS: tl.constexpr,
        SPLIT_K: tl.constexpr,  # programs along K (grid axis 2); constant only where the one-row sum unrolls on it
        CODE_BITS: tl.constexpr,  # != 0: a code becomes the 16-bit float CODE_OFFSET + q by bit pattern
        CODE_OFFSET: tl.constexpr,
        FOLD_OFFSET: tl.constexpr,  # take CODE_OFFSET out once per group (bf16) instead of per code (fp16)
        BLOCK_M: tl.constexpr,  # 1: fp32 multiply-adds for one row instead of a padded tensor-core tile
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # divides the group size: a K block never spans two groups
        STEPS: tl.constexpr,  # K blocks per loop iteration (more loads in flight)
        ROW_SUM_EACH_BLOCK: tl.constexpr,  # one row: reduce every K block instead of once at the end
        SUM_IN_KERNEL: tl.constexpr,  # split K: the last program of a tile adds the partial sums (one launch)
        SWAP_AB: tl.constexpr,  # tensor cores on out^T = W^T x^T: the codes are the A operand (2-16 rows)
        PER_CODE_LOAD: tl.constexpr,  # tensor-core tiles: load each code's word once per code (slower, run 20)
        # tensor-core tiles with CODE_BITS, never BLOCK_M 1 (the launch plan ensures it): two codes per 32-bit
        # operation (Marlin's unpacking; 2-16 rows, run 25)
        PAIRED_UNPACK: tl.constexpr,
        INLINE_PTX: tl.constexpr,  # one row on CUDA: codes to floats in inline PTX (the interpreter runs no PTX)
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        # the split as a runtime value (the grid's) in the loops of the tensor-core tiles: with the constant, the
        # 16-row tile took 1.03-1.04x the GPU time on gate and down (benchmarks/results/gpu.md, seventh pass)
        split_k = tl.num_programs(2)
        per_word: tl.constexpr = 32 // BITS
        words_per_block: tl.constexpr = BLOCK_K // per_word
        maxq: tl.constexpr = (1 << BITS) - 1
        bias: tl.constexpr = 1 << BITS  # one row: the codes' float values are bias + q
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
        elif SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # transposed until the store
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        chunk: tl.constexpr = BLOCK_K * STEPS
        for k0 in range(pid_k * chunk, K, split_k * chunk):
            for step in tl.static_range(STEPS):
                start = k0 + step * BLOCK_K
                group = start // group_size
                live = mask_n & (start < K)
                scale = tl.load(scales_ptr + group * N + offs_n, mask=live, other=0.0).to(tl.float32)
                zero = tl.load(zeros_ptr + group * N + offs_n, mask=live, other=0.0)
                if BLOCK_M == 1 or not PER_CODE_LOAD:  # each word loaded once, unpacked with shifts
                    word_rows = start // per_word + offs_w
                    words = _load_words(qweight_ptr, word_rows[:, None], offs_n[None, :], k_words, N, mask_n[None, :])
                    if BLOCK_M > 1 and not PAIRED_UNPACK:
                        codes = (words[:, None, :] >> shifts[None, :, None]) & maxq  # (words, per_word, BLOCK_N)
                if BLOCK_M == 1:
                    k3 = start + channel
                    x3 = tl.load(x_ptr + pid_m * stride_xm + k3, mask=k3 < K, other=0.0).to(tl.float32)
                    value = _biased_code_values(words, BITS, INLINE_PTX, words_per_block, BLOCK_N)  # 2**BITS + q
                    x_sum = tl.sum(tl.sum(x3, axis=1), axis=0)
                    # one product per operation below (x_sum * bias is exact), so the compiler's fused multiply-adds
                    # cannot round differently between kernel variants (the split-sum tests compare their bits)
                    if ROW_SUM_EACH_BLOCK:
                        part = tl.sum(tl.sum(x3[:, :, None] * value, axis=1), axis=0)
                        acc_row += scale * (part - x_sum * bias - x_sum * zero)
                    else:  # multiply-adds only; the sum across threads happens once
                        acc3 += x3[:, :, None] * (value * scale[None, None, :])
                        acc_row -= scale * zero * x_sum
                        acc_row -= scale * bias * x_sum
                else:
                    offs_k = start + tl.arange(0, BLOCK_K)
                    x = tl.load(
                        x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k[None, :] < K),
                        other=0.0,
                    )
                    x_sum = tl.sum(x.to(tl.float32), axis=1)
                    # the codes as the dot's operand: (BLOCK_K, BLOCK_N), or (BLOCK_N, BLOCK_K) when SWAP_AB
                    if PAIRED_UNPACK:
                        values = _paired_code_values(
                            tl.trans(words), x.dtype, BITS, CODE_BITS, CODE_OFFSET, FOLD_OFFSET, BLOCK_N, BLOCK_K
                        )
                        # x into the codes' paired order, after the row sums (order-free) and the loads (vectorized)
                        x = _to_paired_order(x, BLOCK_M, words_per_block, per_word)
                        if not SWAP_AB:
                            values = tl.trans(values)
                    elif PER_CODE_LOAD:
                        # GemLite's unpacking: a 2-D tile of words, each read once per code it holds (the cache
                        # serves the repeats), so shift and mask are elementwise on the operand's own shape and
                        # the compiler may convert the words, not the values, to the operand's layout
                        shift_k = (offs_k % per_word) * BITS
                        word_k = offs_k // per_word
                        if SWAP_AB:
                            words = _load_words(
                                qweight_ptr, word_k[None, :], offs_n[:, None], k_words, N, mask_n[:, None]
                            )
                            codes = (words >> shift_k[None, :]) & maxq
                        else:
                            words = _load_words(
                                qweight_ptr, word_k[:, None], offs_n[None, :], k_words, N, mask_n[None, :]
                            )
                            codes = (words >> shift_k[:, None]) & maxq
                    elif SWAP_AB:
                        # a thread's word unpacks into consecutive K of one output column: the A operand's
                        # row-major layout, BLOCK_N rows (wgmma-sized) against BLOCK_M input rows
                        codes = (tl.trans(words)[:, :, None] >> shifts[None, None, :]) & maxq
                        codes = tl.reshape(codes, (BLOCK_N, BLOCK_K))
                    else:
                        codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
                    if not PAIRED_UNPACK:  # integer codes are exact in bf16/fp16, their products with x in fp32
                        values = _code_values(codes, x.dtype, CODE_BITS, CODE_OFFSET, FOLD_OFFSET)
                    if SWAP_AB:
                        part_t = tl.dot(values, tl.trans(x))
                        if CODE_BITS != 0 and FOLD_OFFSET:
                            part_t -= x_sum[None, :] * CODE_OFFSET
                        acc += scale[:, None] * (part_t - zero[:, None] * x_sum[None, :])
                    else:
                        part = tl.dot(x, values)
                        if CODE_BITS != 0 and FOLD_OFFSET:
                            part -= x_sum[:, None] * CODE_OFFSET
                        acc += scale[None, :] * (part - x_sum[:, None] * zero[None, :])
        if BLOCK_M == 1:
            acc = (tl.sum(tl.sum(acc3, axis=1), axis=0) + acc_row)[None, :]
        elif SWAP_AB:
            acc = tl.trans(acc)
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
                # one row: unrolled, the loads in flight together (0.91-0.98x the GPU time, gpu.md seventh pass)
                if BLOCK_M == 1:
                    for s in tl.static_range(1, SPLIT_K):
                        total += tl.load(out_ptr + s * M * N + offs_out, mask=mask_out, other=0.0, cache_modifier=".cg")
                else:
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
