# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The fold of a QA-LoRA adapter into GPTQ zero points, and what rounding the result to integers loses.

``s * (q - z) + D = s * (q - (z - D / s))``: merging sets ``z' = z - D / s`` (DESIGN.md, "The fold"). ``z'`` is real
valued; a trained adapter moves it by a few thousandths of a quantization step, so rounding it back to the integer
grid of standard GPTQ usually discards the adapter. :class:`MergeReport` measures exactly that.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from .float_zero_linear import FloatZeroGPTQLinear
from .gptq import unpack_qzeros

logger = logging.getLogger(__name__)

ZERO_FORMATS = ("float", "int")
DEFAULT_MAX_ROUNDING_LOSS = 0.05


def in_memory_zero_format(layer: nn.Module, checkpoint_format: str | None) -> str:
    """The zero-point format a loaded GPTQModel layer holds in memory.

    Loading a ``gptq`` (v1) checkpoint converts the zeros to v2 for every kernel that needs v2, and the layer's
    own ``qzero_format()`` can be stale (DESIGN.md, "Traps"), so this is derived from the checkpoint and kernel.
    """
    if checkpoint_format == "gptq_v2" or getattr(layer, "REQUIRES_FORMAT_V2", False):
        return "gptq_v2"
    return "gptq"


def read_zero_points(layer: nn.Module, checkpoint_format: str | None) -> torch.Tensor:
    """Zero points ``z[g, n]`` of a GPTQ layer (integer or float-zero) as fp32."""
    if isinstance(layer, FloatZeroGPTQLinear):
        return layer.zeros.float()
    qzeros = layer.qzeros
    if qzeros.dtype != torch.int32 or getattr(layer, "linear_mode", None) == "inference":
        raise RuntimeError(
            f"{type(layer).__name__} has repacked its zero points for its inference kernel (an fp16/bf16 eval forward "
            "ran before the adapter was added), so they can no longer be read exactly. Reload the base model, load the "
            "adapter onto it with `PeftModel.from_pretrained`, and merge before running inference."
        )
    zero_format = in_memory_zero_format(layer, checkpoint_format)
    return unpack_qzeros(qzeros, int(layer.bits), int(layer.out_features), zero_format).float()


def group_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, counts: Union[int, torch.Tensor]) -> torch.Tensor:
    """``D[g, n] = scaling * (B @ A)[n, g] / count(g)``: the adapter's change to every weight of a group (fp32).

    ``counts`` holds each group's number of input channels (a tensor, :func:`peft_qalora.gptq.group_counts`), or one
    number when all groups are equal. Both the in-memory and the offline merge call this, so they agree to the bit.
    """
    delta = scaling * (B.detach().float() @ A.detach().float()).t()
    if isinstance(counts, torch.Tensor):
        return delta / counts.to(device=delta.device, dtype=delta.dtype).unsqueeze(1)
    return delta / counts


def fold(zeros: torch.Tensor, scales: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``z' = z - D / s``: the zero points that make ``s * (q - z')`` equal ``s * (q - z) + D`` (all groups x out)."""
    return zeros - delta / scales.float()


@dataclass
class LayerRounding:
    """What rounding one layer's folded zeros to integers does to its adapter."""

    name: str
    delta_sq: float  # ||D||^2
    error_sq: float  # ||D_int - D||^2
    max_error_steps: float  # largest |z'_int - z'|, in quantization steps
    clamped_groups: int  # (group, output) pairs whose zero point left the format's range

    @property
    def kept(self) -> float:
        """Share of the adapter's effect the integer zeros keep: ``1 - ||D_int - D|| / ||D||``."""
        return 1.0 if self.delta_sq == 0 else 1.0 - math.sqrt(self.error_sq / self.delta_sq)


@dataclass
class MergeReport:
    """Per-layer and total effect of merging into integer zero points."""

    layers: list[LayerRounding] = field(default_factory=list)

    @property
    def kept(self) -> float:
        total = sum(layer.delta_sq for layer in self.layers)
        return 1.0 if total == 0 else 1.0 - math.sqrt(sum(layer.error_sq for layer in self.layers) / total)

    @property
    def lost(self) -> float:
        """Share of the adapter's effect lost to rounding (0 = exact, 1 = all of it)."""
        return 1.0 - self.kept

    @property
    def max_error_steps(self) -> float:
        return max((layer.max_error_steps for layer in self.layers), default=0.0)

    @property
    def clamped_groups(self) -> int:
        return sum(layer.clamped_groups for layer in self.layers)

    def summary(self) -> str:
        return (
            f"integer zero points keep {self.kept:.1%} of the adapter's effect over {len(self.layers)} layers "
            f"(largest rounding error {self.max_error_steps:.3f} quantization steps, {self.clamped_groups} zero "
            "points clamped to the format's range)"
        )


def round_zeros(
    name: str, folded: torch.Tensor, original: torch.Tensor, scales: torch.Tensor, bits: int, lowest: int
) -> tuple[torch.Tensor, LayerRounding]:
    """Round folded zeros to the integer grid ``[lowest, 2^bits - 1]`` and measure what the adapter loses."""
    maxq = (1 << bits) - 1
    rounded = torch.round(folded)
    clamped = rounded.clamp(lowest, maxq)
    s = scales.float()
    delta = s * (original - folded)  # D, as the fold holds it
    error = s * (folded - clamped)  # D_int - D
    report = LayerRounding(
        name=name,
        delta_sq=float(delta.double().square().sum()),
        error_sq=float(error.double().square().sum()),
        max_error_steps=float((folded - clamped).abs().max()) if folded.numel() else 0.0,
        clamped_groups=int((clamped != rounded).sum()),
    )
    return clamped.to(torch.int64), report


class RoundingLossError(ValueError):
    """A merge into integer zero points would lose more of the adapter than allowed, or leave the grid."""

    def __init__(self, report: MergeReport, max_rounding_loss: float) -> None:
        self.report = report
        alternatives = (
            "Exact alternatives: `merge_and_unload()` (real-valued zero points; loads with `import peft_qalora`), "
            "or serve the adapter unmerged with PEFT."
        )
        if report.clamped_groups:
            clamping = [layer.name for layer in report.layers if layer.clamped_groups]
            message = (
                f"Merging into integer zero points would push {report.clamped_groups} zero points outside the "
                f"quantization grid (in {clamping[:5]}{' ...' if len(clamping) > 5 else ''}); clamping them would "
                f"change the weights arbitrarily, so nothing was changed. {alternatives}"
            )
        else:
            hint = getattr(
                report, "refusal_hint", "The adapter moves the zero points by less than the integer grid can express."
            )
            message = (
                f"Merging into integer zero points would lose {report.lost:.1%} of the adapter's effect (allowed: "
                f"{max_rounding_loss:.1%}); nothing was changed. {hint} {report.summary()}. {alternatives} Pass "
                "`max_rounding_loss=1.0` to merge anyway."
            )
        super().__init__(message)


def check_rounding(report: MergeReport, max_rounding_loss: float) -> None:
    """Log the report; refuse clamped zero points, or a loss above ``max_rounding_loss``."""
    logger.info("QA-LoRA merge: %s", report.summary())
    if report.clamped_groups or report.lost > max_rounding_loss:
        raise RoundingLossError(report, max_rounding_loss)
