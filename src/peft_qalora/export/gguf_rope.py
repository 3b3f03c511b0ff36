# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""A checkpoint's rope settings as llama.cpp's GGUF metadata, and the ``rope_freqs`` tensor of Llama 3.1 scaling.

Separate from :mod:`.gguf` because it reads only ``config.json``'s rope fields (transformers 4's and 5's) and
decides which rope scaling llama.cpp can run; the export writes what :func:`_rope_settings` returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import gguf
import torch


@dataclass(frozen=True)
class _Rope:
    theta: float
    scaling_type: Optional[gguf.RopeScalingType]
    factor: Optional[float]
    original_context: Optional[int]
    llama3_factors: Optional[torch.Tensor]  # llama.cpp's rope_freqs tensor for Llama 3.1-style scaling


def _rope_settings(config: dict, arch: gguf.MODEL_ARCH) -> _Rope:
    # transformers 5 writes `rope_parameters`; older configs `rope_theta` and `rope_scaling`.
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    theta = float(config.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if kind == "default":
        return _Rope(theta, None, None, None, None)
    if kind == "linear":
        return _Rope(theta, gguf.RopeScalingType.LINEAR, float(params["factor"]), None, None)
    if kind == "yarn":
        original = params.get("original_max_position_embeddings")
        return _Rope(theta, gguf.RopeScalingType.YARN, float(params["factor"]), original, None)
    if kind == "llama3" and arch == gguf.MODEL_ARCH.LLAMA:
        return _Rope(theta, None, None, None, _llama3_rope_factors(params, theta, head_dim))
    raise ValueError(
        f"rope scaling {kind!r} is not supported by the GGUF export (supported: none, linear, yarn, and llama3 for "
        "Llama models)."
    )


def _llama3_rope_factors(params: dict, theta: float, head_dim: int) -> torch.Tensor:
    """Per-frequency divisors for Llama 3.1 rope scaling, computed as llama.cpp's converter does."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_context = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)
