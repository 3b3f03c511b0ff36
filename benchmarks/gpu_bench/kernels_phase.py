# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The ``kernels`` phase: every GPTQModel backend that loads, checked on two layers of a small synthetic checkpoint
(forward and input gradient in train and eval mode against the fp64 dequantized reference, and a QA-LoRA layer's
input and adapter gradients with the dequantize-again backward on and off). ``run_kernels`` starts
``benchmarks/gpu.py --kernel-worker`` in a subprocess under ``--kernel-timeout`` (some backends JIT-compile CUDA
extensions on first use) and reads back the JSON lines that ``kernel_worker`` writes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from .checkpoints import kernel_classes, load_gptq
from .cli import dtype_of
from .common import RESULTS, free_memory, log, rel

# the command the worker subprocess runs: benchmarks/gpu.py, beside this package
ENTRY_POINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpu.py")


def check_layer(layer: torch.nn.Module, weight: torch.Tensor, dtype: torch.dtype, device: str) -> dict:
    """Forward and input gradient of a GPTQ layer in train and eval mode against ``x @ W.T`` in fp64."""
    out: dict[str, Any] = {}
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        x = torch.randn(256, layer.in_features, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(256, layer.out_features, device=device, dtype=dtype)
        try:
            y = layer(x)
            ref = x.double() @ weight.double().t()
            out[f"{mode}_fwd"] = rel(y, ref)
            if not y.requires_grad:
                out[f"{mode}_grad"] = "no grad"
                continue
            y.backward(g)
            out[f"{mode}_grad"] = rel(x.grad, g.double() @ weight.double())
        except Exception as exc:  # noqa: BLE001 - record and go on
            out[f"{mode}_error"] = f"{type(exc).__name__}: {exc}"[:200]
    layer.train(True)
    return out


def check_qalora_layer(layer: torch.nn.Module, weight: torch.Tensor, dtype: torch.dtype, device: str) -> dict:
    """QA-LoRA on a GPTQ layer: input and adapter gradients against an fp64 reference, dequantize-again on and off."""
    from peft_qalora import kernels
    from peft_qalora.layer import QALoraLinear

    out: dict[str, Any] = {}
    wrapped = QALoraLinear(layer, "default", r=16, lora_alpha=16, init_lora_weights=False)
    wrapped.train()
    gs = wrapped.group_size
    for recompute in (True, False):
        kernels.set_recompute(recompute)
        tag = "recompute" if recompute else "stock"
        try:
            A, B = wrapped.qalora_A["default"].weight, wrapped.qalora_B["default"].weight
            A.grad = B.grad = None
            x = torch.randn(256, layer.in_features, device=device, dtype=dtype, requires_grad=True)
            g = torch.randn(256, layer.out_features, device=device, dtype=dtype)
            y = wrapped(x)
            y.backward(g)
            xd = x.detach().double().requires_grad_(True)
            Ad, Bd = A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True)
            pooled = xd.unflatten(-1, (-1, gs)).mean(-1)
            yd = xd @ weight.double().t() + wrapped.scaling["default"] * (pooled @ Ad.t()) @ Bd.t()
            yd.backward(g.double())
            out[tag] = {
                "fwd": rel(y, yd),
                "grad_x": rel(x.grad, xd.grad),
                "grad_A": rel(A.grad, Ad.grad),
                "grad_B": rel(B.grad, Bd.grad),
            }
        except Exception as exc:  # noqa: BLE001
            out[tag] = f"{type(exc).__name__}: {exc}"[:300]
    kernels.set_recompute(True)
    return out


def kernel_worker(args: argparse.Namespace) -> None:
    """Runs in a subprocess: one JSON line per backend and group size to ``--out``/kernels.jsonl."""
    from peft_qalora.testing import tiny_llama_config, write_gptq_checkpoint

    dtype = dtype_of(args)
    results_path = os.path.join(args.out, "kernels.jsonl")
    try:
        from gptqmodel.utils.backend import BACKEND
        from gptqmodel.utils.importer import select_quant_linear

        for gs in args.group_sizes:
            picked, picked_train = (
                select_quant_linear(
                    bits=4,
                    group_size=gs,
                    desc_act=False,
                    sym=True,
                    device=torch.device(args.device),
                    pack_dtype=torch.int32,
                    backend=backend,
                    dtype=dtype,
                )
                for backend in (BACKEND.AUTO, BACKEND.AUTO_TRAINABLE)
            )
            with open(results_path, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "group_size": gs,
                            "auto_select": picked.__name__,
                            "auto_trainable_select": picked_train.__name__,
                        }
                    )
                    + "\n"
                )
    except Exception as exc:  # noqa: BLE001
        with open(results_path, "a") as f:
            f.write(json.dumps({"auto_select_error": f"{type(exc).__name__}: {exc}"[:300]}) + "\n")
    with tempfile.TemporaryDirectory(prefix="qalora-kernels-") as tmp:
        synthetic = {}
        for gs in args.group_sizes:
            config = tiny_llama_config(hidden_size=1024, intermediate_size=2816, num_layers=1, vocab_size=512)
            config.update(num_attention_heads=8, num_key_value_heads=8, head_dim=128)
            synthetic[gs] = write_gptq_checkpoint(os.path.join(tmp, f"g{gs}"), bits=4, group_size=gs, config=config)
        for backend in args.kernel_backends:
            for gs in args.group_sizes:
                record: dict[str, Any] = {"backend": backend, "group_size": gs}
                started = time.perf_counter()
                try:
                    model = load_gptq(synthetic[gs].path, backend, args)
                    record["classes"] = kernel_classes(model)
                    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
                        layer = model.get_submodule(name)
                        weight = synthetic[gs].layers[name].dequantize().to(args.device)
                        record[name.split(".")[-1]] = check_layer(layer, weight, dtype, args.device)
                    layer = model.get_submodule("model.layers.0.mlp.down_proj")
                    weight = synthetic[gs].layers["model.layers.0.mlp.down_proj"].dequantize().to(args.device)
                    record["qalora_down_proj"] = check_qalora_layer(layer, weight, dtype, args.device)
                    del model
                except Exception as exc:  # noqa: BLE001
                    record["error"] = f"{type(exc).__name__}: {exc}"[:400]
                record["seconds"] = round(time.perf_counter() - started, 1)
                log("kernel", json.dumps(record))
                with open(results_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                free_memory()


def run_kernels(args: argparse.Namespace, argv: list[str]) -> None:
    path = os.path.join(args.out, "kernels.jsonl")
    if os.path.exists(path):
        os.unlink(path)
    command = [sys.executable, ENTRY_POINT, *argv, "--kernel-worker"]
    try:
        subprocess.run(command, timeout=args.kernel_timeout, check=False)
    except subprocess.TimeoutExpired:
        log(f"kernel worker stopped after {args.kernel_timeout} s (a backend was probably JIT-compiling)")
        RESULTS["kernels_timeout"] = args.kernel_timeout
    if os.path.exists(path):
        with open(path) as f:
            RESULTS["kernels"] = [json.loads(line) for line in f if line.strip()]
