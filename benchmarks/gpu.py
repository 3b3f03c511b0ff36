# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""GPU benchmark: QA-LoRA training and generation on a Llama-2-7B-shaped GPTQ model, side by side in one process.

Everything is built here, nothing is downloaded: a Llama-2-7B-shaped checkpoint (hidden 4096, intermediate 11008,
32 heads, vocab 32000; ``--layers`` decoder layers) with random 4-bit codes and random fp16 scales (symmetric GPTQ,
round-to-nearest layout, ``gptq`` v1 on disk) is written once per group size and loaded through the real path
(transformers + optimum + GPTQModel, ``GPTQConfig(bits=4, backend=--backend)``). Random codes give the same tensor
shapes, kernels and memory traffic as a real quantized 7B model; tokens/s do not depend on the values.

Phases (``--phases``):

- ``kernels``: for each GPTQModel backend that loads on CUDA, forward and input gradient of two layers, in train and
  eval mode, against the dequantized fp32 reference, plus a QA-LoRA layer's input and adapter gradients. Runs in a
  subprocess with a time limit, because some backends JIT-compile CUDA extensions on first use.
- ``train``: training tokens/s and peak GPU memory (``torch.cuda.max_memory_allocated`` over the timed steps, model,
  optimizer state and activations included) for QALORA (r=16 on all 7 projections; with and without the
  dequantize-again backward of ``peft_qalora.kernels``), PEFT's ``LoraConfig(use_qalora=True)`` on the same layers and
  rank, and plain LoRA on a bf16 model of the same shapes. Step = forward + causal-LM loss + backward + AdamW.
  CUDA-event timing, warm-up steps excluded, medians.
- ``generate``: greedy ``generate`` tokens/s (fixed number of new tokens, KV cache) at batch 1 and 16 for the base
  GPTQ model, the base with the QA-LoRA adapter unmerged, the merged float-zero model (its current forward, and the
  Triton dequantize of ``peft_qalora.kernels``), and the bf16 model.
- ``genpair``: the base GPTQ model and the merged model (Triton dequantize) loaded side by side and timed alternately,
  which cancels most of the run-to-run spread of greedy decoding (CPU-bound at these sizes).
- ``decode``: where the merged model's generation time goes: one layer at 1/16/4096 rows for every forward option,
  a profile of 8 decoding steps, autotuned vs fixed dequantize tile, and dequantizing once into a kept bf16 weight.

Run on one GPU (on an H100: about 6.5 minutes for the default ``train generate``, 2 minutes for ``genpair``)::

    PYTHONPATH=src python benchmarks/gpu.py --out OUT_DIR --profile qalora "lora bf16" "peft use_qalora"
    PYTHONPATH=src python benchmarks/gpu.py --phases genpair --gen-repeats 5 --out OUT_DIR

The table is printed last and written to ``--out``/gpu_results.md with the raw numbers in gpu_results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KERNEL_BACKENDS = ("gptq_torch", "gptq_triton", "auto", "gptq_exllama_v2", "gptq_marlin")
# serve phase: short name -> the row label in the tables
SERVE_MODELS = {
    "marlin": "GPTQ base on Marlin (`gptq_marlin`)",
    "merged": "merged (FloatZeroGPTQLinear, fused kernel)",
    "unmerged": "unmerged adapter on its base (`gptq_triton`, TritonV2Linear)",
    "bf16": "bf16 model",
}
RESULTS: dict[str, Any] = {"kernels": [], "train": [], "generate": [], "checks": [], "phase_seconds": {}}


def log(*parts: Any) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--phases", nargs="+", default=["train", "generate"], help="kernels, train, generate, decode, genpair"
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
    p.add_argument("--tile-grid", default="wide", choices=["wide", "focus"], help="tiles phase: the sweep")
    p.add_argument("--serve-modes", nargs="+", default=["eager", "static"], help="serve phase: eager, static")
    p.add_argument(
        "--serve-models",
        nargs="+",
        default=list(SERVE_MODELS),
        choices=list(SERVE_MODELS),
        help="serve phase: the models generating side by side",
    )
    p.add_argument("--kernel-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    return getattr(torch, args.dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Timer:
    """Milliseconds of a region: CUDA events on CUDA, perf_counter elsewhere."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __enter__(self) -> Timer:
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def versions() -> dict:
    import importlib.metadata as md

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "optimum", "gptqmodel", "triton", "accelerate", "bitsandbytes"):
        try:
            info[name] = md.version(name)
        except Exception:
            info[name] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


# ----------------------------------------------------------------------------------------------------- checkpoints


def llama_config(args: argparse.Namespace, layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "head_dim": args.hidden_size // args.heads,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
    }


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every projection of one decoder layer."""
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    return {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, kv),
        "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (h, i),
        "mlp.up_proj": (h, i),
        "mlp.down_proj": (i, h),
    }


def random_scales(shape: tuple[int, int], device: str, generator: torch.Generator) -> torch.Tensor:
    # ~0.0044 * U(0.75, 1.25): uniform 4-bit codes around zero point 8 then give weights of std ~0.02, like Llama-2.
    from peft_qalora.testing import _three_significant_bits

    s = 0.0044 * (0.75 + 0.5 * torch.rand(shape, device=device, generator=generator))
    return _three_significant_bits(s)


def write_random_gptq(path: str, config: dict, bits: int, group_size: int, device: str, seed: int = 0) -> float:
    """Write a GPTQ checkpoint with random codes and scales (sym, v1) for ``config``; returns GB written."""
    from safetensors.torch import save_file

    from peft_qalora.gptq import pack_qweight, pack_qzeros
    from peft_qalora.testing import gptq_quantization_config

    os.makedirs(path, exist_ok=True)
    gen = torch.Generator(device).manual_seed(seed)
    maxq = (1 << bits) - 1
    total = 0
    index: dict[str, str] = {}
    layers = config["num_hidden_layers"]
    for i in range(layers):
        tensors: dict[str, torch.Tensor] = {}
        for name, (k, n) in projection_shapes(config).items():
            prefix = f"model.layers.{i}.{name}"
            codes = torch.randint(0, maxq + 1, (k, n), device=device, generator=gen, dtype=torch.int32)
            groups = k // group_size
            zeros = torch.full((groups, n), (maxq + 1) // 2, device=device, dtype=torch.int64)
            tensors[f"{prefix}.qweight"] = pack_qweight(codes, bits).cpu()
            tensors[f"{prefix}.qzeros"] = pack_qzeros(zeros, bits, "gptq").cpu()
            tensors[f"{prefix}.scales"] = random_scales((groups, n), device, gen).cpu()
            tensors[f"{prefix}.g_idx"] = (torch.arange(k, dtype=torch.int32) // group_size).contiguous()
            del codes
        h = config["hidden_size"]
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        file = f"layer-{i:03d}.safetensors"
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        index.update(dict.fromkeys(tensors, file))
    h, v = config["hidden_size"], config["vocab_size"]
    rest = {
        "model.embed_tokens.weight": (torch.randn(v, h, device=device, generator=gen) * 0.02).half().cpu(),
        "lm_head.weight": (torch.randn(v, h, device=device, generator=gen) * 0.02).half().cpu(),
        "model.norm.weight": torch.ones(h, dtype=torch.float16),
    }
    save_file(rest, os.path.join(path, "rest.safetensors"), metadata={"format": "pt"})
    total += sum(t.numel() * t.element_size() for t in rest.values())
    index.update(dict.fromkeys(rest, "rest.safetensors"))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f)
    config = dict(config)
    config["quantization_config"] = gptq_quantization_config(bits, group_size)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return total / 1e9


def load_gptq(path: str, backend: str, args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPTQConfig

    with contextlib.redirect_stdout(sys.stderr):
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype_of(args),
            quantization_config=GPTQConfig(bits=4, backend=backend),
            device_map={"": args.device if args.device == "cpu" else 0},
        )
    return model


def kernel_classes(model: torch.nn.Module) -> list[str]:

    from peft_qalora.gptq import is_gptq_layer

    return sorted({type(m).__name__ for m in model.modules() if is_gptq_layer(m)})


def bf16_model(config: dict, args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config)
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype_of(args))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model


# ------------------------------------------------------------------------------------------------------- kernels


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


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
    command = [sys.executable, os.path.abspath(__file__), *argv, "--kernel-worker"]
    try:
        subprocess.run(command, timeout=args.kernel_timeout, check=False)
    except subprocess.TimeoutExpired:
        log(f"kernel worker stopped after {args.kernel_timeout} s (a backend was probably JIT-compiling)")
        RESULTS["kernels_timeout"] = args.kernel_timeout
    if os.path.exists(path):
        with open(path) as f:
            RESULTS["kernels"] = [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------------------- train


def train_variant(
    name: str,
    model: torch.nn.Module,
    args: argparse.Namespace,
    group_size: int | None,
    setup: Callable[[], None] = lambda: None,
) -> None:
    """Time ``args.steps`` training steps of ``model`` for every ``--train-shapes`` entry and record them."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    trainable = sum(p.numel() for p in params)
    model.train()
    setup()
    for shape in args.train_shapes:
        seq, batch = map(int, shape.split("x"))
        ids = torch.randint(3, args.vocab_size, (batch, seq), device=args.device)
        record: dict[str, Any] = {
            "variant": name,
            "group_size": group_size,
            "seq": seq,
            "batch": batch,
            "trainable": trainable,
        }
        try:
            times, warm = [], []
            free_memory()
            for step in range(args.warmup + args.steps):
                if step == args.warmup and args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                    record["allocated_before_gib"] = torch.cuda.memory_allocated() / 2**30
                    torch.cuda.reset_peak_memory_stats()
                with Timer(args.device) as t:
                    optimizer.zero_grad(set_to_none=True)
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    optimizer.step()
                (times if step >= args.warmup else warm).append(t.ms)
            record["warmup_ms"] = [round(x, 1) for x in warm]
            record["loss"] = float(loss.detach())
            record["step_ms"] = statistics.median(times)
            record["step_ms_all"] = [round(x, 2) for x in times]
            record["tokens_per_s"] = batch * seq / (record["step_ms"] / 1e3)
            if args.device.startswith("cuda"):
                record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except torch.OutOfMemoryError as exc:
            record["error"] = f"OOM: {str(exc)[:160]}"
        except Exception as exc:  # noqa: BLE001
            record["error"] = f"{type(exc).__name__}: {exc}"[:400]
        first = shape == args.train_shapes[0] and group_size in (None, args.group_sizes[0])
        if name in args.profile and first and "error" not in record:
            profile_step(f"{name} g{group_size}", model, optimizer, ids, args)
        optimizer.zero_grad(set_to_none=True)
        loss = None
        log("train", json.dumps({k: v for k, v in record.items() if k != "step_ms_all"}))
        RESULTS["train"].append(record)
        free_memory()
    del optimizer


def profile_step(
    name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, args: argparse.Namespace
) -> None:
    """One training step under the torch profiler; the top CUDA kernels go to ``--out``/profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    except Exception as exc:  # noqa: BLE001
        table = f"profiler failed: {type(exc).__name__}: {exc}"
    with open(os.path.join(args.out, "profile.txt"), "a") as f:
        f.write(f"\n===== {name}, seq x batch {ids.shape[1]} x {ids.shape[0]}\n{table}\n")


# ------------------------------------------------------------------------------------------------------ generate


@torch.no_grad()
def generate_variant(name: str, model: torch.nn.Module, args: argparse.Namespace, group_size: int | None) -> None:
    model.eval()
    for batch in args.gen_batches:
        record: dict[str, Any] = {"variant": name, "group_size": group_size, "batch": batch}
        try:
            ids = torch.randint(3, args.vocab_size, (batch, args.prompt_len), device=args.device)
            kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
            model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
            times = []
            for _ in range(args.gen_repeats):
                with Timer(args.device) as t:
                    out = model.generate(
                        input_ids=ids, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, **kwargs
                    )
                times.append(t.ms)
            assert out.shape[1] == args.prompt_len + args.gen_tokens, out.shape
            record["ms"] = statistics.median(times)
            record["tokens_per_s"] = batch * args.gen_tokens / (record["ms"] / 1e3)
            record["ms_per_step"] = record["ms"] / args.gen_tokens
        except Exception as exc:  # noqa: BLE001
            record["error"] = f"{type(exc).__name__}: {exc}"[:400]
        log("generate", json.dumps(record))
        RESULTS["generate"].append(record)
        free_memory()


def randomize_adapter(model: torch.nn.Module) -> None:
    """Give the adapter a non-zero B (B starts at zero), so that the merge moves the zeros."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "qalora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


@contextlib.contextmanager
def float_zero_path(triton: bool):
    """Run merged ``FloatZeroGPTQLinear`` layers through the Triton dequantize (CUDA default) or the torch one."""
    from peft_qalora.kernels import set_float_zero_triton

    set_float_zero_triton(triton)
    try:
        yield
    finally:
        set_float_zero_triton(True)


def torch_float_zero_forward(layer, x):
    with float_zero_path(triton=False):
        return layer(x)


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.float()


# -------------------------------------------------------------------------------------------------------- decode


@contextlib.contextmanager
def float_zero_cached_forward():
    """``FloatZeroGPTQLinear`` that dequantizes once to the activation dtype and keeps it (memory for speed)."""
    from peft_qalora import FloatZeroGPTQLinear
    from peft_qalora.kernels import dequantize_float_zeros
    from peft_qalora.kernels.gptq_cuda import float_zero_supported

    original = FloatZeroGPTQLinear.forward

    def forward(self, x):
        if not float_zero_supported(self, x):
            return original(self, x)
        weight = getattr(self, "_bench_weight_cache", None)
        if weight is None or weight.dtype != x.dtype:
            weight = self._bench_weight_cache = dequantize_float_zeros(self, x.dtype)
        out = x.reshape(-1, self.in_features) @ weight
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    FloatZeroGPTQLinear.forward = forward
    try:
        yield
    finally:
        FloatZeroGPTQLinear.forward = original


def drop_cached_weights(model: torch.nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "_bench_weight_cache"):
            del module._bench_weight_cache


def x_is_cuda(args: argparse.Namespace) -> bool:
    return args.device.startswith("cuda")


def time_call(fn: Callable[[], Any], args: argparse.Namespace) -> dict:
    """GPU time (triton do_bench median) and wall time per call in a back-to-back loop (CPU dispatch included)."""
    if args.device.startswith("cuda"):
        import triton.testing

        gpu_ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    else:
        gpu_ms = float("nan")
    for _ in range(10):
        fn()
    sync(args.device)
    n = 200 if args.device.startswith("cuda") else 3
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(args.device)
    return {"gpu_us": gpu_ms * 1e3, "loop_us": (time.perf_counter() - start) / n * 1e6}


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


@torch.no_grad()
def run_genpair(args: argparse.Namespace, config: dict, tmp: str) -> None:
    """Base GPTQ model and merged model (Triton dequantize) loaded side by side, generation timed alternately."""
    import peft

    import peft_qalora

    gs = args.gen_group_sizes[0]
    path = os.path.join(tmp, f"pair-g{gs}")
    write_random_gptq(path, config, 4, gs, args.device)
    base = load_gptq(path, args.backend, args)
    model = peft.get_peft_model(
        load_gptq(path, args.backend, args),
        peft_qalora.QALoraConfig(r=args.r, lora_alpha=args.r, target_modules=PROJECTIONS),
    )
    randomize_adapter(model)
    merged = model.merge_and_unload()
    models = {"gptq base": base, "merged (Triton dequantize)": merged}
    for m in models.values():
        m.eval()
    with float_zero_path(triton=True):
        for batch in args.gen_batches:
            ids = torch.randint(3, args.vocab_size, (batch, args.prompt_len), device=args.device)
            kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
            for m in models.values():
                m.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
            times: dict[str, list[float]] = {name: [] for name in models}
            names = list(models)
            for rep in range(args.gen_repeats):
                for name in names[rep % 2 :] + names[: rep % 2]:  # alternate which goes first
                    with Timer(args.device) as t:
                        models[name].generate(
                            input_ids=ids, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, **kwargs
                        )
                    times[name].append(t.ms)
            for name, ms in times.items():
                record = {
                    "variant": name + " [alternating]",
                    "group_size": gs,
                    "batch": batch,
                    "ms": statistics.median(ms),
                    "ms_all": [round(x, 1) for x in ms],
                }
                record["tokens_per_s"] = batch * args.gen_tokens / (record["ms"] / 1e3)
                record["ms_per_step"] = record["ms"] / args.gen_tokens
                log("generate", json.dumps(record))
                RESULTS["generate"].append(record)
    del base, merged, model, models
    free_memory()


# --------------------------------------------------------------------------- issue 14: fused small-batch kernel

LAYER_SHAPES = {"q_proj": (4096, 4096), "gate_proj": (4096, 11008), "down_proj": (11008, 4096)}


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


def bench_us(fn: Callable[[], Any], quick: bool = False) -> float:
    """GPU us per call, do_bench median. Its events enclose the Python launch: under CPU load (run 6 compiled Marlin
    beside the sweep) a kernel shorter than its launch reads as the launch time; graph_us() does not."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median") * 1e3


def graph_us(fn: Callable[[], Any], rep: int = 25) -> float:
    """GPU us per call replayed from a CUDA graph (no launch overhead): the kernel time that decoding with CUDA
    graphs (a compiled static-cache ``generate``) pays; NaN where ``fn`` cannot be captured."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3
    except Exception:  # noqa: BLE001 - e.g. a kernel that synchronizes
        torch.cuda.synchronize()
        return float("nan")


def graph_us_each(call: Callable[[Any], Any], items: list) -> float:
    """``graph_us`` of ``call(item)`` for every item in turn, per call. Each item holds its own weights and together
    they exceed the L2 cache (H200: 50 MB), so every call reads its weights from HBM, as a decoding step does;
    repeating one 4096x4096 layer (9 MB) would time it from L2."""
    return graph_us(lambda: [call(item) for item in items]) / len(items)


def hbm_copies(layer: torch.nn.Module, min_bytes: int = 128 << 20) -> list[torch.nn.Module]:
    """``layer`` and enough deep copies of it that their tensors total ``min_bytes`` (beyond any L2 cache)."""
    size = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    return [layer] + [copy.deepcopy(layer) for _ in range(max(0, -(-min_bytes // size) - 1))]


def tinygemm_operands(codes: torch.Tensor, layer, group_size: int):
    """torch's CUDA int4 kernel (tinygemm): w = (q - 8) * scale + offset, bf16 scales and offsets."""
    n = codes.shape[1]
    packed_u8 = (codes.t()[:, ::2] << 4 | codes.t()[:, 1::2]).to(torch.uint8).contiguous()  # (n, k/2), even k high
    packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
    scales = layer.scales.float()
    offsets = scales * (8 - layer.zeros)
    return packed, torch.stack([scales, offsets], -1).to(torch.bfloat16).contiguous(), n


def tile_grid(rows: int, grid: str = "wide") -> list[dict]:
    """The fused kernel's tiles tried at ``rows`` (1, 16 or 64; other row counts are timed with the default tile).

    ``wide``: one-row fp32 multiply-adds (BLOCK_M 1) and tensor-core tiles over tile widths, K blocks per
    iteration, splits and warps (run 8's sweep). ``focus``: around run 8's best, wider tiles and splits, 8 warps,
    the one-row sum per K block, and 64-row (wgmma) tiles for 16 rows.
    """

    def tile(bm: int, bn: int, st: int, sk: int, w: int, **extra: Any) -> dict:
        return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "STEPS": st, "SPLIT_K": sk, "num_warps": w, **extra}

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
        if rows == 16:
            return [tile(16, bn, 1, sk, w) for bn in (128, 256) for sk in (4, 8, 16) for w in (4, 8)] + [
                tile(64, bn, 1, sk, 4) for bn in (64, 128) for sk in (4, 8)
            ]
        return [tile(64, bn, st, sk, w) for bn in (64, 128) for st in (1,) for sk in (2, 4, 8) for w in (4, 8)]
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
    from peft_qalora.kernels import fused_float_zero as fz

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
        for rows in (1, 4, 16, 32, 64):
            x = torch.randn(rows, k, device=args.device, dtype=dtype)
            default = fz._pick_config(rows, k, n, 128, fz._multiprocessors(0))
            default_us = graph_us_each(lambda m: float_zero_gemm(m, x), copies)
            best = (default_us, default)
            for config in tile_grid(rows, args.tile_grid) if rows in (1, 16, 64) else []:
                try:
                    us = graph_us_each(lambda m: float_zero_gemm(m, x, config), copies)
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for a tile
                    log("tile error", config, str(exc)[:200])
                    continue
                RESULTS.setdefault("tiles", []).append({"layer": name, "rows": rows, "config": config, "graph_us": us})
                if best is None or not us >= best[0]:  # NaN never wins
                    best = (us, config)
            # the same best tile with the codes converted (int -> float) instead of built from their bits
            convert = dict(best[1], CODE_BITS=0, CODE_OFFSET=0.0, FOLD_OFFSET=False, SPLIT_K=best[1]["SPLIT_K"])
            convert_us = (
                graph_us_each(lambda m: float_zero_gemm(m, x, convert), copies) if best[1]["BLOCK_M"] > 1 else None
            )
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


@torch.no_grad()
def run_layers(args: argparse.Namespace, config: dict, tmp: str) -> None:
    """q/gate/down at 1/16/4096 rows: Marlin, the other GPTQ kernels, the merged layer's paths.

    The checkpoint has ``--layers`` decoder layers and every figure is per call, cycling through that projection of
    all of them: with 8 layers the weights exceed the L2 cache, so they are read from HBM as in decoding.
    """
    import peft

    import peft_qalora
    from peft_qalora.kernels import dequantize_float_zeros, float_zero_gemm

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
        for rows in (1, 16, 4096):
            x = xs[(short, rows)]
            candidates = {}
            for backend, model in bases.items():
                base = every_layer(model, short)
                candidates[f"GPTQ base, {type(base[0]).__name__} (`{backend}`)"] = (lambda m: m(x), base)
            candidates["merged, dispatch (FloatZeroGPTQLinear.forward)"] = (lambda m: m(x), merged)
            candidates["merged, fused kernel"] = (lambda m: float_zero_gemm(m, x, max_rows=None), merged)
            candidates["merged, Triton dequantize + cuBLAS"] = (lambda m: x @ dequantize_float_zeros(m, dtype), merged)
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


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
    }


@torch.no_grad()
def run_serve(args: argparse.Namespace, config: dict, tmp: str) -> None:
    """Generation tokens/s, eager and with a static cache (compiled by transformers), the models interleaved."""
    import peft
    import torch._dynamo

    import peft_qalora

    torch._dynamo.config.cache_size_limit = 64
    gs = args.gen_group_sizes[0]
    path = os.path.join(tmp, f"serve-g{gs}")
    write_random_gptq(path, config, 4, gs, args.device)
    wanted = set(args.serve_models)
    models: dict[str, torch.nn.Module] = {}
    if "marlin" in wanted:
        models[SERVE_MODELS["marlin"]] = load_gptq(path, "gptq_marlin", args)
    adapter_config = peft_qalora.QALoraConfig(r=args.r, lora_alpha=args.r, target_modules=PROJECTIONS)
    unmerged = None
    if wanted & {"merged", "unmerged"}:
        unmerged = peft.get_peft_model(load_gptq(path, "gptq_triton", args), adapter_config)
        randomize_adapter(unmerged)  # seeded: the merged model below folds the same adapter
        if "unmerged" in wanted:
            models[SERVE_MODELS["unmerged"]] = unmerged
    if "merged" in wanted:
        merge_source = peft.get_peft_model(load_gptq(path, "gptq_triton", args), adapter_config)
        randomize_adapter(merge_source)
        models[SERVE_MODELS["merged"]] = merge_source.merge_and_unload()
        del merge_source
    if "bf16" in wanted:
        models[SERVE_MODELS["bf16"]] = bf16_model(config, args)
    for m in models.values():
        m.eval()
    RESULTS["checks"].append({"serve_classes": {k: kernel_classes(m) for k, m in models.items()}})
    if unmerged is not None and "merged" in wanted:
        ids_probe = torch.randint(3, args.vocab_size, (2, 32), device=args.device)
        RESULTS["checks"].append(
            {
                "serve_merged_vs_unmerged_logits_rel": rel(
                    logits(models[SERVE_MODELS["merged"]], ids_probe), logits(unmerged.eval(), ids_probe)
                )
            }
        )
    if "unmerged" not in wanted:
        del unmerged
        free_memory()
    for mode in args.serve_modes:
        for batch in args.gen_batches:
            ids = torch.randint(3, args.vocab_size, (batch, args.prompt_len), device=args.device)
            kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
            if mode == "static":
                kwargs["cache_implementation"] = "static"
            compiled = {}
            for name, m in models.items():
                before = dynamo_counts()
                started = time.perf_counter()
                try:
                    # the timed length: a static cache of another length is a new shape (a recompile, measured:
                    # 109 s inside the first timed run); twice for static: compile, then capture the CUDA graphs
                    for _ in range(2 if mode == "static" else 1):
                        m.generate(
                            input_ids=ids, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, **kwargs
                        )
                    after = dynamo_counts()
                    compiled[name] = {k: after[k] - before[k] for k in after}
                    compiled[name]["warmup_s"] = round(time.perf_counter() - started, 1)
                except Exception as exc:  # noqa: BLE001
                    compiled[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                log("warm", mode, batch, name, compiled[name])
            times: dict[str, list[float]] = {name: [] for name in models if "error" not in compiled[name]}
            names = list(times)
            for rep in range(args.gen_repeats if names else 0):  # none left when every warm-up failed
                for name in names[rep % len(names) :] + names[: rep % len(names)]:
                    with Timer(args.device) as t:
                        out = models[name].generate(
                            input_ids=ids, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, **kwargs
                        )
                    assert out.shape[1] == args.prompt_len + args.gen_tokens, out.shape
                    times[name].append(t.ms)
            for name in models:
                record: dict[str, Any] = {"model": name, "mode": mode, "batch": batch, **compiled[name]}
                if name in times:
                    record["ms"] = statistics.median(times[name])
                    record["ms_all"] = [round(x, 1) for x in times[name]]
                    record["tokens_per_s"] = batch * args.gen_tokens / (record["ms"] / 1e3)
                log("serve", json.dumps(record))
                RESULTS.setdefault("serve", []).append(record)
                dump(args)
    del models
    free_memory()


# ---------------------------------------------------------------------------------------------------------- main


def run_gptq_variants(args: argparse.Namespace, path: str, gs: int, phases: set[str]) -> None:
    import peft

    import peft_qalora
    from peft_qalora import kernels

    want_gen = "generate" in phases and gs in args.gen_group_sizes
    want_train = "train" in phases
    started = time.perf_counter()
    model = load_gptq(path, args.backend, args)
    RESULTS["checks"].append(
        {
            "group_size": gs,
            "load_s": round(time.perf_counter() - started, 1),
            "classes": kernel_classes(model),
            "backend": args.backend,
        }
    )
    log("loaded", RESULTS["checks"][-1])
    if want_gen:
        generate_variant("gptq base", model, args, gs)
    config = peft_qalora.QALoraConfig(r=args.r, lora_alpha=args.r, target_modules=PROJECTIONS)
    model = peft.get_peft_model(model, config)
    if want_train:
        from peft_qalora import layer as qalora_layer

        def paths(recompute: bool, half_fast_path: bool) -> Callable[[], None]:
            def setup() -> None:
                kernels.set_recompute(recompute)
                qalora_layer._HALF_INPUT_FAST_PATH = half_fast_path

            return setup

        train_variant("qalora", model, args, gs, setup=paths(True, True))
        train_variant("qalora, fp32 adapter tensors", model, args, gs, setup=paths(True, False))
        train_variant(
            "qalora, GPTQModel backward + fp32 adapter tensors (before)", model, args, gs, setup=paths(False, False)
        )
        paths(True, True)()
    if want_gen:
        randomize_adapter(model)
        ids = torch.randint(3, args.vocab_size, (2, 128), device=args.device)
        ref = logits(model, ids)
        with model.disable_adapter():
            base_effect = rel(logits(model, ids), ref)
        generate_variant("gptq + adapter (unmerged)", model, args, gs)
        merged = model.merge_and_unload()
        with float_zero_path(triton=False):
            out = logits(merged, ids)
        with float_zero_path(triton=True):
            out_triton = logits(merged, ids)
        RESULTS["checks"].append(
            {
                "group_size": gs,
                "merged_vs_unmerged_logits_rel": rel(out, ref),
                "merged_triton_vs_unmerged_logits_rel": rel(out_triton, ref),
                "merged_triton_vs_merged_torch_rel": rel(out_triton, out),
                "adapter_effect_base_vs_unmerged_logits_rel": base_effect,
            }
        )
        log("check", RESULTS["checks"][-1])
        with float_zero_path(triton=False):
            generate_variant("merged (torch fp32 dequantize)", merged, args, gs)
        with float_zero_path(triton=True):
            generate_variant("merged (Triton dequantize)", merged, args, gs)
        del merged
    del model
    free_memory()
    if want_train:
        model = load_gptq(path, args.backend, args)
        config = peft.LoraConfig(
            r=args.r, lora_alpha=args.r, use_qalora=True, qalora_group_size=gs, target_modules=PROJECTIONS
        )
        model = peft.get_peft_model(model, config)
        train_variant("peft use_qalora", model, args, gs)
        del model
        free_memory()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):
        import logging

        for noisy in ("gptqmodel", "transformers", "optimum", "peft"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        import gptqmodel  # noqa: F401
        import peft

        import peft_qalora  # noqa: F401
    if args.kernel_worker:
        kernel_worker(args)
        return
    torch.manual_seed(0)
    RESULTS["versions"] = versions()
    RESULTS["args"] = vars(args)
    log("versions", json.dumps(RESULTS["versions"]))
    phases = set(args.phases)
    t0 = time.perf_counter()
    if "kernels" in phases:
        run_kernels(args, [a for a in argv if a != "--kernel-worker"])
        RESULTS["phase_seconds"]["kernels"] = round(time.perf_counter() - t0, 1)
        dump(args)
    config = llama_config(args, args.layers)
    if "genpair" in phases:
        with tempfile.TemporaryDirectory(prefix="qalora-gpu-") as tmp:
            run_genpair(args, config, tmp)
        RESULTS["phase_seconds"]["genpair"] = round(time.perf_counter() - t0, 1)
        dump(args)
    for phase, runner in (("tiles", None), ("layers", run_layers), ("serve", run_serve)):
        if phase not in phases:
            continue
        t1 = time.perf_counter()
        if runner is None:
            run_tiles(args)
        else:
            with tempfile.TemporaryDirectory(prefix="qalora-gpu-") as tmp:
                runner(args, config, tmp)
        RESULTS["phase_seconds"][phase] = round(time.perf_counter() - t1, 1)
        dump(args)
    if "decode" in phases:
        with tempfile.TemporaryDirectory(prefix="qalora-gpu-") as tmp:
            run_decode(args, config, tmp)
        RESULTS["phase_seconds"]["decode"] = round(time.perf_counter() - t0, 1)
        dump(args)
    if phases & {"train", "generate"}:
        t1 = time.perf_counter()
        model = bf16_model(config, args)
        if "generate" in phases:
            generate_variant("bf16", model, args, None)
        if "train" in phases:
            model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=args.r, target_modules=PROJECTIONS))
            train_variant("lora bf16", model, args, None)
        del model
        free_memory()
        RESULTS["phase_seconds"]["bf16"] = round(time.perf_counter() - t1, 1)
        dump(args)
        with tempfile.TemporaryDirectory(prefix="qalora-gpu-") as tmp:
            for gs in args.group_sizes:
                if "train" not in phases and gs not in args.gen_group_sizes:
                    continue
                t1 = time.perf_counter()
                path = os.path.join(tmp, f"g{gs}")
                gb = write_random_gptq(path, config, 4, gs, args.device)
                RESULTS["checks"].append(
                    {"group_size": gs, "checkpoint_gb": round(gb, 2), "write_s": round(time.perf_counter() - t1, 1)}
                )
                log("wrote", RESULTS["checks"][-1])
                run_gptq_variants(args, path, gs, phases)
                RESULTS["phase_seconds"][f"gptq g{gs}"] = round(time.perf_counter() - t1, 1)
                dump(args)
                import shutil

                shutil.rmtree(path, ignore_errors=True)
    RESULTS["phase_seconds"]["total"] = round(time.perf_counter() - t0, 1)
    dump(args)
    table = render(args)
    print(table)
    with open(os.path.join(args.out, "gpu_results.md"), "w") as f:
        f.write(table + "\n")


def dump(args: argparse.Namespace) -> None:
    with open(os.path.join(args.out, "gpu_results.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def render_issue14() -> list[str]:
    """Tables of the tiles, layers and serve phases."""
    lines: list[str] = []
    if RESULTS.get("exactness"):
        lines += [
            "**Fused kernel exactness** (relative error; fp64 reference built from the codes, scales and fp32 "
            "zeros; the torch path rounds the weight to the activation dtype)",
            "",
            "| layer | rows | dtype | fused vs fp64 | torch path vs fp64 | fused vs torch path | rounding of the exact output |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in RESULTS["exactness"]:
            lines.append(
                f"| {r['layer']} | {r['rows']} | {r.get('dtype', 'bfloat16')} | {r['fused_vs_fp64']:.2e} "
                f"| {r['torch_path_vs_fp64']:.2e} | {r['fused_vs_torch_path']:.2e} "
                f"| {r.get('output_rounding', r.get('bf16_output_rounding')):.2e} |"
            )
        lines.append("")
    if RESULTS.get("tile_best"):
        lines += [
            "**Fused kernel tiles** (GPU us per call from CUDA-graph replays; best of the sweep vs the default)",
            "",
            "| layer | rows | default us | default | best us | best | best tile, codes converted |",
            "|---|---|---|---|---|---|---|",
        ]

        def short(c: dict) -> str:
            each = " sum each block" if c.get("ROW_SUM_EACH_BLOCK") else ""
            return (
                "M{BLOCK_M} N{BLOCK_N} K{BLOCK_K}x{STEPS} split{SPLIT_K} w{w}".format(w=c.get("num_warps"), **c) + each
            )

        for r in RESULTS["tile_best"]:
            lines.append(
                f"| {r['layer']} | {r['rows']} | {r['default_us']:.1f} | {short(r['default'])} "
                f"| {r['best_us']:.1f} | {short(r['best'])} | {_fmt(r.get('best_converting_codes_us'), '.1f')} |"
            )
        lines.append("")
    if RESULTS.get("crossover"):
        lines += [
            "**Fused kernel vs dequantize + cuBLAS by rows** (GPU us)",
            "",
            "| layer | rows | fused | dequantize + cuBLAS |",
            "|---|---|---|---|",
        ]
        for r in RESULTS["crossover"]:
            lines.append(f"| {r['layer']} | {r['rows']} | {r['fused_us']:.1f} | {r['dequant_cublas_us']:.1f} |")
        lines.append("")
    if RESULTS.get("tinygemm"):
        lines += [
            "**torch `_weight_int4pack_mm` (tinygemm; bf16 scales and offsets)**",
            "",
            "| layer | rows | GPU us | vs fp64 | fused vs fp64 |",
            "|---|---|---|---|---|",
        ]
        for r in RESULTS["tinygemm"]:
            if "error" in r:
                lines.append(f"| {r['layer']} | - | {r['error'][:100]} | | |")
                continue
            lines.append(
                f"| {r['layer']} | {r['rows']} | {r['gpu_us']:.1f} | {r['vs_fp64']:.2e} "
                f"| {_fmt(r['fused_vs_fp64'], '.2e')} |"
            )
        lines.append("")
    if RESULTS.get("layers"):
        lines += [
            "**One layer** (bf16, no grad; graph us = GPU time per call from CUDA-graph replays cycling through "
            "the projection of every decoder layer, weights read from HBM; GPU us = triton do_bench median of one "
            "layer, Python launch included where it is longer than the kernel; loop us = wall time per call in "
            "a loop, CPU dispatch included; errors: merged output vs the fp32-dequantized merged weight in fp64, "
            "and vs the unmerged adapter layer)",
            "",
            "| layer | rows | kernel | GPU us | graph us | loop us | vs fp64 | vs unmerged |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in RESULTS["layers"]:
            if "error" in r:
                lines.append(f"| {r['layer']} | {r['rows']} | {r['variant']} | {r['error'][:80]} | | | | |")
                continue
            lines.append(
                f"| {r['layer']} {r.get('shape', '')} | {r['rows']} | {r['variant']} | {r['gpu_us']:.1f} "
                f"| {_fmt(r.get('graph_us'), '.1f')} | {r['loop_us']:.1f} | {_fmt(r.get('vs_fp32_dequant_fp64_matmul'), '.1e')} "
                f"| {_fmt(r.get('vs_unmerged'), '.1e')} |"
            )
        lines.append("")
    if RESULTS.get("serve"):
        lines += [
            "**Generation** (greedy, 64-token prompt, 64 new tokens, median of 3 interleaved; static = "
            '`cache_implementation="static"`, which transformers compiles where the quantizer allows)',
            "",
            "| model | mode | batch | tokens/s | graphs | graph breaks |",
            "|---|---|---|---|---|---|",
        ]
        for r in RESULTS["serve"]:
            tps = _fmt(r.get("tokens_per_s"), ".1f") if "error" not in r else r["error"][:80]
            lines.append(
                f"| {r['model']} | {r['mode']} | {r['batch']} | {tps} | {r.get('unique_graphs', '-')} "
                f"| {r.get('graph_breaks', '-')} |"
            )
        lines.append("")
    return lines


def _fmt(x: Any, spec: str = ".0f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x)) else "-"


def render(args: argparse.Namespace) -> str:
    v = RESULTS.get("versions", {})
    lines = [
        f"GPU: {v.get('gpu')} ({v.get('gpu_memory_gib')} GiB); torch {v.get('torch')} (CUDA {v.get('cuda')}), "
        f"triton {v.get('triton')}, transformers {v.get('transformers')}, peft {v.get('peft')}, "
        f"optimum {v.get('optimum')}, gptqmodel {v.get('gptqmodel')}.",
        f"Model: Llama-2-7B shapes (hidden {args.hidden_size}, intermediate {args.intermediate_size}, "
        f"{args.heads} heads, vocab {args.vocab_size}), {args.layers} decoder layers (7B has 32), random 4-bit sym "
        f"GPTQ, {args.dtype} activations, GPTQModel backend `{args.backend}`, r={args.r} on all 7 projections.",
        "",
    ]
    train = RESULTS["train"]
    if train:
        lines += [
            "**Training** (forward + loss + backward + AdamW; median of "
            f"{args.steps} steps after {args.warmup} warm-up; peak = max_memory_allocated over the timed steps)",
            "",
            "| variant | group | seq x batch | step ms | tokens/s | vs LoRA bf16 | vs PEFT use_qalora | peak GiB "
            "| peak vs LoRA bf16 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lora = {(r["seq"], r["batch"]): r for r in train if r["variant"] == "lora bf16"}
        peftq = {(r["group_size"], r["seq"], r["batch"]): r for r in train if r["variant"] == "peft use_qalora"}
        for r in train:
            key = (r["seq"], r["batch"])
            base, pq = lora.get(key, {}), peftq.get((r["group_size"],) + key, {})
            if "error" in r:
                lines.append(
                    f"| {r['variant']} | {r['group_size'] or '-'} | {r['seq']} x {r['batch']} | "
                    f"{r['error'][:60]} | | | | | |"
                )
                continue

            def ratio(a, b):
                return f"{a / b:.2f}x" if a and b else "-"

            lines.append(
                f"| {r['variant']} | {r['group_size'] or '-'} | {r['seq']} x {r['batch']} | {r['step_ms']:.1f} "
                f"| {r['tokens_per_s']:.0f} | {ratio(r['tokens_per_s'], base.get('tokens_per_s'))} "
                f"| {ratio(r['tokens_per_s'], pq.get('tokens_per_s'))} | {_fmt(r.get('peak_gib'), '.2f')} "
                f"| {ratio(r.get('peak_gib'), base.get('peak_gib'))} |"
            )
        lines.append("")
    gen = RESULTS["generate"]
    if gen:
        lines += [
            f"**Generation** (greedy, prompt {args.prompt_len}, {args.gen_tokens} new tokens, KV cache, median of "
            f"{args.gen_repeats})",
            "",
            "| model | group | batch | tokens/s | ms per step | vs GPTQ base |",
            "|---|---|---|---|---|---|",
        ]
        basegen = {
            (r["group_size"], r["batch"], r["variant"].endswith("[alternating]")): r
            for r in gen
            if r["variant"].startswith("gptq base")
        }
        for r in gen:
            if "error" in r:
                lines.append(f"| {r['variant']} | {r['group_size'] or '-'} | {r['batch']} | {r['error'][:80]} | | |")
                continue
            key = (r["group_size"], r["batch"], r["variant"].endswith("[alternating]"))
            b = basegen.get(key, {}) if r["group_size"] else {}
            ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.3f}x" if b.get("tokens_per_s") else "-"
            lines.append(
                f"| {r['variant']} | {r['group_size'] or '-'} | {r['batch']} | {r['tokens_per_s']:.1f} "
                f"| {r['ms_per_step']:.2f} | {ratio} |"
            )
        lines.append("")
    if RESULTS["kernels"]:
        lines += [
            "**GPTQModel kernels on this GPU** (relative error vs the fp64 dequantized reference; `no grad` = the "
            "output has no gradient; QA-LoRA columns: max over forward, input, A and B gradients)",
            "",
            "| backend | group | class | train fwd / grad | eval fwd / grad | QA-LoRA (dequantize-again) "
            "| QA-LoRA (stock) |",
            "|---|---|---|---|---|---|---|",
        ]
        for k in RESULTS["kernels"]:
            if "backend" not in k:
                lines.append(
                    f"| auto-select | {k.get('group_size', '-')} | "
                    f"{k.get('auto_select', k.get('auto_select_error', ''))[:80]} (trainable: "
                    f"{k.get('auto_trainable_select', '-')}) | | | | |"
                )
                continue
            if "error" in k:
                lines.append(f"| {k['backend']} | {k['group_size']} | {k['error'][:90]} | | | | |")
                continue

            def mode(m: str) -> str:
                parts = []
                for proj in ("q_proj", "down_proj"):
                    d = k.get(proj, {})
                    if f"{m}_error" in d:
                        parts.append(d[f"{m}_error"][:40])
                        continue
                    grad = d.get(f"{m}_grad")
                    parts.append(
                        f"{_fmt(d.get(f'{m}_fwd'), '.1e')} / {grad if isinstance(grad, str) else _fmt(grad, '.1e')}"
                    )
                return "; ".join(parts)

            def qalora(tag: str) -> str:
                d = k.get("qalora_down_proj", {}).get(tag)
                if isinstance(d, dict):
                    return _fmt(max(d.values()), ".1e")
                return (d or "-")[:60]

            lines.append(
                f"| {k['backend']} | {k['group_size']} | {', '.join(k.get('classes', []))} | {mode('train')} "
                f"| {mode('eval')} | {qalora('recompute')} | {qalora('stock')} |"
            )
        lines.append("")
    lines += render_issue14()
    if RESULTS.get("layers") and "decode" in args.phases:
        lines += [
            "**One layer, bf16, no grad** (GPU us = triton do_bench median; loop us = wall time per call in a "
            "back-to-back loop, CPU dispatch included)",
            "",
            "| layer | rows | variant | GPU us | loop us |",
            "|---|---|---|---|---|",
        ]
        for r in RESULTS["layers"]:
            if "error" in r:
                lines.append(f"| {r['layer']} | {r['rows']} | {r['variant']} | {r['error'][:60]} | |")
                continue
            lines.append(
                f"| {r['layer']} {r['shape']} | {r['rows']} | {r['variant']} | {r['gpu_us']:.1f} | {r['loop_us']:.1f} |"
            )
        lines.append("")
    for c in RESULTS["checks"]:
        lines.append("check: " + json.dumps(c, default=str))
    lines.append("phase seconds: " + json.dumps(RESULTS["phase_seconds"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
