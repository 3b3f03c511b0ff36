# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Sharding a GPTQ model with FSDP: hold the packed GPTQ tensors as frozen parameters.

FSDP shards parameters and replicates buffers. GPTQModel registers ``qweight``, ``qzeros``, ``scales`` and ``g_idx``
as buffers, so under FSDP every rank keeps the whole quantized base and only the embeddings, norms, head and adapters
are sharded. Registered as frozen parameters instead (same tensors, ``requires_grad=False``), FSDP2's
``fully_shard`` shards them too and all-gathers them around each layer's forward and backward like any weight
(measured on CPU with gloo, 2 processes: the GPTQ tensors' bytes per rank halve, loss and adapter gradients equal
an unsharded run; tests/test_distributed.py).
"""

from __future__ import annotations

from torch import nn

from .float_zero_linear import FloatZeroGPTQLinear
from .gptq import is_gptq_layer

GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "zeros")


def prepare_model_for_fsdp(model: nn.Module) -> nn.Module:
    """Make every GPTQ layer's packed tensors frozen parameters, so that FSDP shards the quantized base; in place.

    Call it before ``fully_shard`` (or ``accelerate``'s FSDP wrapping), with or without a QA-LoRA adapter attached.
    State-dict names do not change, so ``save_pretrained`` writes the same files. Merge and save from a model whose
    parameters are gathered (``get_state_dict`` with full state), or from a fresh load of the base and the adapter.

    Returns:
        ``model``, for chaining.
    """
    for module in model.modules():
        if not (is_gptq_layer(module) or isinstance(module, FloatZeroGPTQLinear)):
            continue
        for name in GPTQ_TENSORS:
            tensor = module._buffers.get(name)
            if tensor is None:
                continue
            del module._buffers[name]
            module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
    return model
