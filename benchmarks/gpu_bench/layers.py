# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The ``layers`` phase (issue 14): the q, gate and down projections at 1/16/4096 rows through Marlin and the other
GPTQ kernels, the merged layer's paths (fused kernel, dequantize + cuBLAS, tinygemm) and the unmerged adapter, each timed per call cycling through that projection
of every decoder layer (weights read from HBM), with the merged outputs' errors.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from .checkpoints import LAYER_SHAPES, kernel_classes, llama_config, load_gptq, randomize_adapter, write_random_gptq
from .cli import PROJECTIONS, dtype_of
from .common import RESULTS, free_memory, log, rel
from .float_zero import fused_two_kernels, tinygemm_forward, triton_tiles
from .timing import graph_us_each, time_call


@torch.no_grad()
def run_layers(args: argparse.Namespace, config: dict, tmp: str) -> None:
    """q/gate/down at 1/16/4096 rows: Marlin, the other GPTQ kernels, the merged layer's paths.

    The checkpoint has ``--layers`` decoder layers and every figure is per call, cycling through that projection of
    all of them: with 8 layers the weights exceed the L2 cache, so they are read from HBM as in decoding.
    """
    import peft

    import peft_qalora
    from peft_qalora.kernels import dequantize_float_zeros, float_zero_gemm
    from peft_qalora.kernels.int4_tinygemm import tinygemm_matmul, tinygemm_offset_error, tinygemm_operands

    dtype = dtype_of(args)
    gs = args.gen_group_sizes[0]
    path = os.path.join(tmp, f"layers-g{gs}")
    write_random_gptq(path, llama_config(args, args.layers), 4, gs, args.device)
    bases = {}
    for backend in args.layer_backends:
        started = time.perf_counter()
        try:
            model = load_gptq(path, backend, args).eval()
            bases[backend] = model
            RESULTS["checks"].append(
                {"layers_backend": backend, "classes": kernel_classes(model), "load_s": time.perf_counter() - started}
            )
        except Exception as exc:  # noqa: BLE001
            RESULTS["checks"].append({"layers_backend": backend, "error": f"{type(exc).__name__}: {exc}"[:300]})
        log("loaded", RESULTS["checks"][-1])
    source = load_gptq(path, "gptq_triton", args)
    adapted = peft.get_peft_model(
        source, peft_qalora.QALoraConfig(r=args.r, lora_alpha=args.r, target_modules=PROJECTIONS)
    )
    randomize_adapter(adapted)
    adapted.eval()
    names = {"q_proj": "self_attn.q_proj", "gate_proj": "mlp.gate_proj", "down_proj": "mlp.down_proj"}

    def two_kernels(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with fused_two_kernels():
            return float_zero_gemm(layer, x)

    def tiles_only(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with triton_tiles():
            return float_zero_gemm(layer, x)

    def every_layer(model: torch.nn.Module, short: str) -> list[torch.nn.Module]:
        return [model.get_submodule(f"model.layers.{i}.{names[short]}") for i in range(args.layers)]

    unmerged = {short: every_layer(adapted.base_model.model, short) for short in names}
    xs = {
        (short, rows): torch.randn(rows, LAYER_SHAPES[short][0], device=args.device, dtype=dtype)
        for short in names
        for rows in (1, 16, 4096)
    }
    unmerged_out = {key: unmerged[key[0]][0](x) for key, x in xs.items()}
    # merge a second copy: merge_and_unload() replaces the adapter layers, which `unmerged` must keep
    merge_source = peft.get_peft_model(
        load_gptq(path, "gptq_triton", args),
        peft_qalora.QALoraConfig(r=args.r, lora_alpha=args.r, target_modules=PROJECTIONS),
    )
    randomize_adapter(merge_source)
    merged_model = merge_source.merge_and_unload()
    for short in names:
        merged = every_layer(merged_model, short)
        layer = merged[0]
        reference = layer.dequantize_weight().double()  # fp32 dequantize of the merged layer, from its own tensors
        tinygemm = dtype == torch.bfloat16
        if tinygemm:  # built before timing: a CUDA-graph capture must not be the call that packs the operands
            try:
                for m in merged:
                    tinygemm_operands(m)
                RESULTS["checks"].append({"layer": short, "tinygemm_offset_error_steps": tinygemm_offset_error(layer)})
            except Exception as exc:  # noqa: BLE001
                RESULTS["checks"].append({"layer": short, "tinygemm": f"{type(exc).__name__}: {exc}"[:300]})
                tinygemm = False
        for rows in (1, 16, 4096):
            x = xs[(short, rows)]
            candidates = {}
            for backend, model in bases.items():
                base = every_layer(model, short)
                candidates[f"GPTQ base, {type(base[0]).__name__} (`{backend}`)"] = (lambda m: m(x), base)
            candidates["merged, dispatch (FloatZeroGPTQLinear.forward)"] = (lambda m: m(x), merged)
            if rows <= 64:  # the default call, prepared per layer and shape; split K summed in the kernel
                candidates["merged, fused kernel"] = (lambda m: float_zero_gemm(m, x), merged)
                candidates["merged, fused kernel, Triton tiles only (set_fused_gemm(True, mma=False))"] = (
                    lambda m: tiles_only(m, x),
                    merged,
                )
                candidates["merged, fused kernel, two launches (set_fused_gemm(True, sum_in_kernel=False))"] = (
                    lambda m: two_kernels(m, x),
                    merged,
                )
            else:  # above FUSED_MAX_ROWS only on request
                candidates["merged, fused kernel"] = (lambda m: float_zero_gemm(m, x, max_rows=None), merged)
            candidates["merged, Triton dequantize + cuBLAS"] = (lambda m: x @ dequantize_float_zeros(m, dtype), merged)
            if tinygemm and rows <= 16:
                candidates["merged, tinygemm (torch int4 matmul)"] = (lambda m: tinygemm_matmul(m, x), merged)
                if rows == 1:
                    candidates["merged, dispatch with set_tinygemm(True)"] = (lambda m: tinygemm_forward(m, x), merged)
            candidates["unmerged adapter on TritonV2Linear"] = (lambda m: m(x), unmerged[short])
            for label, (call, modules) in candidates.items():
                record: dict[str, Any] = {
                    "layer": short,
                    "shape": f"{layer.in_features}x{layer.out_features}",
                    "rows": rows,
                    "variant": label,
                }
                try:
                    record.update(time_call(lambda: call(modules[0]), args))
                    record["graph_us"] = graph_us_each(call, modules)
                    if label.startswith("merged"):
                        out = call(layer)
                        record["vs_fp32_dequant_fp64_matmul"] = rel(out, x.double() @ reference)
                        record["vs_unmerged"] = rel(out, unmerged_out[(short, rows)])
                except Exception as exc:  # noqa: BLE001
                    record["error"] = f"{type(exc).__name__}: {exc}"[:300]
                log("layer", json.dumps(record))
                RESULTS.setdefault("layers", []).append(record)
    del bases, merged_model, merge_source, adapted, source
    free_memory()
