# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Cost of the calibrated integer merge per layer at Llama-2-7B shapes, on this machine's CPU.

For each shape (in x out: 4096x4096 attention, 4096x11008 gate/up, 11008x4096 down) it builds a 4-bit g128 GPTQ
layer from random weights, a calibration Hessian ``H = X^T X`` from correlated random activations with a few
outlier channels, and a group-constant adapter change ``D`` whose size relative to the scales follows what a trained
adapter has (|D/s| median about 0.003 with a heavy tail, benchmarks/quality.py's 4-bit adapter), and times
:func:`peft_qalora.calibrated_merge.solve_layer` for each method, plus the Hessian accumulation per 1,000 tokens
(``X^T X``, what the forward hooks add). ``sequential`` solves on the sequential calibration's objective (merged
inputs ``X_m``: the synthetic inputs plus a small upstream error) and also times, per 1,000 tokens, the statistics
it gathers for a layer: ``X_m^T X_m``, the residual ``y_a - X_m W^T`` and ``b = residual^T X_m``, and the dense
passes of the two streams over the layer (about five ``X W^T`` per token: see docs/design.md). Prints a markdown
table::

    python benchmarks/calibrated_merge.py --threads 2 --table benchmarks/results/calibrated_merge_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from peft_qalora.calibrated_merge import METHODS, solve_layer
from peft_qalora.testing import quantize_rtn

# Dense passes of the two streams over one layer per calibration token in the sequential calibration, besides the
# residual and b: a Llama block's stages [q k v] [o] [gate up] [down] run q/k/v 8 times, o 6, gate/up 4, down 2
# (adapter passes up to each stage, merged passes up to each stage's input, the merged pass to the block's end);
# weighted by size at Llama-2-7B shapes that is about 4.7 per layer.
STREAM_PASSES = 5
SHAPES = {"q/k/v/o_proj": (4096, 4096), "gate/up_proj": (4096, 11008), "down_proj": (11008, 4096)}


def layer_problem(in_features: int, out_features: int, group_size: int, bits: int, tokens: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    g_idx = (torch.arange(in_features) // group_size).int()
    layer = quantize_rtn(0.02 * torch.randn(out_features, in_features, generator=generator), bits, g_idx, sym=False)
    rank = 64
    x = torch.randn(tokens, rank, generator=generator) @ torch.randn(rank, in_features, generator=generator) / 8
    x += torch.randn(tokens, in_features, generator=generator)
    x[:, :8] *= 30  # outlier channels, as LLM activations have
    hessian = x.t() @ x / tokens
    # Heavy-tailed adapter change: |D/s| median ~0.003, a few groups near 0.2.
    ratio = (
        0.003
        * torch.randn(layer.scales.shape, generator=generator)
        * torch.distributions.StudentT(2.0).sample(layer.scales.shape).abs().clamp(max=60)
    )
    return layer, g_idx, ratio * layer.scales.float(), hessian, x


def sequential_objective(layer, g_idx, delta, x):
    """The sequential calibration's objective for the synthetic layer, and its cost per 1,000 tokens."""
    generator = torch.Generator().manual_seed(1)
    weight = layer.dequantize()
    adapted = weight + delta[g_idx.long()].t()
    x_merged = x + 0.01 * x.std() * torch.randn(x.shape, generator=generator)  # what earlier layers missed
    chunk, chunk_merged = x[:1000], x_merged[:1000]
    start = time.perf_counter()
    _ = chunk_merged.t() @ chunk_merged
    residual = chunk @ adapted.t() - chunk_merged @ weight.t()
    _ = residual.t() @ chunk_merged
    for _ in range(STREAM_PASSES):
        _ = chunk @ adapted.t()
    seconds = time.perf_counter() - start
    residual = x @ adapted.t() - x_merged @ weight.t()
    tokens = x.shape[0]
    options = {
        "hessian": x_merged.t() @ x_merged / tokens,
        "linear": residual.t().matmul(x_merged).div_(tokens),
        "start_energy": residual.square().sum(0, dtype=torch.float64) / tokens,
    }
    return options, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens of the synthetic Hessian")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--table", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [
        "| layer (in x out) | method | seconds per layer (median) | kept on calibration outputs | codes changed | "
        "zeros changed |",
        "|---|---|---|---|---|---|",
    ]
    for label in args.shapes:
        in_features, out_features = SHAPES[label]
        layer, g_idx, delta, hessian, x = layer_problem(in_features, out_features, 128, 4, args.tokens, seed=0)
        start = time.perf_counter()
        chunk = x[:1000]
        _ = chunk.t() @ chunk
        hessian_seconds = time.perf_counter() - start
        for method in args.methods:
            times = []
            options = {}
            if method == "sequential":
                options, statistics_seconds = sequential_objective(layer, g_idx, delta, x)
            for _ in range(args.repeats):
                start = time.perf_counter()
                solution = solve_layer(
                    label,
                    layer.codes,
                    layer.zeros,
                    layer.scales,
                    g_idx,
                    delta,
                    options.pop("hessian", hessian),
                    4,
                    0,
                    "greedy" if method == "sequential" else method,
                    **options,
                )
                times.append(time.perf_counter() - start)
            report = solution.report
            lines.append(
                f"| {label} ({in_features}x{out_features}) | {method} | {statistics.median(times):.1f} | "
                f"{report.kept:.1%} | {report.codes_changed:,} | {report.zeros_changed:,} |"
            )
            print(lines[-1], flush=True)
            if method == "sequential":
                lines.append(
                    f"| {label} ({in_features}x{out_features}) | sequential statistics and stream passes per 1,000 "
                    f"tokens | {statistics_seconds:.2f} | | | |"
                )
                print(lines[-1], flush=True)
        lines.append(
            f"| {label} ({in_features}x{out_features}) | X^T X per 1,000 tokens | {hessian_seconds:.2f} | | | |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        f"4-bit g128, synthetic Hessian from {args.tokens:,} tokens; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
