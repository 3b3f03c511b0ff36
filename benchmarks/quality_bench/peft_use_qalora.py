# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""PEFT's built-in QA-LoRA row (4-bit only): ``run_peft_qalora`` trains ``LoraConfig(use_qalora=True)`` on the
GPTQ base with the shared budget and scores it unmerged, since PEFT cannot merge into GPTQ layers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import finetune_merge_export as example
from peft import LoraConfig, get_peft_model
from transformers import set_seed

from .common import PROJECTIONS, Setup, free, score, train
from .results import Results, Row


def run_peft_qalora(bits: int, base_dir: Path, setup: Setup, args: argparse.Namespace, results: Results) -> None:
    set_seed(args.seed)
    model = example.load_gptq_model(base_dir, bits, setup.device)
    config = LoraConfig(
        r=args.r,
        lora_alpha=args.r,
        target_modules=PROJECTIONS,
        use_qalora=True,
        qalora_group_size=args.group_size,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    note = train(model, setup, args, f"PEFT use_qalora {bits}-bit")
    ppl = score(model, setup, args, f"{bits}-bit PEFT use_qalora")
    del model
    free()
    results.add(Row(bits, "peft-qalora", "PEFT `use_qalora`, unmerged", ppl, note))
