# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Sequential calibration: solve the calibrated integer merge block by block on the merged model's own inputs.

The one-shot calibration (:func:`peft_qalora.calibration.layer_hessians`) gives every layer the Hessian of its
inputs in the adapter model and asks it to reproduce the adapter's change on those inputs. Each layer then keeps
what it can, and what it cannot keep accumulates through the layers after it. The sequential calibration does what
GPTQ does when it quantizes (Frantar et al., arXiv 2210.17323): it runs the model one decoder block at a time, and
within a block one group of layers at a time (the layers that read the same input: q/k/v, then o, gate/up, down),
on two streams of hidden states, the adapter model's and the merged model's so far. A layer's target is the adapter
model's output; its inputs are the merged model's. Per output row ``n``, with ``X_m`` the merged model's inputs,
``y_a`` the adapter model's output of the layer and ``y_m = X_m W^T`` the base layer's on the merged inputs:

    || X_m (W + v)_n^T - y_a,n ||^2 = v_n H v_n^T - 2 v_n . b_n + e_n,
    H = X_m^T X_m,   b_n = X_m^T (y_a - y_m)_n,   e_n = ||(y_a - y_m)_n||^2,

so :func:`peft_qalora.calibrated_merge.solve_layer` minimises it with ``linear = b`` and ``start_energy = e``. A
later layer's target then holds what the layers before it missed, and it can make up for part of it.

Only one block's statistics are held at a time (one ``in x in`` sum per group of layers, one ``in x out`` sum per
layer), and the two streams of hidden states (tokens x hidden each), instead of every layer's Hessian at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_SEQ_LEN,
    CalibrationData,
    equal_length_batches,
    model_calibration_blocks,
)
from .gptq import unpack_qweight
from .merge import read_zero_points

logger = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needed has been seen."""


@dataclass
class LayerTarget:
    """What one layer's calibrated merge minimises, on the merged model's inputs (module docstring)."""

    hessian: torch.Tensor  # (in, in) X_m^T X_m / tokens
    linear: torch.Tensor  # (out, in) b / tokens
    start_energy: torch.Tensor  # (out,) e / tokens, fp64


@dataclass
class _Batch:
    args: tuple  # the block's positional arguments after the hidden states
    kwargs: dict[str, Any]  # attention mask, position embeddings, ...
    adapter: torch.Tensor  # hidden states entering the block in the adapter model
    merged: torch.Tensor | None = None  # ... and in the merged model so far


def repeated_blocks(model: nn.Module, layers: dict[str, nn.Module]) -> nn.ModuleList | None:
    """The model's list of decoder blocks if every layer in ``layers`` lies inside one of them, else ``None``."""
    best, inside = _blocks_holding(model, layers)
    return best if len(inside) == len(layers) else None


def outside_blocks(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    """Names of the layers in ``layers`` that no block of the model's list of decoder blocks holds."""
    _, inside = _blocks_holding(model, layers)
    return [name for name, module in layers.items() if id(module) not in inside]


def _blocks_holding(model: nn.Module, layers: dict[str, nn.Module]) -> tuple[nn.ModuleList | None, set[int]]:
    """The ``nn.ModuleList`` (of at least 2 blocks) holding most of ``layers``, and the ids of those it holds."""
    wanted = {id(m) for m in layers.values()}
    best, best_inside = None, set()
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        inside = {id(m) for block in module for m in block.modules()} & wanted
        if len(inside) > len(best_inside):
            best, best_inside = module, inside
    return best, best_inside


def _first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _block_inputs(model: nn.Module, first_block: nn.Module, batches: list[torch.Tensor]) -> list[_Batch]:
    """The hidden states and keyword arguments entering the first block, for each batch of token ids."""
    captured: list[_Batch] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(_Batch(tuple(args[1:]), kwargs, hidden.detach()))
        raise _Stop

    handle = first_block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError("The sequential calibration could not capture the inputs of the model's first block.")
    return captured


def _stages(block: nn.Module, names: dict[nn.Module, str], batch: _Batch) -> list[list[nn.Module]]:
    """The block's adapted layers in call order, grouped by the input tensor they read (q/k/v, o, gate/up, down)."""
    order: list[tuple[nn.Module, tuple]] = []
    keep_alive = []

    def pre_hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        keep_alive.append(x)
        order.append((module, (x.data_ptr(), tuple(x.shape))))

    handles = [m.register_forward_pre_hook(pre_hook) for m in names]
    try:
        block(batch.adapter, *batch.args, **batch.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    stages: list[list[nn.Module]] = []
    keys: list[tuple] = []
    for module, key in order:
        if any(module in stage for stage in stages):
            continue
        if key in keys:
            stages[keys.index(key)].append(module)
        else:
            keys.append(key)
            stages.append([module])
    missing = [names[m] for m in names if not any(m in stage for stage in stages)]
    if missing:
        raise RuntimeError(f"The sequential calibration saw these layers not called by their block: {missing}.")
    return stages


class _DenseBlock:
    """The adapted layers of one block computed as dense fp32 matmuls, in the adapter model or the merged one.

    Each pass over a block would otherwise dequantize every GPTQ layer again; here each layer's weights are
    dequantized once per block: the base ``W``, the adapter model's ``W + dW`` and, once solved, the merged ``W'``.
    """

    def __init__(self, layers: dict[nn.Module, str]) -> None:
        self.base: dict[nn.Module, torch.Tensor] = {}
        self.adapted: dict[nn.Module, torch.Tensor] = {}
        self.merged: dict[nn.Module, torch.Tensor] = {}
        self.bias: dict[nn.Module, torch.Tensor | None] = {}
        self.mode = "adapter"
        for module in layers:
            base, change = dense_weights(module)
            self.base[module], self.adapted[module] = base, base + change
            bias = getattr(module.get_base_layer(), "bias", None)
            self.bias[module] = None if bias is None else bias.detach().to(torch.float32)
            module.forward = self._forward_of(module)  # an instance attribute: hooks still run around it

    def _forward_of(self, module: nn.Module) -> Callable:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            weight = self.adapted[module] if self.mode == "adapter" else self.merged[module]
            return nn.functional.linear(x.to(torch.float32), weight, self.bias[module]).to(x.dtype)

        return forward

    def base_output(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.base[module], self.bias[module])

    def remove(self) -> None:
        for module in self.base:
            del module.forward


def dense_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A QA-LoRA layer's base weight ``W`` and its active adapters' change ``dW`` (out x in each, fp32)."""
    base = layer.get_base_layer()
    g = base.g_idx.to(torch.int64)
    codes = unpack_qweight(base.qweight, int(layer.facts.bits), int(layer.in_features)).to(torch.float32)
    zeros = read_zero_points(base, layer.checkpoint_format)
    weight = (base.scales.to(torch.float32)[g] * (codes - zeros[g])).t().contiguous()
    change = sum(layer.get_delta_weight(name) for name in layer.active_adapters if name in layer.qalora_A)
    return weight, change


def merged_weight(layer: nn.Module, codes: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The dense weight (out x in, fp32) of ``layer``'s base with new integer ``codes`` (in x out) and ``zeros``."""
    base = layer.get_base_layer()
    g = base.g_idx.to(torch.int64)
    return (base.scales.to(torch.float32)[g] * (codes.to(torch.float32) - zeros.to(torch.float32)[g])).t().contiguous()


@torch.no_grad()
def sequential_solve(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: list[torch.Tensor],
    solve: Callable[[str, LayerTarget], tuple[torch.Tensor, torch.Tensor]],
    progressbar: bool = False,
) -> None:
    """Run the sequential calibration over ``model``'s blocks, calling ``solve`` for every layer in ``layers``.

    ``solve(name, target)`` returns the layer's new integer codes (in x out) and zero points (groups x out); the
    merged stream computes the layer with them from then on. The model itself is not changed (while a block is
    processed its adapted layers compute dense fp32 matmuls instead of their kernels; that is undone on return).

    Args:
        model: The transformers model with the adapters active (its blocks run with their usual arguments).
        layers: Name to QA-LoRA layer; every one must lie inside the model's list of decoder blocks.
        batches: Token id batches (batch x length, equal lengths inside a batch).
    """
    blocks = repeated_blocks(model, layers)
    if blocks is None:
        raise ValueError("The sequential calibration needs every adapted layer inside the model's decoder blocks.")
    was_training = model.training
    model.eval()
    names = {module: name for name, module in layers.items()}
    progress = tqdm(total=len(layers), disable=not progressbar, desc="Calibrated integer merge (sequential)")
    logger.info(
        "Sequential calibration: %d layers in %d blocks on %d tokens",
        len(layers),
        len(blocks),
        sum(b.numel() for b in batches),
    )
    try:
        stream = _block_inputs(model, blocks[0], batches)
        for batch in stream:
            batch.merged = batch.adapter
        layout: dict[frozenset, list[list[str]]] = {}  # blocks of one architecture share their stages
        for block in blocks:
            inside = {m: n for m in block.modules() if (n := names.get(m)) is not None}
            relative = {m: r for r, m in block.named_modules() if m in inside}
            dense = _DenseBlock(inside)
            try:
                adapter_outputs: list[torch.Tensor] = []
                key = frozenset(relative.values())
                if inside and key not in layout:
                    layout[key] = [[relative[m] for m in stage] for stage in _stages(block, inside, stream[0])]
                stages = [[block.get_submodule(r) for r in stage] for stage in layout.get(key, [])]
                for number, stage in enumerate(stages):
                    # The last stage's adapter passes run to the block's end: they give the next block's inputs.
                    targets, adapter_outputs = _stage_targets(
                        block, stage, stream, dense, finish=number == len(stages) - 1
                    )
                    for module in stage:
                        codes, zeros = solve(inside[module], targets.pop(module))
                        dense.merged[module] = merged_weight(module, codes, zeros)
                        progress.update(1)
                    del targets
                dense.mode = "merged"
                for batch in stream:
                    batch.merged = _first_output(block(batch.merged, *batch.args, **batch.kwargs))
                dense.mode = "adapter"
                for i, batch in enumerate(stream):
                    batch.adapter = (
                        adapter_outputs[i]
                        if adapter_outputs
                        else _first_output(block(batch.adapter, *batch.args, **batch.kwargs))
                    )
            finally:
                dense.remove()
    finally:
        progress.close()
        model.train(was_training)


def _stage_targets(
    block: nn.Module, stage: list[nn.Module], stream: list[_Batch], dense: _DenseBlock, finish: bool = False
) -> tuple[dict[nn.Module, LayerTarget], list[torch.Tensor]]:
    """``H``, ``b`` and ``e`` of every layer of ``stage`` (layers that read one input), summed over the stream.

    With ``finish``, the adapter model's passes run to the end of the block, and their outputs are returned too.
    """
    last = None if finish else stage[-1]
    outputs: list[torch.Tensor] = []
    seen: dict[Any, torch.Tensor] = {}

    def capture_input(module: nn.Module, args: tuple) -> None:
        seen["x"] = args[0].detach()
        raise _Stop

    def capture_output(module: nn.Module, args: tuple, output: Any) -> None:
        seen[module] = output.detach()
        if module is last:
            raise _Stop  # nothing after it is needed

    hessian = None
    linear: dict[nn.Module, torch.Tensor] = {}
    energy: dict[nn.Module, torch.Tensor] = {}
    tokens = 0
    for batch in stream:
        # The adapter model's outputs of the stage's layers ...
        dense.mode = "adapter"
        handles = [m.register_forward_hook(capture_output) for m in stage]
        try:
            output = block(batch.adapter, *batch.args, **batch.kwargs)
            if finish:
                outputs.append(_first_output(output))
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        # ... and the merged model's input to them.
        dense.mode = "merged"
        handle = stage[0].register_forward_pre_hook(capture_input)
        try:
            block(batch.merged, *batch.args, **batch.kwargs)
        except _Stop:
            pass
        finally:
            handle.remove()
        x = seen.pop("x").reshape(-1, stage[0].in_features).to(torch.float32)
        tokens += x.shape[0]
        hessian = x.t() @ x if hessian is None else hessian.addmm_(x.t(), x)
        for module in stage:
            # y_a - y_m: what the layer's output must gain over the base layer's, on the merged inputs
            residual = seen.pop(module).reshape(x.shape[0], -1).to(torch.float32) - dense.base_output(module, x)
            term = residual.t() @ x
            linear[module] = term if module not in linear else linear[module].add_(term)
            sq = residual.square().sum(0, dtype=torch.float64)
            energy[module] = sq if module not in energy else energy[module].add_(sq)
    dense.mode = "adapter"
    hessian /= tokens
    targets = {m: LayerTarget(hessian, linear[m] / tokens, energy[m] / tokens) for m in stage}
    return targets, outputs


def sequential_calibrated_folds(
    model: nn.Module,
    merging: dict[str, tuple[nn.Module, list[str]]],
    data: CalibrationData,
    tokenizer: Any = None,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progressbar: bool = False,
) -> dict[str, Any]:
    """The sequential calibrated integer merge of every layer in ``merging`` (name -> (QA-LoRA layer, adapters)).

    Returns each layer's :class:`peft_qalora.layer.LayerFold`, computed but not applied. The data is checked
    (:func:`peft_qalora.calibration.model_calibration_blocks`) before anything runs.
    """
    layers = {name: layer for name, (layer, _) in merging.items()}
    outside = outside_blocks(model, layers)
    if outside:
        raise ValueError(
            "calibration_method='sequential' runs the model one decoder block at a time, and these adapted layers "
            f"lie outside its decoder blocks: {outside}. Use calibration_method='greedy' for this model."
        )
    blocks = model_calibration_blocks(model, layers, data, tokenizer, seq_len=seq_len, max_tokens=max_tokens)
    folds = {}

    def solve(name: str, target: LayerTarget) -> tuple[torch.Tensor, torch.Tensor]:
        layer, adapters = merging[name]
        folds[name] = layer.calibrated_fold(
            adapters,
            target.hessian,
            name,
            "greedy",
            linear=target.linear,
            start_energy=target.start_energy,
        )
        return folds[name].codes, folds[name].zeros

    sequential_solve(model, layers, equal_length_batches(blocks), solve, progressbar)
    return folds
