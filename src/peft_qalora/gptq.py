# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""GPTQ tensor formats: bit packing, zero-point formats, and the quantization facts of a layer.

GPTQ packs b-bit codes into int32 words as one contiguous bit stream, least significant bit first:
``qweight`` along the input dimension (rows), ``qzeros`` along the output dimension (columns). For
2, 4 and 8 bits every word holds whole codes; 3-bit codes straddle word boundaries (32 codes in 3
words). The same stream layout is what MLX uses, per row.

Zero points come in two on-disk formats (DESIGN.md, "Zero-point formats"):

* ``gptq`` ("v1", what AutoGPTQ wrote): the field holds ``z - 1``; readers add 1 per field.
* ``gptq_v2`` (GPTQModel's internal format): the field holds ``z``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

WORD_BITS = 32
SUPPORTED_BITS = (2, 3, 4, 8)
ZERO_FORMATS = ("gptq", "gptq_v2")


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"GPTQ bits must be one of {SUPPORTED_BITS}, got {bits}.")


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes along the last dimension into int32 words, LSB first.

    The last dimension times ``bits`` must be a multiple of 32.
    """
    _check_bits(bits)
    *lead, n = codes.shape
    if (n * bits) % WORD_BITS:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole 32-bit words.")
    codes = codes.to(torch.int64)
    if WORD_BITS % bits == 0:
        per_word = WORD_BITS // bits
        shifts = torch.arange(0, WORD_BITS, bits, device=codes.device, dtype=torch.int64)
        words = (codes.reshape(*lead, n // per_word, per_word) << shifts).sum(-1)
    else:
        # Codes straddle words: expand to a bit stream, then regroup in 32s.
        bit_index = torch.arange(bits, device=codes.device, dtype=torch.int64)
        stream = ((codes.unsqueeze(-1) >> bit_index) & 1).reshape(*lead, n * bits // WORD_BITS, WORD_BITS)
        words = (stream << torch.arange(WORD_BITS, device=codes.device, dtype=torch.int64)).sum(-1)
    # Reinterpret the unsigned 32-bit value as int32 (two's complement).
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(words: torch.Tensor, bits: int, count: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: unsigned codes (int32) along the last dimension.

    ``count`` trims the result to that many codes (the stream may end in padding).
    """
    _check_bits(bits)
    *lead, n_words = words.shape
    words = words.to(torch.int32)
    if WORD_BITS % bits == 0:
        shifts = torch.arange(0, WORD_BITS, bits, device=words.device, dtype=torch.int32)
        codes = torch.bitwise_right_shift(words.unsqueeze(-1), shifts) & ((1 << bits) - 1)
        codes = codes.reshape(*lead, n_words * (WORD_BITS // bits))
    else:
        shifts = torch.arange(WORD_BITS, device=words.device, dtype=torch.int32)
        stream = (torch.bitwise_right_shift(words.unsqueeze(-1), shifts) & 1).reshape(*lead, -1, bits)
        codes = (stream << torch.arange(bits, device=words.device, dtype=torch.int32)).sum(-1, dtype=torch.int32)
    return codes if count is None else codes[..., :count]


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``q[k, n]`` (in_features x out_features) into a GPTQ ``qweight``."""
    return pack_int32(codes.t(), bits).t().contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Codes ``q[k, n]`` (in_features x out_features, contiguous) of a GPTQ ``qweight``."""
    if WORD_BITS % bits:
        return unpack_int32(qweight.t(), bits, in_features).t().contiguous()
    # Whole codes per word: unpack along the rows directly, without transposing the (large) result.
    shifts = torch.arange(0, WORD_BITS, bits, device=qweight.device, dtype=torch.int32).view(1, -1, 1)
    codes = torch.bitwise_right_shift(qweight.unsqueeze(1), shifts) & ((1 << bits) - 1)
    return codes.reshape(-1, qweight.shape[1])[:in_features]


def pack_qzeros(zeros: torch.Tensor, bits: int, zero_format: str = "gptq_v2") -> torch.Tensor:
    """Pack integer zero points ``z[g, n]`` into a GPTQ ``qzeros`` tensor of the given format.

    ``gptq`` (v1) stores ``z - 1`` and therefore cannot hold ``z = 0``; a clear error says so.
    """
    zeros = zeros.to(torch.int64)
    maxq = (1 << bits) - 1
    if zero_format == "gptq":
        if (zeros < 1).any() or (zeros > maxq).any():
            raise ValueError(
                f"The `gptq` (v1) zero-point format stores z - 1 and cannot hold zero points outside [1, {maxq}] "
                f"(found {int(zeros.min())}..{int(zeros.max())}); write the checkpoint as `gptq_v2` instead."
            )
        zeros = zeros - 1
    elif zero_format == "gptq_v2":
        if (zeros < 0).any() or (zeros > maxq).any():
            raise ValueError(
                f"{bits}-bit zero points must lie in [0, {maxq}], found {int(zeros.min())}..{int(zeros.max())}."
            )
    else:
        raise ValueError(f"Unknown GPTQ zero-point format {zero_format!r}; expected one of {ZERO_FORMATS}.")
    return pack_int32(zeros, bits)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, zero_format: str = "gptq_v2") -> torch.Tensor:
    """Integer zero points ``z[g, n]`` of a packed GPTQ ``qzeros`` tensor in the given format."""
    fields = unpack_int32(qzeros, bits, out_features)
    if zero_format == "gptq":
        return fields + 1
    if zero_format == "gptq_v2":
        return fields
    raise ValueError(f"Unknown GPTQ zero-point format {zero_format!r}; expected one of {ZERO_FORMATS}.")


def is_gptq_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a GPTQModel GPTQ linear layer (any kernel)."""
    try:
        from gptqmodel.nn_modules.qlinear import GPTQQuantLinear
    except ImportError:  # pragma: no cover - gptqmodel is a dependency
        return False
    return isinstance(module, GPTQQuantLinear)


@dataclass(frozen=True)
class GPTQLayerFacts:
    """The quantization facts of one GPTQ layer that an adapter depends on."""

    bits: int
    group_size: int
    in_features: int
    out_features: int
    act_order: bool
    g_idx_sha256: str

    @property
    def num_groups(self) -> int:
        """Groups per row: ``ceil(in_features / group_size)``; when the group size does not divide the row, GPTQ
        quantizes the remaining channels as a last, shorter group."""
        return -(-self.in_features // self.group_size)

    @property
    def has_partial_group(self) -> bool:
        return self.in_features % self.group_size != 0

    @property
    def last_group_size(self) -> int:
        """Channels of the last group: ``group_size``, or fewer for a partial group."""
        return self.in_features - self.group_size * (self.num_groups - 1)

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "act_order": self.act_order,
            "g_idx_sha256": self.g_idx_sha256,
        }

    def mismatches(self, recorded: dict) -> list[str]:
        """Human-readable differences between these facts and ``recorded`` (an earlier ``to_dict()``)."""
        return [
            f"{key}: adapter trained with {recorded[key]!r}, base has {value!r}"
            for key, value in self.to_dict().items()
            if key in recorded and recorded[key] != value
        ]


def group_counts(g_idx: torch.Tensor, num_groups: int) -> torch.Tensor:
    """How many input channels each group holds (int64, ``num_groups`` long): ``count(g)`` in DESIGN.md."""
    return torch.bincount(g_idx.detach().to(torch.int64).flatten(), minlength=num_groups)


def contiguous_group_counts(in_features: int, group_size: int) -> torch.Tensor:
    """Channels per group of a layer without act-order: ``group_size`` each, the last group what remains."""
    counts = torch.full((-(-in_features // group_size),), group_size, dtype=torch.int64)
    counts[-1] = in_features - group_size * (counts.numel() - 1)
    return counts


def check_group_layout(facts: GPTQLayerFacts, g_idx: torch.Tensor) -> str | None:
    """Why QA-LoRA cannot pool over this layer's groups, or ``None`` if it can.

    Any ``g_idx`` whose groups are all non-empty works: contiguous or act-order, full groups or a last partial one.
    """
    if g_idx.numel() != facts.in_features:
        return f"its g_idx has {g_idx.numel()} entries for {facts.in_features} input channels"
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= facts.num_groups:
        return (
            f"its g_idx names groups outside 0..{facts.num_groups - 1} (in_features={facts.in_features}, "
            f"group_size={facts.group_size})"
        )
    counts = group_counts(g_idx, facts.num_groups)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        return f"its g_idx assigns no input channel to group(s) {empty[:5]}; every quantization group needs one"
    return None


def effective_group_size(layer: nn.Module) -> int:
    """The layer's group size, with GPTQ's ``-1`` (one group per row) resolved to ``in_features``."""
    group_size = int(layer.group_size)
    return layer.in_features if group_size <= 0 else group_size


def g_idx_digest(g_idx: torch.Tensor) -> str:
    """A short content hash of a ``g_idx`` map, to recognise the same act-order permutation later."""
    return hashlib.sha256(g_idx.detach().to("cpu", torch.int32).contiguous().numpy().tobytes()).hexdigest()[:16]


def facts_from_tensors(bits: int, group_size: int, out_features: int, g_idx: torch.Tensor) -> GPTQLayerFacts:
    """Layer facts from a checkpoint's tensors (``in_features`` is the length of ``g_idx``)."""
    in_features = int(g_idx.numel())
    group_size = in_features if group_size <= 0 else group_size
    g_idx = g_idx.detach().to(torch.int64)
    canonical = torch.arange(in_features, device=g_idx.device) // group_size
    return GPTQLayerFacts(
        bits=int(bits),
        group_size=group_size,
        in_features=in_features,
        out_features=int(out_features),
        act_order=not torch.equal(g_idx, canonical),
        g_idx_sha256=g_idx_digest(g_idx),
    )


def layer_facts(layer: nn.Module) -> GPTQLayerFacts:
    """Read bits, group size, shapes and the ``g_idx`` map from a GPTQ layer."""
    return facts_from_tensors(layer.bits, int(layer.group_size), layer.out_features, layer.g_idx)
