# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Exports of a GPTQ model with its QA-LoRA adapter to llama.cpp (GGUF: merged, or base + LoRA adapter) and MLX."""

from .gguf import GGUFExportReport, export_gguf
from .gguf_lora import GGUFLoraExportReport, export_gguf_lora
from .merged_checkpoint import AffineLayer, MergedCheckpoint, TensorEntry
from .mlx import MLXExportReport, export_mlx

__all__ = [
    "AffineLayer",
    "GGUFExportReport",
    "GGUFLoraExportReport",
    "MLXExportReport",
    "MergedCheckpoint",
    "TensorEntry",
    "export_gguf",
    "export_gguf_lora",
    "export_mlx",
]
