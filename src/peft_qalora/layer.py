# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The QA-LoRA layer: a GPTQ linear layer plus a low-rank adapter on its group-pooled input."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .calibrated_merge import DEFAULT_SOLVER, solve_layer
from .config import qalora_scaling
from .float_zero_linear import FloatZeroGPTQLinear
from .gptq import (
    check_group_layout,
    group_counts,
    is_gptq_layer,
    layer_facts,
    pack_qweight,
    pack_qzeros,
    unpack_qweight,
)
from .gptq_kernels import (
    TRAINABLE_BACKEND,
    gptq_forward_with_input_grad,
    gptq_layout_problem,
    kernel_trains,
    pin_gptq_layout,
    refusal_hint,
    release_gptq_layout,
)
from .merge import LayerRounding, fold, group_delta, in_memory_zero_format, read_zero_points, round_zeros


@dataclass
class LayerFold:
    """A layer's adapters folded into its zero points, computed but not yet applied."""

    adapters: list[str]
    zeros: torch.Tensor  # fp32 real-valued zeros, or int64 integer zeros
    zero_format: str  # "float" or "int"
    rounding: Optional[LayerRounding] = None
    codes: Optional[torch.Tensor] = None  # (in, out) int64 new codes of a calibrated integer merge; None: unchanged


class QALoraLayer(BaseTunerLayer):
    """State and math shared by QA-LoRA layers: one ``A`` (r x groups) and ``B`` (out x r) per adapter."""

    adapter_layer_names = ("qalora_A", "qalora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "qalora_dropout")

    def __init__(self, base_layer: nn.Module, checkpoint_format: Optional[str] = None, **kwargs: Any) -> None:
        self.base_layer = base_layer
        # Zero-point format of the checkpoint the base was loaded from: decides how its qzeros read in memory.
        self.checkpoint_format = checkpoint_format
        self._unmerged = None  # (base layer, its qzeros, its qweight) as they were before the first merge
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.qalora_dropout = nn.ModuleDict({})
        self.qalora_A = nn.ModuleDict({})
        self.qalora_B = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        if not (is_gptq_layer(base) or isinstance(base, FloatZeroGPTQLinear)):
            raise TypeError(f"QA-LoRA wraps GPTQModel GPTQ linear layers, got {type(base).__name__}.")
        problem = None if isinstance(base, FloatZeroGPTQLinear) else gptq_layout_problem(base)
        if problem:
            raise ValueError(f"Cannot adapt this {type(base).__name__}: {problem}. {refusal_hint(int(base.bits))}")
        self.facts = layer_facts(base)
        problem = check_group_layout(self.facts, base.g_idx)
        if problem:
            raise ValueError(f"Cannot adapt this {type(base).__name__}: {problem}.")
        self.in_features = self.facts.in_features
        self.out_features = self.facts.out_features
        self.num_groups = self.facts.num_groups
        self.group_size = self.facts.group_size
        self._register_pooling(base.g_idx)
        self._pinned_linear_mode = pin_gptq_layout(base)

    def _register_pooling(self, g_idx: torch.Tensor) -> None:
        """Precompute how the input channels pool into groups. Buffers are not persistent: they derive from g_idx.

        * ``qalora_group_order``: with act-order the channels of a group are scattered; gathering them group by group
          makes pooling a reshape-and-sum in every case GPTQ produces.
        * ``qalora_group_counts``: channels per group. Every group but the last holds ``group_size`` channels; the last
          holds fewer when ``group_size`` does not divide ``in_features`` (a partial group). The mean divides each
          group's sum by its own count, so the fold stays exact.
        * ``qalora_group_index``: ``g_idx`` itself, kept only for layouts that are not "full groups, then at most one
          shorter last group" once sorted (never written by GPTQ, but a valid ``g_idx``): pooled by a scatter-add.
        """
        g_idx = g_idx.detach().to(torch.int64)
        counts = group_counts(g_idx, self.num_groups)
        self._full_groups = self.in_features // self.group_size
        regular = bool((counts[: self._full_groups] == self.group_size).all())
        order = torch.argsort(g_idx, stable=True) if self.facts.act_order and regular else None
        self.register_buffer("qalora_group_order", order, persistent=False)
        self.register_buffer("qalora_group_counts", counts, persistent=False)
        self.register_buffer("qalora_group_index", None if regular else g_idx, persistent=False)
        # Equal groups defer the mean's 1 / group_size to the output scale (one scalar); others scale each group.
        self._equal_groups = regular and not self.facts.has_partial_group

    def release_base_layer(self) -> nn.Module:
        """The base layer, with the kernel mode this layer pinned handed back to the kernel."""
        base = self.get_base_layer()
        if self._pinned_linear_mode:
            release_gptq_layout(base)
            self._pinned_linear_mode = False
        return base

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: Union[bool, str] = True,
        use_rslora: bool = False,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Add (or replace) the adapter ``adapter_name``: ``A`` maps groups to rank ``r``, ``B`` rank to outputs."""
        if r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {r}.")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = qalora_scaling(lora_alpha, r, use_rslora)
        self.qalora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.qalora_A[adapter_name] = nn.Linear(self.num_groups, r, bias=False)
        self.qalora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.reset_qalora_parameters(adapter_name, init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_qalora_parameters(self, adapter_name: str, init_lora_weights: Union[bool, str]) -> None:
        A = self.qalora_A[adapter_name].weight
        B = self.qalora_B[adapter_name].weight
        with torch.no_grad():
            if init_lora_weights == "gaussian":
                nn.init.normal_(A, std=1 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init_lora_weights is False:
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            else:
                nn.init.zeros_(B)

    def group_sums(self, x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Sum of ``x`` over each quantization group: (..., in_features) -> (..., num_groups).

        ``dtype`` accumulates (and returns) in that dtype without a full-size copy of ``x``.
        """
        if self.qalora_group_index is not None:
            src = x if dtype is None else x.to(dtype)
            return src.new_zeros(*x.shape[:-1], self.num_groups).index_add(-1, self.qalora_group_index, src)
        if self.qalora_group_order is not None:
            x = x.index_select(-1, self.qalora_group_order)
        full = self._full_groups * self.group_size
        sums = x[..., :full].unflatten(-1, (self._full_groups, self.group_size)).sum(-1, dtype=dtype)
        if full == self.in_features:
            return sums
        return torch.cat([sums, x[..., full:].sum(-1, keepdim=True, dtype=dtype)], dim=-1)

    def pool(self, x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, float]:
        """QA-LoRA's group-mean pooling, as ``(pooled, factor)``: the group means are ``pooled * factor``.

        With equal groups the mean's ``1 / group_size`` is returned as ``factor``, for the forward to apply with the
        output scale, so that the backward of the pooling is a free broadcast rather than a full-size division. With a
        partial group each group's sum is divided by its own count here (a tokens x groups tensor) and ``factor`` is 1.
        """
        sums = self.group_sums(x, dtype)
        if self._equal_groups:
            return sums, 1.0 / self.group_size
        return sums / self.qalora_group_counts.to(sums.dtype), 1.0

    def group_delta(self, adapter_name: str) -> torch.Tensor:
        """``D[g, n]``: the adapter's change to every weight of group ``g`` in output ``n`` (groups x out, fp32).

        ``W[n, k] + D[g_idx[k], n]`` is the adapted dense weight (DESIGN.md, "The adapter").
        """
        A, B = self.qalora_A[adapter_name].weight, self.qalora_B[adapter_name].weight
        return group_delta(A, B, self.scaling[adapter_name], self.qalora_group_counts)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter as a dense weight change (out x in), constant inside each quantization group."""
        g_idx = self.get_base_layer().g_idx.to(torch.int64)
        return self.group_delta(adapter_name)[g_idx].t()

    def _checked_delta(self, adapter_names: list[str], name: str) -> torch.Tensor:
        """``D[g, n]`` summed over ``adapter_names``; refuses NaN or inf."""
        delta = sum(self.group_delta(adapter) for adapter in adapter_names)
        if not bool(torch.isfinite(delta).all()):
            raise ValueError(
                f"{name or 'layer'}: adapter(s) {adapter_names} contain NaN or inf weights; the merge would break the "
                "model. Nothing was changed."
            )
        return delta

    def fold_adapters(self, adapter_names: list[str], zero_format: str = "float", name: str = "") -> LayerFold:
        """Fold ``adapter_names`` into this layer's zero points without changing anything yet.

        ``zero_format="float"`` keeps ``z' = z - D / s`` exactly; ``"int"`` rounds it to the GPTQ grid and measures
        the loss.
        """
        base = self.get_base_layer()
        delta = self._checked_delta(adapter_names, name)
        original = read_zero_points(base, self.checkpoint_format)
        folded = fold(original, base.scales, delta.to(original.device))
        if zero_format == "float":
            return LayerFold(adapter_names, folded, "float")
        if isinstance(base, FloatZeroGPTQLinear):
            raise ValueError(f"{name}: already merged into real-valued zero points; unmerge before an integer merge.")
        lowest = 1 if in_memory_zero_format(base, self.checkpoint_format) == "gptq" else 0
        rounded, rounding = round_zeros(name, folded, original, base.scales, self.facts.bits, lowest)
        return LayerFold(adapter_names, rounded, "int", rounding)

    def calibrated_fold(
        self,
        adapter_names: list[str],
        hessian: torch.Tensor,
        name: str = "",
        method: str = DEFAULT_SOLVER,
        linear: Optional[torch.Tensor] = None,
        start_energy: Optional[torch.Tensor] = None,
    ) -> LayerFold:
        """The calibrated integer merge of ``adapter_names`` (calibrated_merge.py), computed but not applied.

        ``hessian`` is ``X^T X`` of this layer's calibration inputs; ``linear`` and ``start_energy``, when given,
        the rest of the objective (:func:`peft_qalora.calibrated_merge.solve_layer`; the sequential calibration's).
        """
        base = self.get_base_layer()
        if isinstance(base, FloatZeroGPTQLinear):
            raise ValueError(f"{name}: already merged into real-valued zero points; unmerge before an integer merge.")
        delta = self._checked_delta(adapter_names, name)
        zeros = read_zero_points(base, self.checkpoint_format).to(torch.int64)
        codes = unpack_qweight(base.qweight, self.facts.bits, self.in_features)
        lowest = 1 if in_memory_zero_format(base, self.checkpoint_format) == "gptq" else 0
        solution = solve_layer(
            name,
            codes,
            zeros,
            base.scales,
            base.g_idx,
            delta,
            hessian,
            self.facts.bits,
            lowest,
            method=method,
            linear=linear,
            start_energy=start_energy,
        )
        return LayerFold(adapter_names, solution.zeros, "int", solution.report, codes=solution.codes)

    def apply_fold(self, layer_fold: LayerFold) -> None:
        """Make the base layer compute the folded weights; :meth:`unmerge` restores it exactly."""
        base = self.get_base_layer()
        if self._unmerged is None:
            self._unmerged = (base, getattr(base, "qzeros", None), getattr(base, "qweight", None))
        if layer_fold.zero_format == "float":
            self.base_layer = FloatZeroGPTQLinear.from_gptq(base, layer_fold.zeros)
        else:
            zero_format = in_memory_zero_format(base, self.checkpoint_format)
            base.qzeros = pack_qzeros(layer_fold.zeros, self.facts.bits, zero_format).to(base.qzeros.device)
            if layer_fold.codes is not None:
                base.qweight = pack_qweight(layer_fold.codes, self.facts.bits).to(base.qweight.device)
            _clear_kernel_cache(base)
        self.merged_adapters.extend(layer_fold.adapters)


class QALoraLinear(nn.Module, QALoraLayer):
    """A GPTQModel GPTQ linear layer (any kernel) with QA-LoRA adapters.

    ``forward(x) = base(x) + sum over active adapters of scaling * B(A(pool(dropout(x))))``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        init_lora_weights: Union[bool, str] = True,
        use_rslora: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        QALoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(
            adapter_name,
            r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            init_lora_weights=init_lora_weights,
            use_rslora=use_rslora,
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_forward(x, *args, **kwargs)
        result = self._base_forward(x, *args, **kwargs)
        self._check_gradient_path(x, result)
        if self.merged:
            return result
        for active_adapter in self.active_adapters:
            if active_adapter not in self.qalora_A:
                continue
            A = self.qalora_A[active_adapter]
            B = self.qalora_B[active_adapter]
            dropout = self.qalora_dropout[active_adapter]
            if _HALF_INPUT_FAST_PATH and _is_half(x) and _is_half(result) and A.weight.dtype == torch.float32:
                # Half-precision model, fp32 adapter (PEFT's default): pool with fp32 accumulation and run B in the
                # model's dtype, so that no (tokens x in) or (tokens x out) fp32 tensor is made. Those full-size casts
                # and elementwise ops cost more than the adapter's matmuls (benchmarks/gpu.py, profile).
                pooled, mean_factor = self.pool(dropout(x), dtype=torch.float32)
                alpha = self.scaling[active_adapter] * mean_factor
                hidden = A(pooled)
                flat = torch.addmm(
                    result.reshape(-1, self.out_features),
                    hidden.reshape(-1, hidden.shape[-1]).to(result.dtype),
                    B.weight.t().to(result.dtype),
                    alpha=alpha,
                )
                result = flat.view(result.shape)
                continue
            pooled, mean_factor = self.pool(dropout(self._cast_input_dtype(x, A.weight.dtype)))
            alpha = self.scaling[active_adapter] * mean_factor
            hidden = A(pooled)
            if hidden.dtype == result.dtype:
                # One fused op for B, the scale and the residual add: the (tokens x out_features) tensors dominate
                # the adapter's cost (benchmarks/train_step.py).
                flat = torch.addmm(
                    result.reshape(-1, self.out_features),
                    hidden.reshape(-1, hidden.shape[-1]),
                    B.weight.t(),
                    alpha=alpha,
                )
                result = flat.view(result.shape)
            else:
                result = result + (B(hidden) * alpha).to(result.dtype)
        return result

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output; in training, computed from the GPTQ tensors.

        The kernel ``from_pretrained`` picked may be inference-only (``TorchCpuAvx512Linear``), compute an fp32 model in
        bf16 (``TorchFusedLinear``), or keep each layer's dense weight for the backward (GPTQModel's torch/Triton train
        path on CUDA: a bf16 copy of the whole model at the peak). Computing the base from its GPTQ tensors with a
        re-dequantizing backward gives the same function and gradient on every kernel (gptq_kernels.py; on CUDA with
        GPTQModel's Triton dequantize, kernels/gptq_cuda.py). Inference keeps the kernel's own forward.
        """
        base = self.base_layer
        training = self.training or (torch.is_grad_enabled() and x.requires_grad)
        if args or kwargs or not training or not is_gptq_layer(base):
            return base(x, *args, **kwargs)
        if x.is_cuda:
            from .kernels import gptq_recompute_forward, recompute_supported

            if recompute_supported(base, x):
                return gptq_recompute_forward(base, x)
        return gptq_forward_with_input_grad(base, x, in_memory_zero_format(base, self.checkpoint_format))

    def train(self, mode: bool = True) -> QALoraLinear:
        """Like ``nn.Module.train``, but an inference-only GPTQ kernel stays in eval mode (its ``train()`` raises).

        Its training forward is computed from the GPTQ tensors (:meth:`_base_forward`), so it needs no train mode.
        """
        base = self.get_base_layer()
        if not mode or kernel_trains(base):
            return super().train(mode)
        self.training = True
        for child in self.children():
            if child is not base:
                child.train(True)
        return self

    def _check_gradient_path(self, x: torch.Tensor, result: torch.Tensor) -> None:
        # Kernel-agnostic safety net: if the input carries a gradient but the base output does not, the kernel ran a
        # no-grad path and every adapter before this layer would silently get a wrong (partial) gradient.
        if torch.is_grad_enabled() and x.requires_grad and not result.requires_grad:
            base = self.get_base_layer()
            raise RuntimeError(
                f"The GPTQ kernel {type(base).__name__} returned an output without gradient: it ran an inference-only "
                "path, so training through it would give wrong gradients. Load the model for training with "
                f'`GPTQConfig(bits=..., backend="{TRAINABLE_BACKEND}")`.'
            )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the adapters into real-valued zero points (PEFT's ``merge_adapter`` calls this per layer).

        Non-finite adapter weights are always refused, so ``safe_merge`` adds nothing and exists for API parity.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if adapter_names:
            self.apply_fold(self.fold_adapters(adapter_names, "float"))

    def unmerge(self) -> None:
        """Put back the original GPTQ layer and zero points, exactly as they were before merging."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base, qzeros, qweight = self._unmerged
        self.base_layer = base
        if qzeros is not None and base.qzeros is not qzeros:
            base.qzeros = qzeros
            _clear_kernel_cache(base)
        if qweight is not None and base.qweight is not qweight:
            base.qweight = qweight
            _clear_kernel_cache(base)
        self._unmerged = None
        self.merged_adapters.clear()

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        """What ``unload()`` / ``merge_and_unload()`` put back in this layer's place."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.release_base_layer()

    def __repr__(self) -> str:
        return "qalora." + super().__repr__()


# Half-precision inputs with an fp32 adapter: pool with fp32 accumulation, B in the model's dtype (see forward).
# A switch so that benchmarks/gpu.py can measure both paths in one process.
_HALF_INPUT_FAST_PATH = True


def _is_half(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


def _clear_kernel_cache(layer: nn.Module) -> None:
    # GPTQModel kernels cache dequantized zeros/weights; new qzeros must not meet stale caches.
    clear = getattr(layer, "_clear_runtime_weight_cache", None)
    if callable(clear):
        clear()
