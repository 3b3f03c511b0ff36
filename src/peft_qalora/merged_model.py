# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""What ``merge_and_unload()`` hands back: the folded model relabelled so that ``save_pretrained`` writes it right.

A float merge becomes a ``peft_qalora`` checkpoint (every GPTQ layer a ``FloatZeroGPTQLinear``, the quantization config
and quantizer that reload it); an integer merge stays a GPTQ checkpoint whose zero format and ``sym`` flag match the
zeros it holds.
"""

from __future__ import annotations

from torch import nn

from .float_zero_linear import FloatZeroGPTQLinear
from .gptq import is_gptq_layer
from .merge import read_zero_points
from .quantizer import QALoraGPTQConfig, QALoraGPTQHfQuantizer


def store_float_zeros(model: nn.Module, quantization: dict) -> None:
    """Make every GPTQ layer a float-zero layer and label the model a ``peft_qalora`` checkpoint for saving.

    ``quantization`` is the base's GPTQ settings (``QALoraModel``'s ``base_quantization``).
    """
    checkpoint_format = quantization.get("checkpoint_format")
    for name, module in list(model.named_modules()):
        if is_gptq_layer(module):  # GPTQ layers no adapter touched: same weights, stored the same way
            parent_name, _, child = name.rpartition(".")
            float_layer = FloatZeroGPTQLinear.from_gptq(module, read_zero_points(module, checkpoint_format))
            setattr(model.get_submodule(parent_name), child, float_layer)
    modules = [name for name, module in model.named_modules() if isinstance(module, FloatZeroGPTQLinear)]
    config = QALoraGPTQConfig(
        bits=quantization.get("bits"),
        group_size=quantization.get("group_size"),
        desc_act=quantization.get("desc_act", False),
        sym=quantization.get("sym", True),
        modules=modules,
        base_checkpoint_format=checkpoint_format,
    )
    model.config.quantization_config = config
    model.hf_quantizer = QALoraGPTQHfQuantizer(config, pre_quantized=True)


def relabel_integer_merge(model: nn.Module, quantization: dict) -> None:
    """Label an integer-zero merge so that saving writes zeros and label that agree.

    GPTQModel holds v2 zeros in memory (DESIGN.md, "Traps"), and merged zeros are no longer the symmetric
    midpoint: kernels that assume ``sym=True`` would ignore them.
    """
    quantization_config = model.config.quantization_config
    updates = {"sym": False}
    layer = next((m for m in model.modules() if is_gptq_layer(m)), None)
    checkpoint_format = quantization.get("checkpoint_format")
    if (layer is not None and getattr(layer, "REQUIRES_FORMAT_V2", False)) or checkpoint_format == "gptq_v2":
        updates["format"] = "gptq_v2"
    for key, value in updates.items():
        if isinstance(quantization_config, dict):
            quantization_config["checkpoint_format" if key == "format" else key] = value
        else:
            setattr(quantization_config, key, value)
