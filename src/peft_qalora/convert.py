# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Convert adapters between QA-LoRA (``QALORA``), PEFT's LoRA ``use_qalora`` variant, and plain LoRA.

The three formats can hold the same function of a GPTQ layer, ``y = base(x) + scaling * B @ A' @ x``, with a
group-constant ``A'`` (DESIGN.md, "The adapter"); they differ only in how they store ``A``:

* ``qalora`` (this package): ``A`` is r x groups and multiplies the group *mean* over the layer's real quantization
  groups (its ``g_idx``, act-order included).
* ``peft-lora``: PEFT's ``LoraConfig(use_qalora=True, qalora_group_size=gs)``. ``A`` is r x (in_features / gs) and
  multiplies the mean over *contiguous* blocks of ``gs`` channels times ``in_features / gs``, so
  ``A_qalora = A_peft * in_features / gs``. It cannot express act-order groups.
* ``lora``: a plain LoRA with ``A'[:, k] = A[:, g_idx[k]] / count(g_idx[k])`` (r x in_features). Every LoRA runtime
  applies it on the unchanged GPTQ base, act-order included, but it no longer says that it can be merged.

``B``, ``r``, ``lora_alpha`` and ``use_rslora`` carry over unchanged in every direction. Every input is checked
before anything is written (reading and checking the inputs is :mod:`peft_qalora.convert_inputs`), and the output
folder appears atomically.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch
from peft import LoraConfig, PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from .checkpoint import atomic_folder, check_output_folder
from .config import QUANTIZATION_KEYS, QALoraConfig
from .convert_inputs import (
    _KEY_PREFIX,
    _check_representable,
    _load_config,
    _local_base,
    _qalora_layers,
    _raise_problems,
    _read_base_groups,
    _read_weights,
    _refuse_act_order,
    _refuse_partial_groups,
    _shape_problem,
)
from .gptq import check_group_layout, group_counts

logger = logging.getLogger(__name__)

CONVERSION_TARGETS = ("qalora", "peft-lora", "lora")


def convert_adapter(
    in_dir: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    to: str,
    *,
    base_model_dir: Optional[Union[str, os.PathLike]] = None,
    overwrite: bool = False,
) -> None:
    """Convert the adapter saved in ``in_dir`` into another format with the same function, written to ``out_dir``.

    Args:
        in_dir: An adapter folder as ``save_pretrained`` writes it (``adapter_config.json`` and
            ``adapter_model.safetensors``).
        out_dir: The folder for the converted adapter; written atomically (nothing appears there on error).
        to: The output format:

            * ``"qalora"``: from a PEFT LoRA adapter with ``use_qalora=True`` to a ``QALORA`` adapter (loads after
              ``import peft_qalora``; mergeable into the GPTQ zero points). The base must have no act-order and a
              GPTQ group size that divides ``qalora_group_size``.
            * ``"peft-lora"``: from a ``QALORA`` adapter to PEFT's ``LoraConfig(use_qalora=True)`` format, which
              stock PEFT loads without this package. Not possible for an act-order base.
            * ``"lora"``: from a ``QALORA`` adapter to a plain LoRA adapter for any LoRA runtime (PEFT, vLLM,
              SGLang, GPTQModel) on the unchanged GPTQ base, act-order included.

        base_model_dir: The GPTQ checkpoint folder of the base model. Needed to read group sizes and act-order
            maps where the adapter does not record them (always for ``"qalora"``; for ``"lora"`` when the base uses
            act-order). Defaults to the adapter's ``base_model_name_or_path`` when that is a local folder. When
            given, the adapter is also checked against it.
        overwrite: Replace a non-empty ``out_dir``.

    Raises:
        ValueError: The input is not the adapter type ``to`` converts from, uses features the output format
            cannot represent, does not match the base model, or ``out_dir`` is not empty (without ``overwrite``).
    """
    in_dir, out_dir = os.fspath(in_dir), os.fspath(out_dir)
    base_model_dir = os.fspath(base_model_dir) if base_model_dir is not None else None
    if to not in CONVERSION_TARGETS:
        raise ValueError(f"Unknown conversion target {to!r}; choose one of {', '.join(CONVERSION_TARGETS)}.")
    check_output_folder(out_dir, overwrite)
    if to == "qalora":
        config, tensors = _peft_qalora_to_qalora(in_dir, base_model_dir)
    elif to == "peft-lora":
        config, tensors = _qalora_to_peft_qalora(in_dir, base_model_dir)
    else:
        config, tensors = _qalora_to_lora(in_dir, base_model_dir)
    # PEFT holds target_modules as a set, which would be written in hash order: sort it for reproducible output.
    config.target_modules = sorted(config.target_modules)
    with atomic_folder(out_dir) as tmp:
        config.save_pretrained(tmp)  # the config class's own serialization: exactly what its loader expects
        save_file(tensors, os.path.join(tmp, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    logger.info("Converted %d layers of %s into a %r adapter in %s", len(tensors) // 2, in_dir, to, out_dir)


# ------------------------------------------------------------------------------------------------ the directions


def _peft_qalora_to_qalora(in_dir: str, base_model_dir: Optional[str]) -> tuple[QALoraConfig, dict]:
    """A PEFT ``use_qalora`` LoRA adapter as a QALORA adapter: ``A`` rescaled from PEFT's pooling to the group mean."""
    source = _load_config(in_dir, LoraConfig, "qalora")
    if not source.use_qalora:
        raise ValueError(
            f"{in_dir} is a plain LoRA adapter (use_qalora is false). Its weight change is not constant inside each "
            "quantization group, so it cannot become a QA-LoRA adapter or be merged into GPTQ zero points. Only PEFT "
            "LoRA adapters trained with `LoraConfig(use_qalora=True)` convert to 'qalora'."
        )
    _check_representable(in_dir, source)
    weights = _read_weights(in_dir, "lora_")
    base_dir = base_model_dir or _local_base(source)
    if base_dir is None:
        raise ValueError(
            f"Converting {in_dir} to 'qalora' needs the GPTQ base checkpoint to read its quantization groups, and the "
            f"adapter's base_model_name_or_path ({source.base_model_name_or_path!r}) is not a local folder. Pass the "
            "base model folder (base_model_dir= / --base)."
        )
    quantization, groups = _read_base_groups(base_dir, list(weights))
    _refuse_act_order(
        {module: facts for module, (facts, _) in groups.items()},
        f"the base {base_dir} uses act-order (desc_act)",
        "PEFT's use_qalora pooled contiguous blocks of channels: the adapter's weight change is not constant inside "
        "each quantization group, so it is not a QA-LoRA adapter of this base and cannot be merged into its zero "
        "points. Train a QA-LoRA adapter with `QALoraConfig`, which pools over the base's real groups",
    )

    pool = source.qalora_group_size
    _refuse_partial_groups(in_dir, pool, {module: facts for module, (facts, _) in groups.items()})
    tensors, problems = {}, []
    for module, (A, B) in weights.items():
        facts, g_idx = groups[module]
        problem = check_group_layout(facts, g_idx)
        problem = problem or _shape_problem(A, B, _rank(source, module), facts.in_features // pool, facts)
        if problem:
            problems.append(f"{module}: {problem}")
            continue
        # PEFT pools blocks of `pool` channels, m whole quantization groups each, and multiplies the block mean by
        # in_features / pool. The same function on the group means: each group gets its block's column / m.
        m = pool // facts.group_size
        A_ours = A.float().repeat_interleave(m, dim=1) * (facts.in_features // pool) / m
        tensors.update(_layer_tensors(module, "qalora_", A_ours.to(A.dtype), B))
    _raise_problems(problems, f"{in_dir} cannot be converted to a QA-LoRA adapter for {base_dir}")

    config = QALoraConfig(
        **_common_fields(source, sorted(weights)),
        base_model_name_or_path=source.base_model_name_or_path or base_dir,
        base_quantization={key: quantization[key] for key in QUANTIZATION_KEYS if key in quantization},
        base_layers={module: groups[module][0].to_dict() for module in sorted(weights)},
    )
    return config, tensors


def _qalora_to_peft_qalora(in_dir: str, base_model_dir: Optional[str]) -> tuple[LoraConfig, dict]:
    """A QALORA adapter as PEFT's ``LoraConfig(use_qalora=True)`` adapter: ``A`` scaled by ``group_size / in``."""
    source = _load_config(in_dir, QALoraConfig, "peft-lora")
    layers = _qalora_layers(in_dir, source, base_model_dir, need_g_idx=False)
    _refuse_act_order(
        {module: layer.facts for module, layer in layers.items()},
        f"the base of {in_dir} uses act-order (desc_act)",
        "PEFT's use_qalora pools contiguous blocks of channels and cannot express these groups. Convert to 'lora' "
        "instead: a plain LoRA adapter keeps act-order groups exactly",
    )
    partial = [module for module, layer in layers.items() if layer.facts.has_partial_group]
    if partial:
        facts = layers[partial[0]].facts
        raise ValueError(
            f"Cannot convert {in_dir} to PEFT's use_qalora: {len(partial)} adapted layers (e.g. {partial[0]}, "
            f"in_features={facts.in_features}, group_size={facts.group_size}) end in a partial quantization group, "
            "and PEFT's use_qalora requires in_features to be a multiple of qalora_group_size. Convert to 'lora' "
            "instead: a plain LoRA adapter holds partial groups exactly."
        )
    group_sizes = sorted({layer.facts.group_size for layer in layers.values()})
    if len(group_sizes) > 1:
        raise ValueError(
            f"{in_dir} adapts layers with different GPTQ group sizes {group_sizes}, but PEFT's use_qalora has one "
            "qalora_group_size for all layers. Convert to 'lora' instead."
        )
    tensors = {}
    for module, layer in layers.items():
        A_peft = layer.A.float() * (layer.facts.group_size / layer.facts.in_features)
        tensors.update(_layer_tensors(module, "lora_", A_peft.to(layer.A.dtype), layer.B))
    config = LoraConfig(**_lora_fields(source, sorted(layers)), use_qalora=True, qalora_group_size=group_sizes[0])
    return config, tensors


def _qalora_to_lora(in_dir: str, base_model_dir: Optional[str]) -> tuple[LoraConfig, dict]:
    """A QALORA adapter as a plain LoRA adapter: ``A'[:, k] = A[:, g_idx[k]] / count(g_idx[k])``."""
    source = _load_config(in_dir, QALoraConfig, "lora")
    layers = _qalora_layers(in_dir, source, base_model_dir, need_g_idx=True)
    tensors = {}
    for module, layer in layers.items():
        A_plain = plain_lora_A(layer.A, layer.g_idx)
        tensors.update(_layer_tensors(module, "lora_", A_plain.to(layer.A.dtype), layer.B))
    return LoraConfig(**_lora_fields(source, sorted(layers))), tensors


def plain_lora_A(A: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """QA-LoRA's ``A`` (r x groups) as a plain LoRA ``A'`` (r x in_features, fp32) with the same function.

    QA-LoRA multiplies ``A`` with the mean of each quantization group, so column ``k`` of ``A'`` is the column of
    ``k``'s group divided by the number of channels in that group (a partial last group has fewer).
    """
    g_idx = g_idx.to(torch.int64)
    counts = group_counts(g_idx, A.shape[1]).float()
    return (A.detach().float() / counts)[:, g_idx]


def _rank(config: LoraConfig, module: str) -> int:
    """The rank of ``module`` after ``rank_pattern``, matched the way PEFT matches it."""
    key = get_pattern_key((config.rank_pattern or {}).keys(), module)
    return (config.rank_pattern or {}).get(key, config.r)


# ------------------------------------------------------------------------------------------------------- output


def _common_fields(source: PeftConfig, modules: list[str]) -> dict:
    """What every output config carries over. Targets are the adapted modules by exact name: the selection
    (patterns, excludes, layer indices) was already resolved when the source was created."""
    return {
        "r": source.r,
        "lora_alpha": source.lora_alpha,
        "lora_dropout": source.lora_dropout,
        "use_rslora": source.use_rslora,
        "rank_pattern": dict(source.rank_pattern or {}),
        "alpha_pattern": dict(source.alpha_pattern or {}),
        "target_modules": modules,
        "task_type": source.task_type,
        "revision": source.revision,
        "inference_mode": True,  # what `save_pretrained` records
    }


def _lora_fields(source: QALoraConfig, modules: list[str]) -> dict:
    return {
        **_common_fields(source, modules),
        "base_model_name_or_path": source.base_model_name_or_path,
        "bias": "none",
    }


def _layer_tensors(module: str, prefix: str, A: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        f"{_KEY_PREFIX}{module}.{prefix}A.weight": A.contiguous(),
        f"{_KEY_PREFIX}{module}.{prefix}B.weight": B.contiguous(),
    }
