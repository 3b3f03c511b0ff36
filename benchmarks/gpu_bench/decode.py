# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The ``decode`` phase: where the merged model's generation time goes. One layer at 1/16/4096 rows through every
forward option (``layer_bench``), a profile of 8 decoding steps (``profile_generate``), the autotuned against the
fixed dequantize tile, and dequantizing once into a kept bf16 weight.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from .checkpoints import load_gptq, randomize_adapter, write_random_gptq
from .cli import PROJECTIONS, dtype_of
from .common import RESULTS, free_memory, log
from .float_zero import drop_cached_weights, float_zero_cached_forward, float_zero_path, torch_float_zero_forward
from .timing import sync, time_call
from .train_generate import generate_variant


def x_is_cuda(args: argparse.Namespace) -> bool:
    return args.device.startswith("cuda")


@torch.no_grad()
def layer_bench(base_layers: dict, merged: torch.nn.Module, args: argparse.Namespace) -> None:
    from gptqmodel.nn_modules.triton_utils.dequant import dequant

    from peft_qalora.kernels import dequantize_float_zeros, float_zero_forward, gptq_cuda

    dtype = dtype_of(args)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"):
        base, layer = base_layers[name], merged.get_submodule(name)
        base.eval()
        cached = dequantize_float_zeros(layer, dtype) if x_is_cuda(args) else layer.dequantize_weight().to(dtype)

        def tiled(autotune: bool, x: torch.Tensor):
            gptq_cuda.set_dequant_tile(autotune)
            try:
                return float_zero_forward(layer, x)
            finally:
                gptq_cuda.set_dequant_tile(False)

        for rows in (1, 16, 4096):
            x = torch.randn(rows, layer.in_features, device=args.device, dtype=dtype)
            candidates = {
                "gptq base (TritonV2 eval)": lambda: base(x),
                "merged, torch fp32 dequantize": lambda: torch_float_zero_forward(layer, x),
                "merged, Triton dequantize (autotuned)": lambda: tiled(True, x),
                "merged, Triton dequantize (fixed tile)": lambda: tiled(False, x),
                "merged, cached bf16 weight": lambda: x @ cached,
            }
            if rows == 1:
                candidates["dequantize only: GPTQModel Triton (int zeros)"] = lambda: dequant(
                    dtype,
                    base.qweight,
                    base.scales,
                    base.qzeros,
                    base.g_idx,
                    base.bits,
                    base.pack_dtype_bits,
                    base.maxq,
                )
                candidates["dequantize only: float zeros (autotuned)"] = lambda: dequantize_float_zeros(layer, dtype)
            for label, fn in candidates.items():
                try:
                    record = {
                        "layer": name.split(".")[-1],
                        "shape": f"{layer.in_features}x{layer.out_features}",
                        "rows": rows,
                        "variant": label,
                        **time_call(fn, args),
                    }
                except Exception as exc:  # noqa: BLE001
                    record = {"layer": name, "rows": rows, "variant": label, "error": f"{type(exc).__name__}: {exc}"}
                log("layer", json.dumps(record))
                RESULTS.setdefault("layers", []).append(record)
        cached = None
    RESULTS["checks"].append({"autotuned_tiles": gptq_cuda.autotuned_tiles()})


@torch.no_grad()
def profile_generate(name: str, model: torch.nn.Module, args: argparse.Namespace, batch: int = 16) -> None:
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(3, args.vocab_size, (batch, args.prompt_len), device=args.device)
    kwargs = dict(
        do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8
    )
    try:
        model.generate(input_ids=ids, **kwargs)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.generate(input_ids=ids, **kwargs)
            sync(args.device)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)
    except Exception as exc:  # noqa: BLE001
        table = f"profiler failed: {type(exc).__name__}: {exc}"
    with open(os.path.join(args.out, "profile.txt"), "a") as f:
        f.write(f"\n===== generate {name}, batch {batch}, 8 new tokens\n{table}\n")


def run_decode(args: argparse.Namespace, config: dict, tmp: str) -> None:
    """Where generation time goes for the merged model: per-layer timings and the dequantize / cache options."""
    import peft

    import peft_qalora

    gs = args.gen_group_sizes[0]
    path = os.path.join(tmp, f"decode-g{gs}")
    write_random_gptq(path, config, 4, gs, args.device)
    model = load_gptq(path, args.backend, args)
    from peft_qalora.gptq import is_gptq_layer

    base_layers = {name: m for name, m in model.named_modules() if is_gptq_layer(m)}
    generate_variant("gptq base", model, args, gs)
    profile_generate("gptq base", model, args)
    model = peft.get_peft_model(
        model, peft_qalora.QALoraConfig(r=args.r, lora_alpha=args.r, target_modules=PROJECTIONS)
    )
    randomize_adapter(model)
    merged = model.merge_and_unload()
    layer_bench(base_layers, merged, args)
    from peft_qalora.kernels import gptq_cuda

    with float_zero_path(triton=True):
        gptq_cuda.set_dequant_tile(True)
        generate_variant("merged (Triton dequantize, autotuned tile)", merged, args, gs)
        profile_generate("merged (Triton dequantize, autotuned tile)", merged, args)
        gptq_cuda.set_dequant_tile(False)
        generate_variant("merged (Triton dequantize, fixed tile)", merged, args, gs)
    free_memory()
    allocated = torch.cuda.memory_allocated if args.device.startswith("cuda") else (lambda: 0)
    before = allocated()
    with float_zero_cached_forward():
        generate_variant("merged (dequantized once, bf16 weights kept)", merged, args, gs)
        RESULTS["checks"].append(
            {"bf16 weight cache GiB": (allocated() - before) / 2**30, "model GiB before cache": before / 2**30}
        )
    drop_cached_weights(merged)
    del merged, model
    free_memory()
