# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""A GPTQ checkpoint with a QA-LoRA adapter folded in, read as a stream of affine-quantized layers.

Every exact export writes the same thing in its own layout: for each GPTQ layer the untouched integer codes, the
untouched scales and a real-valued per-group offset, ``w[n, k] = s[n, g] * q[n, k] + m[n, g]`` with
``m = -s * z + D`` (DESIGN.md, "The fold"). :class:`MergedCheckpoint` validates the adapter against the checkpoint
before anything is written, then yields one tensor or layer at a time, so peak memory stays near one layer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from safetensors import safe_open

from ..checkpoint import (
    DTYPES_BY_NAME,
    GPTQTensorNames,
    gptq_modules,
    gptq_quantization,
    locate_tensors,
    read_config,
    shard_files,
)
from ..gptq import GPTQLayerFacts, contiguous_group_counts, facts_from_tensors, unpack_qweight, unpack_qzeros
from ..offline_merge import adapter_delta, check_adapter_modules, mismatch_error, read_adapter_layers

_GPTQ_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


@dataclass
class AffineLayer:
    """One GPTQ layer with its adapter folded in: ``w[n, k] = scales[n, g(k)] * codes[n, k] + offsets[n, g(k)]``.

    Rows are output channels and groups are contiguous runs of input channels, ``group_counts[g]`` long (all
    ``group_size`` but a partial last group; act-order layers are refused before one is built), which is the layout
    GGUF and MLX store.
    """

    codes: torch.Tensor  # (out_features, in_features), uint8, the GPTQ codes unchanged
    scales: torch.Tensor  # (out_features, groups), the checkpoint's scales unchanged (fp16)
    offsets: torch.Tensor  # (out_features, groups), float64: -s * z + D, rounded once by each format
    bits: int
    group_counts: torch.Tensor  # (groups,), int64: input channels per group

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def blocks(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and offsets per run of ``size`` input channels (rows x in_features / size).

        ``size`` must divide every group: a GPTQ group of ``count`` channels becomes ``count / size`` blocks with the
        same scale and offset, which is exact.
        """
        if bool((self.group_counts % size).any()):
            raise ValueError(f"blocks of {size} channels do not tile groups of {self.group_counts.unique().tolist()}")
        repeats = self.group_counts // size
        return self.scales.repeat_interleave(repeats, dim=1), self.offsets.repeat_interleave(repeats, dim=1)

    def dequantize(self) -> torch.Tensor:
        """The dense fp32 weight (out_features x in_features)."""
        expand = lambda t: t.repeat_interleave(self.group_counts, dim=1)  # noqa: E731
        return (expand(self.scales.double()) * self.codes.double() + expand(self.offsets)).float()


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of the exported model as the checkpoint describes it, before any data is read."""

    name: str  # a GPTQ layer's entry is named `<module>.weight`
    shape: tuple[int, ...]
    dtype: Optional[torch.dtype]  # None for a GPTQ layer
    facts: Optional[GPTQLayerFacts] = None  # set for a GPTQ layer

    @property
    def quantized(self) -> bool:
        return self.facts is not None


def _codes_by_row(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The codes of a GPTQ ``qweight`` as (out_features x in_features) uint8, contiguous.

    For 2, 4 and 8 bits every byte holds whole codes, so the int32 words are transposed and split byte-wise in numpy:
    about 12x faster than the generic int32 unpack plus transpose on a 7B layer (numpy's uint8 ops are much faster
    than torch's on CPU). The byte view needs a little-endian machine; elsewhere, and for 3 bits, the generic path.
    """
    if bits not in (2, 4, 8) or sys.byteorder != "little":
        return unpack_qweight(qweight, bits, in_features).t().to(torch.uint8).contiguous()
    data = np.ascontiguousarray(qweight.numpy().T).view(np.uint8)  # (out, in * bits / 8), bytes in stream order
    per_byte = 8 // bits
    codes = np.empty((data.shape[0], data.shape[1], per_byte), dtype=np.uint8)
    for i in range(per_byte):
        np.bitwise_and(np.right_shift(data, i * bits), (1 << bits) - 1, out=codes[..., i])
    return torch.from_numpy(np.ascontiguousarray(codes.reshape(data.shape[0], -1)[:, :in_features]))


class MergedCheckpoint:
    """A GPTQ checkpoint folder, optionally with a saved QA-LoRA adapter folded into its zero points.

    Construction reads only headers, configs, ``g_idx`` and the adapter, and raises ``ValueError`` for anything that
    does not fit (not GPTQ, adapter for another base, NaN weights), so exporters fail before writing.

    Args:
        base_dir: A GPTQ checkpoint folder (``config.json`` + safetensors, single file or sharded).
        adapter_dir: What ``save_pretrained`` wrote for a QA-LoRA model, or ``None`` to read the base as it is.
    """

    def __init__(self, base_dir: str, adapter_dir: Optional[str] = None) -> None:
        self.base_dir = base_dir
        self.adapter_dir = adapter_dir
        self.config = read_config(base_dir)
        self.quantization = gptq_quantization(base_dir)
        self.bits = int(self.quantization["bits"])
        self.checkpoint_format = self.quantization["checkpoint_format"]
        if adapter_dir is not None:
            self.adapter_config, self._adapter = read_adapter_layers(adapter_dir)
        else:
            self.adapter_config, self._adapter = None, {}
        self.files, _ = shard_files(base_dir)
        self._located = locate_tensors(base_dir, self.files)
        self._handles: dict = {}  # shard file -> open safe_open handle, see _read
        self.modules = gptq_modules(list(self._located))
        check_adapter_modules(self._adapter, self.modules, base_dir)
        self.facts = {module: self._facts(module) for module in self.modules}
        problems = []
        for module in self._adapter:
            try:
                self._delta(module)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise mismatch_error(base_dir, problems)
        self._handles.clear()

    @property
    def act_order_modules(self) -> list[str]:
        """GPTQ layers whose groups are not contiguous runs of input channels."""
        return [module for module, facts in self.facts.items() if facts.act_order]

    def entries(self) -> list[TensorEntry]:
        """Every tensor of the exported model in checkpoint order, without reading data."""
        entries = []
        for file in self.files:
            path = os.path.join(self.base_dir, file)
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    module = name.removesuffix(".qweight")
                    if module != name and module in self.facts:
                        facts = self.facts[module]
                        entries.append(
                            TensorEntry(f"{module}.weight", (facts.out_features, facts.in_features), None, facts)
                        )
                    elif not name.endswith(_GPTQ_SUFFIXES):
                        sliced = f.get_slice(name)
                        entries.append(TensorEntry(name, tuple(sliced.get_shape()), DTYPES_BY_NAME[sliced.get_dtype()]))
        return entries

    def tensors(self) -> Iterator[tuple[str, Union[torch.Tensor, AffineLayer]]]:
        """``(name, tensor)`` for plain tensors and ``(module.weight, AffineLayer)`` for GPTQ layers, in order."""
        for entry in self.entries():
            if entry.quantized:
                item = self.layer(entry.name.removesuffix(".weight"))
            else:
                item = self._read([entry.name])[entry.name]
            self._handles.clear()  # unmaps the shard: resident memory stays near one layer, not the checkpoint
            yield entry.name, item

    def layer(self, module: str) -> AffineLayer:
        """One GPTQ layer, with the adapter folded in if it has one."""
        facts = self.facts[module]
        names = GPTQTensorNames(module)
        tensors = self._read([f"{module}.qweight", names.qzeros, names.scales])
        codes = _codes_by_row(tensors[f"{module}.qweight"], self.bits, facts.in_features)
        zeros = unpack_qzeros(tensors[names.qzeros], self.bits, facts.out_features, self.checkpoint_format)
        scales = tensors[names.scales]
        offsets = -scales.double() * zeros.double()
        if module in self._adapter:
            offsets += self._delta(module).double()
        counts = contiguous_group_counts(facts.in_features, facts.group_size)
        return AffineLayer(codes, scales.t().contiguous(), offsets.t().contiguous(), self.bits, counts)

    def _facts(self, module: str) -> GPTQLayerFacts:
        names = GPTQTensorNames(module)
        g_idx = self._read([names.g_idx])[names.g_idx]
        with safe_open(os.path.join(self.base_dir, self._located[names.scales]), framework="pt") as f:
            out_features = f.get_slice(names.scales).get_shape()[1]
        return facts_from_tensors(self.bits, int(self.quantization["group_size"]), out_features, g_idx)

    def _delta(self, module: str) -> torch.Tensor:
        g_idx = self._read([GPTQTensorNames(module).g_idx])[GPTQTensorNames(module).g_idx]
        return adapter_delta(module, self.facts[module], g_idx, self._adapter[module], self.adapter_config)

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        # Handles are kept until the layer is done: opening a shard parses its whole header, which took longer
        # than reading a small layer when it happened for every tensor read.
        out = {}
        for name in names:
            file = self._located[name]
            if file not in self._handles:
                self._handles[file] = safe_open(os.path.join(self.base_dir, file), framework="pt")
            out[name] = self._handles[file].get_tensor(name)
        return out
