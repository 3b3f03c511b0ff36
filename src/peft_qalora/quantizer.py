# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Loading merged checkpoints (GPTQ layout, real-valued zero points) with ``AutoModelForCausalLM.from_pretrained``.

A merged checkpoint's ``config.json`` carries ``quantization_config.quant_method = "peft_qalora"``. Its own label
matters: a loader that knows only integer zero points must refuse the checkpoint rather than silently drop the
adapter. ``import peft_qalora`` registers this config and quantizer with transformers, which then swaps in
:class:`FloatZeroGPTQLinear` layers before the weights are loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .float_zero_linear import FloatZeroGPTQLinear

QUANT_METHOD = "peft_qalora"
FLOAT_ZERO_FORMAT = "gptq_float_zeros"


class QALoraGPTQConfig(QuantizationConfigMixin):
    """Quantization config of a merged QA-LoRA checkpoint: GPTQ codes and scales with fp32 zero points.

    Args:
        bits: GPTQ bits of the codes.
        group_size: GPTQ group size (``-1``: one group per row).
        desc_act: Whether the base used act-order (``g_idx`` is then a permutation of groups).
        sym: Whether the base was quantized symmetrically (informational: zeros are stored explicitly).
        modules: Names of the modules stored as float-zero GPTQ layers.
        format: The tensor layout; ``"gptq_float_zeros"``.
        base_checkpoint_format: The zero-point format of the GPTQ checkpoint it was merged from.
    """

    def __init__(
        self,
        bits: int,
        group_size: int,
        desc_act: bool = False,
        sym: bool = True,
        modules: list[str] | None = None,
        format: str = FLOAT_ZERO_FORMAT,
        base_checkpoint_format: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.format = format
        self.bits = bits
        self.group_size = group_size
        self.desc_act = desc_act
        self.sym = sym
        self.modules = sorted(modules or [])
        self.base_checkpoint_format = base_checkpoint_format
        if format != FLOAT_ZERO_FORMAT:
            raise ValueError(f"Unknown {QUANT_METHOD} format {format!r}; this version reads {FLOAT_ZERO_FORMAT!r}.")


class QALoraGPTQHfQuantizer(HfQuantizer):
    """Replaces the listed linear layers by float-zero GPTQ layers before the checkpoint's tensors are loaded."""

    requires_calibration = True  # merged checkpoints are loaded, never produced by quantizing on the fly
    quantization_config: QALoraGPTQConfig

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        missing = [name for name in self.quantization_config.modules if not _has_module(model, name)]
        if missing:
            raise ValueError(
                f"The {QUANT_METHOD} checkpoint lists modules this model does not have: {missing[:5]}; its config.json "
                "and weights do not belong to this architecture."
            )
        for name in self.quantization_config.modules:
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child_name)
            with torch.device(linear.weight.device):
                layer = FloatZeroGPTQLinear(
                    bits=self.quantization_config.bits,
                    group_size=self.quantization_config.group_size,
                    in_features=linear.in_features,
                    out_features=linear.out_features,
                    bias=linear.bias is not None,
                )
            setattr(parent, child_name, layer)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        # Every op of FloatZeroGPTQLinear traces (the fused kernel is a registered custom op), so transformers may
        # compile the decoding step with a static cache, as it does for unquantized models.
        return True


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def register_with_transformers() -> None:
    """Make ``from_pretrained`` load ``peft_qalora`` checkpoints; a second call registers nothing twice."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QALoraGPTQConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QALoraGPTQHfQuantizer)
