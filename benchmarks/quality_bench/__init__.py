# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The code of the quality benchmark that ``benchmarks/quality.py`` runs, one concept per module: ``cli`` (the
flags and the row names they choose among), ``results`` (the table: ``Row``, ``Results``, ``skipped``), ``common``
(what every row shares: the model, texts and GPTQ bases of ``Setup``, training, scoring, loading and freeing models),
``qalora`` (QA-LoRA's one training run per bit width and its unmerged, merged float, bf16 and integer rows),
``qalora_export`` (its GGUF and MLX rows), ``peft_use_qalora`` (PEFT's built-in ``use_qalora`` row), ``usual_route``
(LoRA on the GPTQ base, merged into the dequantized weights, quantized again) and ``job`` (``run``: every row of every
bit width, in order). Importing the package puts ``examples/`` on ``sys.path`` and imports the example
(``examples/finetune_merge_export.py``, which the modules import as ``example``) before any module imports torch:
the example sets ``TORCHDYNAMO_DISABLE``, ``GPTQMODEL_CPU_WORKERS``, ... first thing.
"""

import sys
from pathlib import Path

# The example before torch: Python runs this file before any module of the package, and nothing here imports torch.
_EXAMPLES = str(Path(__file__).resolve().parent.parent.parent / "examples")
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)
import finetune_merge_export as example  # noqa: E402, F401
