# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The ``marlin-warmup`` phase: load a one-layer GPTQ model on Marlin in fp16 and in bf16 and run it once, so that
GPTQModel JIT-compiles Marlin's extension for both dtypes (285-323 s on a fresh H200 machine, into
``~/.cache/gptqmodel/torch_extensions``). Start it in the background, in its own process, beside a phase that does
not time Marlin (``tiles`` times CUDA-graph replays, which the compile's CPU load does not move), and wait for it
before ``layers`` or ``serve``::

    python3 benchmarks/gpu.py --phases marlin-warmup --out $OUT/warm > $OUT/warm.log 2>&1 & WARM=$!
    python3 benchmarks/gpu.py --phases tiles --tile-grid focus --out $OUT/tiles
    wait $WARM
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from .checkpoints import llama_config, load_gptq, write_random_gptq
from .common import RESULTS, free_memory, log


@torch.no_grad()
def run_marlin_warmup(args: argparse.Namespace, config: dict, tmp: str) -> None:
    """Compile Marlin for ``--warmup-dtypes`` (one forward each on a one-layer checkpoint); record the seconds."""
    del config  # one layer is enough, whatever --layers says
    path = os.path.join(tmp, "marlin-warmup")
    write_random_gptq(path, llama_config(args, 1), 4, args.gen_group_sizes[0], args.device)
    for dtype in args.warmup_dtypes:
        started = time.perf_counter()
        record: dict = {"marlin_warmup": dtype}
        try:
            model = load_gptq(path, "gptq_marlin", argparse.Namespace(**{**vars(args), "dtype": dtype}))
            model(input_ids=torch.ones(1, 4, dtype=torch.long, device=args.device))
            torch.cuda.synchronize()
            del model
            free_memory()
        except Exception as exc:  # noqa: BLE001
            record["error"] = f"{type(exc).__name__}: {exc}"[:300]
        record["seconds"] = round(time.perf_counter() - started, 1)
        RESULTS["checks"].append(record)
        log("marlin warm-up", record)
