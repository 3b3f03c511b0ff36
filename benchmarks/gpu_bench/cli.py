# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The benchmark's command line: ``parse_args`` with its flags and defaults, the constants the flags choose among
(the adapted projections, the GPTQModel backends the kernels phase tries, the serve phase's models), and
``dtype_of``, the activation dtype that ``--dtype`` names.
"""

from __future__ import annotations

import argparse
import os

import torch

# the --help description: the first paragraph of benchmarks/gpu.py's docstring
DESCRIPTION = (
    "GPU benchmark: QA-LoRA training and generation on a Llama-2-7B-shaped GPTQ model, side by side in one process."
)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KERNEL_BACKENDS = ("gptq_torch", "gptq_triton", "auto", "gptq_exllama_v2", "gptq_marlin")
# serve phase: short name -> the row label in the tables
SERVE_MODELS = {
    "marlin": "GPTQ base on Marlin (`gptq_marlin`)",
    "merged": "merged (FloatZeroGPTQLinear, fused kernel, one launch per call)",
    "merged-triton-tiles": "merged, Triton tiles only, no fragment kernel (`set_fused_gemm(True, mma=False)`)",
    "merged-jit-launch": "merged, every Triton launch through the JIT (`set_direct_launch(False)`)",
    "merged-two-kernels": "merged, split-K summed by a second kernel (`set_fused_gemm(True, sum_in_kernel=False)`)",
    "merged-tinygemm": "merged, one row through tinygemm (`set_tinygemm(True)`, eager only)",
    "merged-tinygemm16": "merged, up to 16 rows through tinygemm (`set_tinygemm(True, max_rows=16)`, eager only)",
    "unmerged": "unmerged adapter on its base (`gptq_triton`, TritonV2Linear)",
    "bf16": "bf16 model",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument(
        "--phases",
        nargs="+",
        default=["train", "generate"],
        help="kernels, train, generate, genpair, decode, marlin-warmup, tiles, layers, serve",
    )
    p.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-2-7B has 32)")
    p.add_argument("--hidden-size", type=int, default=4096)
    p.add_argument("--intermediate-size", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--group-sizes", type=int, nargs="+", default=[128, 32])
    p.add_argument("--gen-group-sizes", type=int, nargs="+", default=[128])
    p.add_argument("--train-shapes", nargs="+", default=["2048x2", "512x8"], help="SEQxBATCH")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--backend", default="gptq_triton", help="GPTQModel backend for training and generation")
    p.add_argument("--gen-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--kernel-timeout", type=int, default=240)
    p.add_argument("--kernel-backends", nargs="+", default=list(KERNEL_BACKENDS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--profile", nargs="*", default=[], help="variants to profile for one step (first train shape)")
    p.add_argument(
        "--layer-backends",
        nargs="+",
        default=["gptq_marlin", "gptq_triton", "gptq_torch"],
        help="GPTQModel backends timed per layer in the layers phase",
    )
    p.add_argument(
        "--tile-grid",
        default="wide",
        choices=["wide", "focus", "paired", "occupancy", "mma"],
        help="tiles phase: the sweep",
    )
    p.add_argument(
        "--tile-rows",
        nargs="+",
        type=int,
        default=[1, 16, 64],
        choices=[1, 2, 4, 8, 16, 64],
        help="tiles phase: the row counts swept (the others are timed with the default tile only)",
    )
    p.add_argument("--serve-modes", nargs="+", default=["eager", "static"], help="serve phase: eager, static")
    p.add_argument(
        "--serve-models",
        nargs="+",
        default=list(SERVE_MODELS),
        choices=list(SERVE_MODELS),
        help="serve phase: the models generating side by side",
    )
    p.add_argument(
        "--warmup-dtypes",
        nargs="+",
        default=["float16", "bfloat16"],
        help="marlin-warmup phase: the activation dtypes to compile Marlin for (fp16 took 179 s, bf16 120 s after it)",
    )
    p.add_argument("--kernel-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    return getattr(torch, args.dtype)
