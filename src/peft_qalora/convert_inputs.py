# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Reading and checking what an adapter conversion starts from: the adapter folder and the base's quantization groups.

:mod:`peft_qalora.convert` holds the conversions and their math; this module holds everything they read before
computing anything: the adapter's config and weights (refusing options and tensors a conversion would drop), the
quantization groups of each adapted layer from the adapter's records or the GPTQ base checkpoint, and the checks
that refuse an input before anything is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch
from peft import LoraConfig, PeftConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open
from safetensors.torch import load_file

from .checkpoint import GPTQTensorNames, gptq_quantization, locate_tensors, shard_files
from .config import QALoraConfig, check_weights_file
from .gptq import GPTQLayerFacts, facts_from_tensors
from .problems import format_problems

_KEY_PREFIX = "base_model.model."

# LoraConfig fields a QA-LoRA adapter carries over (or that only describe how the weights were initialised, or
# where they came from). Any other field set away from its default changes what the adapter computes in a way a
# QA-LoRA adapter cannot express (DoRA, biases, modules_to_save, ...), so the conversion refuses it.
_LORA_FIELDS_CARRIED = {
    "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "use_qalora", "qalora_group_size",
}  # fmt: skip
_LORA_FIELDS_IGNORED = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "runtime_config", "init_lora_weights", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "megatron_core", "ensure_weight_tying",
}  # fmt: skip


@dataclass(frozen=True)
class _Layer:
    """One adapted layer: its weights and the quantization groups of its GPTQ base layer."""

    A: torch.Tensor
    B: torch.Tensor
    facts: GPTQLayerFacts
    g_idx: Optional[torch.Tensor]  # None: act-order map recorded only by its digest, base checkpoint not read


# --------------------------------------------------------------------------------------------- reading adapters


def _load_config(in_dir: str, config_cls: type[PeftConfig], to: str) -> PeftConfig:
    """The adapter config of ``in_dir``, refused clearly when it is not the type that converts to ``to``."""
    path = os.path.join(in_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{in_dir} has no {CONFIG_NAME}: it is not a saved PEFT adapter folder.")
    with open(path) as f:
        peft_type = json.load(f).get("peft_type")
    expected = "LORA" if config_cls is LoraConfig else "QALORA"
    if peft_type != expected:
        hint = " A PEFT LoRA adapter with use_qalora=True converts with to='qalora'." if peft_type == "LORA" else ""
        raise ValueError(
            f"Converting to {to!r} needs a {expected} adapter, but {in_dir} holds a {peft_type} adapter.{hint}"
        )
    return config_cls.from_pretrained(in_dir)


def _read_weights(in_dir: str, prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` from ``adapter_model.safetensors``; any other tensor is refused, not dropped."""
    path = os.path.join(in_dir, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"{in_dir} has no {SAFETENSORS_WEIGHTS_NAME}; only safetensors adapters are converted. Save the adapter "
            "with `save_pretrained(..., safe_serialization=True)`."
        )
    check_weights_file(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in load_file(path).items():
        module, _, part = key.removeprefix(_KEY_PREFIX).rpartition(f".{prefix}")
        if key.startswith(_KEY_PREFIX) and part in ("A.weight", "B.weight"):
            parts.setdefault(module, {})[part[0]] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(
            f"{in_dir} holds weights other than {prefix}A/{prefix}B (e.g. {unexpected[:3]}, from modules_to_save or "
            "another option); the conversion carries only the adapter layers, and dropping the rest would change "
            "what the adapter computes."
        )
    incomplete = sorted(module for module, found in parts.items() if set(found) != {"A", "B"})
    if not parts or incomplete:
        raise ValueError(
            f"{in_dir} holds no complete adapter layers ({prefix}A and {prefix}B); incomplete: {incomplete[:5]}."
        )
    return {module: (found["A"], found["B"]) for module, found in sorted(parts.items())}


def _check_representable(in_dir: str, config: LoraConfig) -> None:
    """Refuse LoRA options that a QA-LoRA adapter cannot express (every field outside the known-safe lists)."""
    default = LoraConfig()
    unsupported = [
        f"{f.name}={getattr(config, f.name)!r}"
        for f in fields(LoraConfig)
        if f.name not in _LORA_FIELDS_CARRIED | _LORA_FIELDS_IGNORED
        and not _same_setting(getattr(config, f.name), getattr(default, f.name))
    ]
    if unsupported:
        raise ValueError(
            f"{in_dir} uses LoRA options that a QA-LoRA adapter cannot represent: {', '.join(unsupported)}. A QA-LoRA "
            "adapter is only A (rank x groups) and B (out x rank) on GPTQ layers, so that it folds into the zero "
            "points; train the adapter without these options."
        )


def _same_setting(value: object, default: object) -> bool:
    return value == default or (not value and not default)  # None, [], {} and False all mean "not used"


def _local_base(config: PeftConfig) -> Optional[str]:
    """The adapter's recorded base model, if it is a local folder."""
    path = config.base_model_name_or_path
    return path if path and os.path.isdir(path) else None


def _qalora_layers(
    in_dir: str, config: QALoraConfig, base_model_dir: Optional[str], need_g_idx: bool
) -> dict[str, _Layer]:
    """The QALORA adapter's layers with their quantization groups, from its records or (when needed) the base.

    The base checkpoint is read when given, or when the records cannot tell the groups: a layer the adapter did not
    record, or (``need_g_idx``) an act-order layer, whose ``g_idx`` map only the base holds.
    """
    weights = _read_weights(in_dir, "qalora_")
    recorded = config.base_layers or {}
    needs_base = [m for m in weights if m not in recorded or (need_g_idx and recorded[m].get("act_order"))]
    base_dir = base_model_dir or (_local_base(config) if needs_base else None)
    if needs_base and base_dir is None:
        raise ValueError(
            f"{in_dir} does not record the quantization groups of {len(needs_base)} layers (e.g. {needs_base[0]}; an "
            "act-order g_idx is recorded only as a digest), and its base_model_name_or_path "
            f"({config.base_model_name_or_path!r}) is not a local folder. Pass the GPTQ base checkpoint folder "
            "(base_model_dir= / --base) to read their g_idx."
        )
    if base_dir is None:
        groups = {module: _recorded_groups(recorded[module]) for module in weights}
    else:
        _, groups = _read_base_groups(base_dir, list(weights))
        problems = [f"{m}: {issue}" for m in weights for issue in groups[m][0].mismatches(recorded.get(m, {}))]
        _raise_problems(problems, f"{in_dir} was trained on a different GPTQ base than {base_dir}")

    layers, problems = {}, []
    for module, (A, B) in weights.items():
        facts, g_idx = groups[module]
        problem = _shape_problem(A, B, config.rank_and_alpha(module)[0], facts.num_groups, facts)
        if problem:
            problems.append(f"{module}: {problem}")
        layers[module] = _Layer(A, B, facts, g_idx)
    _raise_problems(problems, f"{in_dir} does not match its recorded base layers")
    return layers


def _recorded_groups(recorded: dict) -> tuple[GPTQLayerFacts, Optional[torch.Tensor]]:
    """Facts recorded in a QALORA config, and the ``g_idx`` they imply (``None`` for act-order)."""
    facts = GPTQLayerFacts(**{f.name: recorded[f.name] for f in fields(GPTQLayerFacts)})
    canonical = None if facts.act_order else torch.arange(facts.in_features) // facts.group_size
    return facts, canonical


# ----------------------------------------------------------------------------------------- reading the base model


def _read_base_groups(base_dir: str, modules: list[str]) -> tuple[dict, dict[str, tuple[GPTQLayerFacts, torch.Tensor]]]:
    """The base's ``quantization_config`` and, per module, its layer facts and ``g_idx`` (read lazily from shards)."""
    quantization = gptq_quantization(base_dir)
    files, _ = shard_files(base_dir)
    located = locate_tensors(base_dir, files)
    missing = [m for m in modules if not {GPTQTensorNames(m).g_idx, GPTQTensorNames(m).scales} <= located.keys()]
    if missing:
        more = f" or {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(
            f"{base_dir} has no GPTQ layer (with g_idx and scales) named {missing[0]}{more}: the adapter was "
            "trained on another base model."
        )
    groups = {}
    for module in modules:
        names = GPTQTensorNames(module)
        with safe_open(os.path.join(base_dir, located[names.g_idx]), framework="pt") as f:
            g_idx = f.get_tensor(names.g_idx)
        with safe_open(os.path.join(base_dir, located[names.scales]), framework="pt") as f:
            out_features = f.get_slice(names.scales).get_shape()[1]  # the shape only: scales are never read
        facts = facts_from_tensors(quantization["bits"], int(quantization["group_size"]), out_features, g_idx)
        groups[module] = (facts, g_idx)
    return quantization, groups


# ------------------------------------------------------------------------------------------------------- checks


def _refuse_act_order(facts: dict[str, GPTQLayerFacts], what: str, why: str) -> None:
    act_order = [module for module, layer_facts in facts.items() if layer_facts.act_order]
    if act_order:
        raise ValueError(
            f"Cannot convert: {what}, so the quantization groups of {len(act_order)} adapted layers (e.g. "
            f"{act_order[0]}) are not contiguous blocks of input channels, and {why}."
        )


def _refuse_partial_groups(in_dir: str, pool: int, facts: dict[str, GPTQLayerFacts]) -> None:
    """Refuse PEFT pooling blocks that do not consist of whole quantization groups of the (contiguous) base."""
    partial = {
        module: layer_facts.group_size
        for module, layer_facts in facts.items()
        if pool % layer_facts.group_size or layer_facts.in_features % pool
    }
    if partial:
        module, group_size = next(iter(partial.items()))
        raise ValueError(
            f"Cannot convert {in_dir}: its qalora_group_size={pool} does not match the GPTQ group size {group_size} "
            f"(nor a multiple of it that divides the row) on {len(partial)} adapted layers (e.g. {module}). Its weight "
            "change is not constant inside each quantization group, so it is not a QA-LoRA adapter of this base "
            "and cannot be merged into its zero points."
        )


def _shape_problem(A: torch.Tensor, B: torch.Tensor, r: int, columns: int, facts: GPTQLayerFacts) -> Optional[str]:
    if tuple(A.shape) != (r, columns) or tuple(B.shape) != (facts.out_features, r):
        return (
            f"weights of shapes A {tuple(A.shape)}, B {tuple(B.shape)}; expected A ({r}, {columns}) and "
            f"B ({facts.out_features}, {r}) for rank {r} on this layer"
        )
    return None


def _raise_problems(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"{what}; nothing was written:" + format_problems(problems))
