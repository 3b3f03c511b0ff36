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
- ``marlin-warmup``, ``tiles``, ``layers``, ``serve`` (issue 14, the merged model at decoding sizes): compile Marlin
  for fp16 and bf16 (run it in the background); the fused kernel's exactness and tile sweep; each projection through
  Marlin and the merged layer's paths (fused, dequantize + cuBLAS, tinygemm); generation eager and with a static
  cache, side by side. ``benchmarks/results/gpu.md`` has the commands and the device session they fit in.

Run on one GPU (on an H100: about 6.5 minutes for the default ``train generate``, 2 minutes for ``genpair``)::

    PYTHONPATH=src python benchmarks/gpu.py --out OUT_DIR --profile qalora "lora bf16" "peft use_qalora"
    PYTHONPATH=src python benchmarks/gpu.py --phases genpair --gen-repeats 5 --out OUT_DIR

The code lives in the ``gpu_bench`` package beside this file, one concept per module: ``cli`` (the flags below),
``common`` (the shared ``RESULTS`` record, logging, versions), ``timing``, ``checkpoints`` (the random GPTQ
checkpoints and the models loaded from them), ``float_zero`` (the merged layer's forward switches), one module per
phase (``kernels_phase``, ``train_generate`` for train and generate, ``genpair``, ``decode``, ``marlin_warmup``,
``tiles``, ``layers``, ``serve``) and ``report`` (the markdown tables). This file is the command: ``main()`` runs the phases in order.

The table is printed last and written to ``--out``/gpu_results.md with the raw numbers in gpu_results.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers 5.25 swaps in kernels from the Hub by default (`kernels`): none can be fetched offline, and the figures
# compare the projections' kernels, so every model keeps transformers' own layers
os.environ.setdefault("USE_HUB_KERNELS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the gpu_bench package beside this file

import torch
from gpu_bench.checkpoints import bf16_model, llama_config, write_random_gptq
from gpu_bench.cli import PROJECTIONS, parse_args
from gpu_bench.common import RESULTS, dump, free_memory, log, versions
from gpu_bench.decode import run_decode
from gpu_bench.genpair import run_genpair
from gpu_bench.kernels_phase import kernel_worker, run_kernels
from gpu_bench.layers import run_layers
from gpu_bench.marlin_warmup import run_marlin_warmup
from gpu_bench.report import render
from gpu_bench.serve import run_serve
from gpu_bench.tiles import run_tiles
from gpu_bench.train_generate import generate_variant, run_gptq_variants, train_variant


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
    phase_runners = (
        ("marlin-warmup", run_marlin_warmup),
        ("tiles", None),
        ("layers", run_layers),
        ("serve", run_serve),
    )
    for phase, runner in phase_runners:
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


if __name__ == "__main__":
    main()
