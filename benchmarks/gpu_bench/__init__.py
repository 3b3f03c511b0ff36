# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The code of the GPU benchmark that ``benchmarks/gpu.py`` runs, one concept per module: ``cli`` (the flags and the
constants they choose among), ``common`` (the shared ``RESULTS`` record, logging, memory and error helpers),
``timing`` (the timers), ``checkpoints`` (the random GPTQ checkpoints and the models loaded from them),
``float_zero`` (the switches over the merged layer's forward), one module per phase (``kernels_phase``,
``train_generate``, ``genpair``, ``decode``, ``tiles``, ``layers``, ``serve``) and ``report`` (the markdown tables).
"""
