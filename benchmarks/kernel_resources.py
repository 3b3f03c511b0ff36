# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""What the fused float-zero kernel's default launches cost an H200's multiprocessors, computed on a CPU: registers,
spills, shared memory, theoretical occupancy, waves, and SASS instructions per K block. Where the default is the
fragment kernel (``kernels/fused_mma.py``: 2-16 rows, and one row on gate/up), that is what is compiled (Gluon);
``--no-mma`` shows the Triton tiles instead.

Issue 14's Nsight Compute profile (benchmarks/results/gpu.md, eighth pass) found the kernel latency-bound: DRAM at
about 21% of its peak, with occupancy capped by registers per thread. Registers and occupancy are a property of the
compiled kernel, so they can be read without a GPU: this script compiles each default launch of the 7B shapes for
``sm_90`` with the installed Triton (its ``ptxas``, no driver) and reads the cubin with Triton's ``cuobjdump``.
Registers depend on the Triton version: with the GPU machine's (3.6 on 2026-12-04) this gave what Nsight Compute
measured there for 5a93aa4's kernel (occupancy and waves exactly; registers 126 vs 120 at one row, where the JIT also
specializes the row count, 168 and 72 at 16 rows), with the tests' 3.8 80 registers at one row. A side venv with the device's version:
``python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install torch==2.13.0 triton==3.6.0 numpy peft gguf safetensors tqdm
huggingface_hub``, then ``/tmp/t36/bin/python benchmarks/kernel_resources.py``.

Run: ``python benchmarks/kernel_resources.py`` (20 s on 2 cores; prints a markdown table).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, "..", "src"), _HERE]  # the package, and the gpu_bench package beside this file

import torch
import triton
from gpu_bench.checkpoints import LAYER_SHAPES
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from peft_qalora.kernels.fused_call import row_bucket
from peft_qalora.kernels.fused_kernels import _float_zero_mm_kernel
from peft_qalora.kernels.fused_mma import _HAS_GLUON
from peft_qalora.kernels.fused_tiles import _launch_plan

if _HAS_GLUON:
    from triton.experimental.gluon._runtime import GluonASTSource

    from peft_qalora.kernels.fused_mma import _float_zero_mma_kernel

_POINTER_TYPES = {"x_ptr": "*bf16", "qweight_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*fp32",
                  "out_ptr": "*fp32", "result_ptr": "*bf16", "counter_ptr": "*i32"}  # fmt: skip
# an H200 (sm_90): registers and warps per multiprocessor, register allocation granularity per warp
_SM_REGISTERS, _SM_WARPS, _SM_BLOCKS, _WARP_REGISTER_UNIT, _PROCESSORS = 65536, 64, 32, 256, 132


def compile_launch(rows: int, k: int, n: int, group_size: int = 128, mma: bool = _HAS_GLUON, **options):
    """The default launch for ``rows`` x ``k`` @ ``n`` (bf16, 4-bit), compiled for sm_90: (compiled kernel, grid,
    warps). ``mma``: the default may be the fragment kernel's, as on a GPU with Gluon. ``options`` overrides Triton's
    compile options (``num_warps``, ``maxnreg``, ...) for what-if tables; for the fragment kernel ``num_warps`` sets
    its warps, and with them its width (32 columns per warp)."""
    bucket = row_bucket(rows, mma)
    split_k, block_m, block_n, kwargs = _launch_plan(bucket, k, n, group_size, _PROCESSORS, torch.bfloat16, 4, mma)
    kwargs = dict(kwargs)
    fragment = kwargs.pop("MMA", False)
    if fragment:
        options = {"num_warps": kwargs.pop("num_warps"), **options}
        kwargs["WARPS"] = options["num_warps"]  # the fragment kernel's width follows its warps
        block_n = 32 * kwargs["WARPS"]
        kernel, source = _float_zero_mma_kernel, GluonASTSource
    else:
        kernel, source = _float_zero_mm_kernel, ASTSource
        options = {"num_warps": kwargs.pop("num_warps"), "num_stages": kwargs.pop("num_stages"), **options}
    constexprs = {"SPLIT_K": split_k, "SUM_IN_KERNEL": split_k > 1, **kwargs}
    names = kernel.arg_names
    signature = {name: "constexpr" if name in constexprs else _POINTER_TYPES.get(name, "i32") for name in names}
    # what the JIT would know of the 7B shapes: 16-byte aligned tensors, scalars divisible by 16 (rows only from 16)
    scalars = {"N": n, "K": k, "group_size": group_size, "stride_xm": k, "M": rows}
    divisible = [i for i, name in enumerate(names) if name in _POINTER_TYPES or scalars.get(name, 1) % 16 == 0]
    source = source(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(name),): value for name, value in constexprs.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in divisible},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    grid = (-(-n // block_n), 1 if fragment else -(-rows // block_m), split_k)
    return compiled, grid, options["num_warps"]


def _tool(name: str) -> str:
    from triton.backends import nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", name)


def resources(compiled) -> dict:
    """Registers, spill (local) bytes and the SASS of a compiled kernel, read from its cubin by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage, sass = (
            subprocess.run([_tool("cuobjdump"), flag, cubin.name], check=True, capture_output=True, text=True).stdout
            for flag in ("-res-usage", "-sass")
        )
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    return {"registers": registers, "spill_bytes": local, "sass": sass}


def loop_instructions(sass: str) -> int | None:
    """Instructions in the kernel's longest backward branch: its K loop's body (None if it has no loop)."""
    longest = 0
    for match in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T] )?BRA (0x[0-9a-f]+)", sass):
        here, target = int(match.group(1), 16), int(match.group(2), 16)
        if target < here:
            longest = max(longest, (here - target) // 16)
    return longest or None


def occupancy(registers: int, num_warps: int, shared_bytes: int) -> tuple[int, float]:
    """(resident programs per multiprocessor, theoretical occupancy) from registers and shared memory."""
    per_warp = -(-registers * 32 // _WARP_REGISTER_UNIT) * _WARP_REGISTER_UNIT
    blocks = min(_SM_REGISTERS // (per_warp * num_warps), _SM_BLOCKS, _SM_WARPS // num_warps)
    if shared_bytes:
        blocks = min(blocks, (227 << 10) // shared_bytes)
    return blocks, blocks * num_warps / _SM_WARPS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--no-mma", action="store_true", help="the Triton tiles where the fragment kernel is default")
    parser.add_argument("--num-warps", type=int, help="instead of each launch's own (what-if)")
    parser.add_argument("--maxnreg", type=int, help="Triton's register cap per thread (what-if; ptxas spills above)")
    args = parser.parse_args(argv)
    options = {key: value for key, value in (("num_warps", args.num_warps), ("maxnreg", args.maxnreg)) if value}
    print(f"Triton {triton.__version__}, sm_90, bf16 activations, 4-bit g128 codes; {_PROCESSORS} multiprocessors")
    if options:
        print(f"compile options instead of the defaults': {options}")
    print()
    print(
        "| layer | rows | kernel | grid | warps | registers | spills (bytes) | shared (bytes) | programs per SM "
        "| occupancy | waves | SASS per K loop iteration |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (k, n) in LAYER_SHAPES.items():
        for rows in args.rows:
            compiled, grid, num_warps = compile_launch(rows, k, n, mma=_HAS_GLUON and not args.no_mma, **options)
            found = resources(compiled)
            shared = compiled.metadata.shared
            blocks, theoretical = occupancy(found["registers"], num_warps, shared)
            programs = grid[0] * grid[1] * grid[2]
            waves = programs / (blocks * _PROCESSORS)
            print(
                f"| {name} | {rows} | {compiled.name} | {grid} | {num_warps} | {found['registers']} | {found['spill_bytes']} | {shared} "
                f"| {blocks} | {theoretical:.1%} | {waves:.2f} | {loop_instructions(found['sass'])} |"
            )


if __name__ == "__main__":
    main()
