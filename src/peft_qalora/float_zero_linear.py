# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""A GPTQ linear layer with real-valued zero points: what a merged QA-LoRA layer becomes.

It keeps the packed GPTQ codes (``qweight``), the fp16 ``scales`` and ``g_idx`` exactly as they were and holds
the zero points as fp32 ``zeros`` (``z' = z - D / s``, DESIGN.md "The fold"). Its weight is
``W[n, k] = scales[g, n] * (q[k, n] - zeros[g, n])`` with ``g = g_idx[k]``, computed in fp32.

Forward: for a few rows (decoding) a 4-bit layer in fp32 uses torch's int4 kernel, whose per-group
``w = (q - 8) * scale + offset`` takes a real-valued offset and is exact in fp32; otherwise (many rows, other bit
widths, half precision, where the int4 kernel's half-precision offset would round the adapter away) it dequantizes
in fp32 and multiplies.
"""

from __future__ import annotations

import torch
from torch import nn

from .gptq import effective_group_size, unpack_qweight

# Above this many rows the int4 kernel is slower than dequantize + matmul on CPU. A one-off probe at 4096 x 4096
# on a 2-core CPU: ~24x faster at 1 row, on par at 16, 16x slower at 512 (docs/design.md).
INT4_KERNEL_MAX_ROWS = 8
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)


class FloatZeroGPTQLinear(nn.Module):
    """GPTQ layout (``qweight``, ``scales``, ``g_idx``) with fp32 zero points ``zeros`` (groups x out_features)."""

    _CACHED_FROM = frozenset({"qweight", "scales", "zeros", "g_idx", "bits", "group_size", "in_features"})

    def __init__(
        self, bits: int, group_size: int, in_features: int, out_features: int, bias: bool = False, pack_bits: int = 32
    ) -> None:
        super().__init__()
        self.bits = bits
        self.group_size = group_size
        self.in_features = in_features
        self.out_features = out_features
        groups = -(-in_features // effective_group_size(self))  # a last, shorter group when the size does not divide
        self.register_buffer("qweight", torch.zeros(in_features * bits // pack_bits, out_features, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(groups, out_features, dtype=torch.float32))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // effective_group_size(self))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        # Stock transformers knows no `peft_qalora` quant_method: it would build plain nn.Linear layers and fill
        # them with random weights. This zero-size `weight` makes it stop with a size-mismatch error instead.
        self.register_buffer("weight", torch.empty(0, dtype=torch.float16))
        self._int4_cache: tuple | None = None
        self._order_cache: tuple | None = None
        self._kernel_cache: dict = {}  # what the CUDA kernels derived from these tensors (kernels/)

    @classmethod
    def from_gptq(cls, layer: nn.Module, zeros: torch.Tensor) -> FloatZeroGPTQLinear:
        """A float-zero layer sharing ``layer``'s codes, scales, ``g_idx`` and bias, with the given ``zeros``."""
        bias = getattr(layer, "bias", None)
        with torch.device("meta"):
            merged = cls(
                int(layer.bits),
                int(layer.group_size),
                int(layer.in_features),
                int(layer.out_features),
                bias is not None,
            )
        device = layer.scales.device
        merged.qweight, merged.scales, merged.g_idx, merged.bias = layer.qweight, layer.scales, layer.g_idx, bias
        merged.zeros = zeros.to(device=device, dtype=torch.float32).contiguous()
        merged.weight = torch.empty(0, dtype=torch.float16, device=device)
        return merged

    def dequantize_weight(self) -> torch.Tensor:
        """The dense weight as (in_features x out_features), fp32, rows in the layer's input order."""
        order = self._group_order()
        weight = self._dequantize_by_group(order)
        if order is None:
            return weight
        return torch.empty_like(weight).index_copy_(0, order, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from .kernels import float_zero_forward

            # One Triton pass over the packed codes (benchmarks/results/gpu.md: 1.35x the GPTQ base's generation on
            # an H100, where the torch dequantize below made it 0.5-0.75x); None where it does not apply.
            out = float_zero_forward(self, x)
            if out is not None:
                return out
        out_shape = x.shape[:-1] + (self.out_features,)
        x = x.reshape(-1, self.in_features)
        order = self._group_order()
        if order is not None:  # act-order: visit the input channels group by group, like the weight rows
            x = x.index_select(1, order)
        if self._use_int4_kernel(x):
            packed, scales_and_offsets = self._int4_operands(order)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.contiguous(), packed, self.group_size, scales_and_offsets
            )
        else:
            out = x @ self._dequantize_by_group(order).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(out_shape)

    def has_regular_groups(self) -> bool:
        """Whether the channels sorted by group are runs of ``group_size`` (the last may be shorter), as GPTQ writes."""
        self._group_order()
        return self._order_cache[1]

    def _use_int4_kernel(self, x: torch.Tensor) -> bool:
        return (
            self.bits == 4
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.shape[0] <= INT4_KERNEL_MAX_ROWS
            and self.group_size in INT4_KERNEL_GROUP_SIZES
            and self.in_features % self.group_size == 0
            and self.has_regular_groups()
            and not (torch.is_grad_enabled() and x.requires_grad)
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        )

    def _group_order(self) -> torch.Tensor | None:
        """The input channels sorted by group, or ``None`` when groups are already contiguous; cached."""
        if self._order_cache is None:
            g_idx = self.g_idx.long()
            order = torch.argsort(g_idx, stable=True)
            identity = bool(torch.equal(order, torch.arange(self.in_features, device=order.device)))
            # What GPTQ writes, with or without act-order: sorted by group, runs of group_size channels (the last run
            # shorter for a partial group). Any other valid g_idx takes a gather per weight instead.
            canonical = torch.arange(self.in_features, device=order.device) // effective_group_size(self)
            regular = bool(torch.equal(g_idx[order], canonical))
            self._order_cache = (None if identity else order, regular)
        return self._order_cache[0]

    def _dequantize_by_group(self, order: torch.Tensor | None) -> torch.Tensor:
        """The weight with rows in group order: scales and zeros broadcast per group in place, without gathers.

        Rows sorted by group are runs of ``group_size`` rows per group, the last run shorter for a partial group.
        """
        codes = unpack_qweight(self.qweight, self.bits, self.in_features)
        if order is not None:
            codes = codes.index_select(0, order)
        weight = codes.to(torch.float32)
        if not self.has_regular_groups():
            g = self.g_idx.long() if order is None else self.g_idx.long()[order]
            return weight.sub_(self.zeros[g]).mul_(self.scales.float()[g])
        group_size = effective_group_size(self)
        full = self.in_features // group_size * group_size
        head = weight[:full].view(-1, group_size, self.out_features)
        groups = head.shape[0]
        head.sub_(self.zeros[:groups].unsqueeze(1)).mul_(self.scales[:groups].float().unsqueeze(1))
        if full < self.in_features:  # the partial last group
            weight[full:].sub_(self.zeros[groups]).mul_(self.scales[groups].float())
        return weight

    def _int4_operands(self, order: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes repacked for the int4 kernel (rows in group order) and per-group (scale, offset); cached."""
        if self._int4_cache is None:
            codes = unpack_qweight(self.qweight, self.bits, self.in_features)
            if order is not None:
                codes = codes.index_select(0, order)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 1)
            scales = self.scales.float()
            # The kernel computes (q - 8) * scale + offset; s * (q - z') = (q - 8) * s + s * (8 - z').
            scales_and_offsets = torch.stack([scales, scales * (8 - self.zeros)], dim=-1).contiguous()
            self._int4_cache = (packed, scales_and_offsets)
        return self._int4_cache

    def _clear_caches(self) -> None:
        self._int4_cache = None
        self._order_cache = None
        self._kernel_cache = {}

    def __setattr__(self, name: str, value) -> None:
        if name in self._CACHED_FROM:  # everything cached is derived from these tensors
            self._clear_caches()
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        self._clear_caches()
        return super()._apply(fn, recurse=recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._clear_caches()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        # copies and pickles start with empty caches: the kernel cache holds compiled Triton kernels, which neither
        # copy nor pickle, and everything in it is rebuilt from the tensors on first use
        state = super().__getstate__()
        state.update(_int4_cache=None, _order_cache=None, _kernel_cache={})
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
