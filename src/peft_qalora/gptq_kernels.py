# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""GPTQModel's kernels as QA-LoRA meets them, and the base layer's forward computed from the GPTQ tensors.

``from_pretrained`` picks a GPTQ kernel for inference, and which one depends on the machine: on x86 CPUs the AVX-512
kernel (``TorchCpuAvx512Linear``, inference-only) or the ATen one, on NVIDIA GPUs Marlin, Machete or ExLlamaV2. QA-LoRA
needs two things from the base layer, whatever its kernel:

* the GPTQ tensors in GPTQ layout (``qweight``, ``qzeros``, ``scales``, ``g_idx``): the groups and the zero points are
  read from them, and the merge folds into them. Kernels that repack the weights at load (Marlin, Machete, ExLlamaV2,
  BitBLAS), or on their first inference forward (the CPU kernels' fused paths), no longer hold them;
* a forward whose input gradient is right, for every adapter before the layer to train on.

:func:`gptq_layout_problem` says whether a layer still holds the GPTQ tensors. Where it does, QA-LoRA computes the
base's forward itself whenever a gradient is needed (:func:`gptq_forward_with_input_grad`: dequantize from the GPTQ
tensors, matmul, and in the backward dequantize again rather than keep the dense weight), so training does not depend
on the kernel: an inference-only kernel trains as well as a trainable one. Where it does not, the layer is refused
with the ``GPTQConfig`` line that loads a kernel that keeps them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .gptq import effective_group_size, is_gptq_layer, unpack_qweight, unpack_qzeros
from .problems import format_problems

TRAINABLE_BACKEND = "auto_trainable"  # GPTQModel picks a trainable kernel that keeps the GPTQ layout

# GPTQModel kernels whose buffers stay in GPTQ layout (by class name, matched along the MRO: TritonV2Linear derives from
# TorchLinear, TorchCpuAvx512Linear from TorchAtenLinear). Their CPU fused paths repack on the first inference forward;
# see _repacked_for_inference. Every other kernel (Marlin, Machete, ExLlamaV2, BitBLAS, ...) repacks or shuffles the
# codes at load.
_GPTQ_LAYOUT_KERNELS = ("TorchLinear", "TorchAtenLinear", "TorchFusedLinear")
_PINNED_MODE = "train"


def _kernel_family(layer: nn.Module) -> Optional[str]:
    names = {cls.__name__ for cls in type(layer).__mro__}
    return next((name for name in _GPTQ_LAYOUT_KERNELS if name in names), None)


def _repacked_for_inference(layer: nn.Module) -> bool:
    # TorchAtenLinear / TorchCpuAvx512Linear set `_cpu_transformed`; all three switch `linear_mode` (a str enum in
    # TorchFusedLinear). It happens on the first fp16/bf16 (TorchFusedLinear: any) forward in eval mode without
    # gradients, unless QA-LoRA pinned the layer to its training path first.
    return bool(getattr(layer, "_cpu_transformed", False)) or getattr(layer, "linear_mode", None) == "inference"


def pin_gptq_layout(layer: nn.Module) -> bool:
    """Keep a kernel with a one-way inference switch on its GPTQ-layout path; ``True`` if this call pinned it.

    TorchAtenLinear, TorchCpuAvx512Linear and TorchFusedLinear repack their weights and drop gradients for good on their
    first eval forward without gradients (an evaluation step inside training is enough). ``linear_mode = "train"``
    keeps them on their dequantize-matmul path, so the GPTQ tensors stay readable for training and merging.
    """
    if hasattr(layer, "linear_mode") and layer.linear_mode is None:
        layer.linear_mode = _PINNED_MODE
        return True
    return False


def release_gptq_layout(layer: nn.Module) -> None:
    """Undo :func:`pin_gptq_layout`: the kernel may pick its fast path again."""
    if getattr(layer, "linear_mode", None) == _PINNED_MODE:
        layer.linear_mode = None


def kernel_trains(layer: nn.Module) -> bool:
    """Whether the layer's GPTQModel kernel supports training (``model.train()``) itself."""
    return bool(getattr(type(layer), "SUPPORTS_TRAINING", True))


def gptq_layout_problem(layer: nn.Module) -> Optional[str]:
    """Why ``layer`` no longer holds its GPTQ tensors in GPTQ layout (so QA-LoRA cannot use it), or ``None``."""
    kernel = type(layer).__name__
    if _kernel_family(layer) is None:
        return f"its kernel {kernel} repacks the GPTQ weights at load, so the layer no longer holds GPTQ codes"
    if _repacked_for_inference(layer):
        return (
            f"its kernel {kernel} has repacked the weights for its inference path (an eval forward ran before the "
            "adapter was added), so the layer no longer holds GPTQ codes"
        )
    if getattr(layer, "adapter", None) is not None:
        return f"it carries a GPTQModel runtime adapter ({type(layer.adapter).__name__}), which QA-LoRA cannot fold"
    if getattr(layer, "online_full_had", False) or getattr(layer, "online_partial_had", False):
        return "it rotates its input (SpinQuant/QuaRot online Hadamard), which QA-LoRA's pooling does not account for"
    bits, in_features, out_features = int(layer.bits), int(layer.in_features), int(layer.out_features)
    groups = math.ceil(in_features / effective_group_size(layer))
    expected = {
        "qweight": (torch.int32, (math.ceil(in_features * bits / 32), out_features)),
        "qzeros": (torch.int32, (groups, math.ceil(out_features * bits / 32))),
        "scales": (None, (groups, out_features)),
        "g_idx": (None, (in_features,)),
    }
    for name, (dtype, shape) in expected.items():
        tensor = getattr(layer, name, None)
        if not isinstance(tensor, torch.Tensor) or dtype not in (None, tensor.dtype) or tuple(tensor.shape) != shape:
            found = "none" if not isinstance(tensor, torch.Tensor) else f"{tensor.dtype} {tuple(tensor.shape)}"
            return f"its {name} is not in GPTQ layout (found {found}, expected shape {shape})"
    return None


def _unadapted_gptq_layers(model: nn.Module):
    # a GPTQ layer inside a QA-LoRA layer is its `base_layer`; those are handled by QALoraLinear itself
    for name, module in model.named_modules():
        if is_gptq_layer(module) and not name.endswith(".base_layer"):
            yield name, module


def check_unadapted_layers_trainable(model: nn.Module, targeted: set[str], bits: int | str) -> None:
    """Refuse a trainable adapter when GPTQ layers it leaves alone use an inference-only kernel.

    Adapted layers train on any GPTQ-layout kernel (QALoraLinear computes their training forward), but
    ``model.train()``, which every trainer calls, reaches the others too, and GPTQModel's inference-only kernels
    raise there. ``bits`` goes into the ``GPTQConfig`` line the error shows.
    """
    frozen = [
        f"{name} ({type(module).__name__})"
        for name, module in _unadapted_gptq_layers(model)
        if not kernel_trains(module) and name not in targeted
    ]
    if frozen:
        raise ValueError(
            "Cannot add a trainable QA-LoRA adapter; nothing was changed. These GPTQ layers are not adapted and "
            "use an inference-only GPTQModel kernel, whose `train()` raises when a trainer calls "
            "`model.train()`:" + format_problems(frozen) + '\nAdapt them too (e.g. `target_modules="all-linear"`), or '
            "load the model with a trainable kernel: `AutoModelForCausalLM.from_pretrained(..., "
            f'quantization_config=GPTQConfig(bits={bits}, backend="{TRAINABLE_BACKEND}"))`.'
        )


def pin_unadapted_layers(model: nn.Module) -> list[nn.Module]:
    """:func:`pin_gptq_layout` every GPTQ layer no adapter wraps; returns the layers this call pinned.

    Otherwise an evaluation step during training would switch them, for good, to an inference kernel under
    ``torch.no_grad``, and every adapter before them would get a silently wrong gradient.
    """
    return [module for _, module in _unadapted_gptq_layers(model) if pin_gptq_layout(module)]


def check_unadapted_layers_readable(model: nn.Module) -> None:
    """A float merge rewrites every GPTQ layer as a float-zero layer: the unadapted ones must hold GPTQ codes."""
    problems = [
        f"{name}: {problem}"
        for name, module in _unadapted_gptq_layers(model)
        if (problem := gptq_layout_problem(module))
    ]
    if problems:
        raise ValueError(
            "Cannot merge; nothing was changed. The merged model stores every GPTQ layer with real-valued zero "
            "points, read from the GPTQ tensors, and these layers (not adapted) no longer hold them:"
            + format_problems(problems)
            + "\nReload the base model, load the adapter onto it with `PeftModel.from_pretrained`, and merge "
            "before running inference."
        )


def refusal_hint(bits: int) -> str:
    """The fix for a layer :func:`gptq_layout_problem` refuses, with the exact line to load the model."""
    return (
        "Load the model with a GPTQ kernel that keeps the GPTQ layout: `AutoModelForCausalLM.from_pretrained(..., "
        f'quantization_config=GPTQConfig(bits={bits}, backend="{TRAINABLE_BACKEND}"))`, and add the adapter before '
        "running inference with it. To serve an adapter on this kernel, merge it first (`merge_and_unload()`), or "
        "convert it to a plain LoRA adapter (`peft-qalora convert ADAPTER OUT --to lora`), which any LoRA runtime "
        "applies on the unchanged GPTQ base."
    )


def dequantize_gptq(layer: nn.Module, zero_format: str, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight (in_features x out_features) of a GPTQ-layout layer: ``s * (q - z)`` in fp32, then ``dtype``."""
    bits, in_features, out_features = int(layer.bits), int(layer.in_features), int(layer.out_features)
    g_idx = layer.g_idx.to(torch.int64)
    codes = unpack_qweight(layer.qweight, bits, in_features)
    zeros = unpack_qzeros(layer.qzeros, bits, out_features, zero_format)
    weight = codes.to(torch.float32).sub_(zeros.to(torch.float32)[g_idx]).mul_(layer.scales.to(torch.float32)[g_idx])
    return weight.to(dtype)


class _GPTQMatmul(torch.autograd.Function):
    """``x @ W``, ``W`` dequantized from the GPTQ tensors; the backward dequantizes again instead of saving ``W``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module, zero_format: str) -> torch.Tensor:
        ctx.layer, ctx.zero_format = layer, zero_format
        return x @ dequantize_gptq(layer, zero_format, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad @ dequantize_gptq(ctx.layer, ctx.zero_format, grad.dtype).t(), None, None


def gptq_forward_with_input_grad(layer: nn.Module, x: torch.Tensor, zero_format: str) -> torch.Tensor:
    """``layer(x)`` for a GPTQ-layout layer (:func:`gptq_layout_problem` is ``None``), computed from its tensors.

    Same function as the kernel's forward (exactly so in fp32; GPTQModel's torch kernels round ``s * (q - z)`` to fp16
    first), with a gradient for ``x`` on any kernel, trainable or not, and no dense weight kept for the backward.
    """
    out = _GPTQMatmul.apply(x.reshape(-1, int(layer.in_features)), layer, zero_format)
    if getattr(layer, "bias", None) is not None:
        out = out + layer.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], int(layer.out_features))
