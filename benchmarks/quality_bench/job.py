# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The job: ``run`` prepares the ``Setup``, writes the table's context line, scores the fp32 model, and for each
``--bits`` scores the GPTQ base and then runs the QA-LoRA rows, PEFT's built-in row and the usual route's rows that
``--rows`` asks for, all into one ``Results``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import finetune_merge_export as example
import torch

from .cli import LORA_ROWS, PEFT_QALORA_BITS, QALORA_ROWS
from .common import PROJECTIONS, free, load_dense, logger, prepare, quiet_stdout, score
from .peft_use_qalora import run_peft_qalora
from .qalora import run_qalora
from .results import Results, Row
from .usual_route import run_usual_route


def run(args: argparse.Namespace, argv: list[str], work: Path) -> Results:
    results = Results(args, argv)
    setup = prepare(args, work)
    wanted = set(args.rows)
    results.context = [
        (
            f"Model: {setup.source.name}; GPTQ group size {args.group_size}, no act-order, calibrated on "
            f"{len(setup.calibration)} x {args.seq_len} training tokens. Every trained row: {args.steps} steps x "
            f"{args.batch_size} x {args.seq_len} tokens of {args.data.name}, constant lr {args.lr}, AdamW, "
            f"r = alpha = {args.r} on {', '.join(PROJECTIONS)}, seed {args.seed}. Perplexity: "
            f"{setup.eval_blocks.numel():,} tokens of "
            f"{args.eval_data.name} (never trained on), in blocks of {args.seq_len}. Device {setup.device}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads."
        ),
    ]
    logger.info(
        "Training on %s (%s blocks of %d), scoring %s tokens of %s",
        args.data.name,
        f"{len(setup.train_blocks):,}",
        args.seq_len,
        f"{setup.eval_blocks.numel():,}",
        args.eval_data.name,
    )
    if "fp32" in wanted:
        model = load_dense(setup.dense_dir, setup.device)
        results.add(Row(None, "fp32", "fp32 base, not quantized", score(model, setup, args, "fp32 base")))
        del model
        free()
    steps: list[tuple[str, Callable[..., None]]] = [("qalora", run_qalora), ("peft-qalora", run_peft_qalora)]
    steps.append(("lora", run_usual_route))
    for bits in args.bits:
        with quiet_stdout():
            base_dir = setup.base_dir(bits, args.group_size)
        model = example.load_gptq_model(base_dir, bits, setup.device)
        results.add(
            Row(
                bits,
                "gptq",
                f"GPTQ {bits}-bit base (g{args.group_size})",
                score(model, setup, args, f"{bits}-bit GPTQ base"),
            )
        )
        del model
        free()
        if wanted & set(QALORA_ROWS):
            run_qalora(bits, base_dir, setup, args, results)
        if "peft-qalora" in wanted and bits == PEFT_QALORA_BITS:
            run_peft_qalora(bits, base_dir, setup, args, results)
        if wanted & set(LORA_ROWS):
            run_usual_route(bits, base_dir, setup, args, results)
    return results
