# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Held-out perplexity of QA-LoRA and its merged and exported forms against the usual route, on a real model.

The comparison of the QA-LoRA paper (Xu et al., arXiv 2309.14717, Tables 1-2) on SmolLM2-135M: every trained row
uses the same training text, sequence length, step budget, learning rate, seed and rank, and is scored on text it
never saw. Rows, per GPTQ bit width (``--bits``, default 4 3 2; group size 32, no act-order):

* ``gptq``: the GPTQ base (GPTQModel, calibrated on the training text; cached like the example's);
* ``qalora``: QA-LoRA on the GPTQ base, unmerged;
* ``qalora-float``: merged into float zero points (``merge_and_unload()``), saved and reloaded from disk;
* ``qalora-bf16``: the unmerged adapter and the reloaded merged model, both computing in bf16 (what a GPU runs):
  the merged row's note compares the two;
* ``qalora-int``: merged into integer zero points (``merge_checkpoint(..., zero_format="int")``, rounding forced
  with ``max_rounding_loss=1.0``), reloaded as a stock GPTQ checkpoint; the note gives its merge report;
* ``qalora-int-calibrated``: the calibrated integer merge (``merge_checkpoint(..., zero_format="int",
  calibration=...)``, forced with ``max_rounding_loss=1.0``) on the GPTQ calibration sequences of the training text,
  reloaded as a stock GPTQ checkpoint, one row per ``--calibration-method``; the note gives its merge report (what
  the calibration inputs' layer outputs keep, codes and zero points changed) and its wall time;
* ``qalora-gguf``: exported to GGUF Q4_1 (``export_gguf``), dequantized by gguf-py through transformers;
* ``qalora-mlx``: exported to MLX (``export_mlx``), dequantized with ``mx.dequantize`` into the fp32 model;
* ``peft-qalora`` (4-bit only): PEFT's built-in ``LoraConfig(use_qalora=True)``, unmerged (PEFT cannot merge
  into GPTQ layers);
* ``lora``: the usual route, "QLoRA w/ GPTQ" in the paper: plain LoRA trained on the GPTQ base, unmerged;
* ``lora-fp32``: that LoRA merged into the dequantized fp32 weights (the dense model before re-quantizing);
* ``lora-gptq``: that dense model quantized again with GPTQ (same bits, group size and calibration text as the
  base): what the usual route ships;

plus ``fp32``: the unquantized model. QA-LoRA's rows share one training run per bit width, as do the usual route's.

The default job trains seven adapters for 20 steps each on *Pride and Prejudice*, runs up to six GPTQ quantizations
(three bases, cached for later runs, and the usual route's three re-quantizations) and scores *Persuasion*
(``examples/data``); the table's last line gives its wall time::

    TORCHDYNAMO_DISABLE=1 python benchmarks/quality.py --table benchmarks/results/quality_cpu.md

``--device cuda`` and larger ``--steps`` / ``--seq-len`` / ``--batch-size`` / ``--eval-tokens`` budgets run the same
comparison on a GPU. It reuses the example's functions (model conversion, GPTQ quantization and its cache, training
with ``transformers.Trainer``, perplexity), so both measure the same thing.

The code lives in the ``quality_bench`` package beside this file, one concept per module: ``cli`` (the flags below),
``results`` (the table), ``common`` (the shared setup, training and scoring), ``qalora`` and ``qalora_export`` (QA-LoRA's
rows), ``peft_use_qalora`` (PEFT's built-in row), ``usual_route`` (the usual route's rows) and ``job`` (``run``: the
rows in order). This file is the command: ``main()`` runs the job and prints the table.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

# The example's functions, imported before torch: the example sets TORCHDYNAMO_DISABLE, GPTQMODEL_CPU_WORKERS, ...
# first thing (nothing above imports torch).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the quality_bench package beside this file
import finetune_merge_export as example
from quality_bench.cli import parse_args
from quality_bench.common import configure, logger, quiet_stdout, work_folder
from quality_bench.job import run


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    configure(args.threads)
    with quiet_stdout():
        import gptqmodel  # noqa: F401  (prints a banner on import)
    try:
        with work_folder(args.out, "qalora-quality-") as work:
            results = run(args, argv, work)
    except example.JobError as exc:
        logger.error("%s", exc)
        return 2
    table = results.render()
    print(table)
    if args.table:
        args.table.write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
