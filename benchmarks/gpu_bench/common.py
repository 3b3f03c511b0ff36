# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""What every phase shares: the ``RESULTS`` record (one dict, filled in place by the phases and written by ``dump``
to ``--out``/gpu_results.json; import the object and never rebind it), the log line on stderr, freeing GPU memory
between variants, the library versions, and the two comparisons (``rel``, the relative error of two tensors, and
``logits``, a model's fp32 logits).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any

import torch

RESULTS: dict[str, Any] = {"kernels": [], "train": [], "generate": [], "checks": [], "phase_seconds": {}}


def log(*parts: Any) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


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


def dump(args: argparse.Namespace) -> None:
    with open(os.path.join(args.out, "gpu_results.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.float()
