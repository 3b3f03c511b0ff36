# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Merging a ``QALoraModel`` in memory: fold every adapted layer first, check, and only then change the model.

PEFT calls ``merge_adapter`` and ``merge_and_unload`` on the tuner; those methods are thin calls to :func:`fold_all`
and :func:`merge_and_unload` here. The float merge, the rounding merge and the calibrated integer merge
(:func:`calibrated_folds`, which the offline merge uses too) share one tail: compute every layer's fold, check the
report, apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn
from tqdm.auto import tqdm

from .calibrated_merge import DEFAULT_METHOD, METHODS, CalibratedMergeReport
from .calibration import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN, CalibrationData, layer_hessians
from .card_facts import merged_facts
from .config import base_quantization
from .gptq_kernels import check_unadapted_layers_readable
from .layer import LayerFold, QALoraLinear
from .merge import ZERO_FORMATS, MergeReport, check_rounding
from .merged_model import relabel_integer_merge, store_float_zeros
from .save_hooks import attach_merged_card
from .sequential_calibration import sequential_calibrated_folds

if TYPE_CHECKING:
    from .model import QALoraModel


def merge_and_unload(
    tuner: QALoraModel,
    progressbar: bool,
    adapter_names: Optional[list[str]],
    zero_format: str,
    max_rounding_loss: float,
    calibration: Optional[CalibrationData] = None,
    tokenizer: Any = None,
    **calibration_options: Any,
) -> nn.Module:
    """``QALoraModel.merge_and_unload`` (see there): fold, unload, and label the model and its card for saving."""
    report = fold_all(
        tuner, adapter_names, zero_format, max_rounding_loss, progressbar, calibration, tokenizer, **calibration_options
    )
    merged_configs = {name: tuner.peft_config[name] for name in (adapter_names or tuner.active_adapters)}
    model = tuner._unload_and_optionally_merge(merge=False, progressbar=progressbar)
    if zero_format == "float":
        store_float_zeros(model, base_quantization(model) or {})
    else:
        relabel_integer_merge(model, base_quantization(model) or {})
        model.qalora_merge_report = report
    # `save_pretrained` / `push_to_hub` of the merged model write its card (README.md) too
    attach_merged_card(model, merged_facts(merged_configs, zero_format, report, architecture=type(model).__name__))
    return model


def fold_all(
    tuner: QALoraModel,
    adapter_names: Optional[list[str]],
    zero_format: str,
    max_rounding_loss: float,
    progressbar: bool,
    calibration: Optional[CalibrationData] = None,
    tokenizer: Any = None,
    **calibration_options: Any,
) -> Optional[MergeReport]:
    """Fold every layer first, check the rounding loss, and only then change the model (all or nothing)."""
    if zero_format not in ZERO_FORMATS:
        raise ValueError(f"zero_format must be one of {ZERO_FORMATS}, got {zero_format!r}.")
    if calibration is not None and zero_format != "int":
        raise ValueError("`calibration` applies to the integer merge: pass zero_format='int' with it.")
    tuner._check_merge_allowed()
    if zero_format == "float":
        check_unadapted_layers_readable(tuner.model)
    layers = {name: m for name, m in tuner.model.named_modules() if isinstance(m, QALoraLinear)}
    if calibration is not None:
        folds = calibrated_folds(
            tuner, layers, adapter_names, calibration, tokenizer, progressbar, **calibration_options
        )
        report_type = CalibratedMergeReport
    else:
        folds: dict[str, LayerFold] = {}
        for name, layer in tqdm(layers.items(), disable=not progressbar, desc="Folding adapters into zero points"):
            names = check_adapters_to_merge(layer, adapter_names)
            if names:
                folds[name] = layer.fold_adapters(names, zero_format, name)
        report_type = MergeReport
    report = None
    if zero_format == "int":
        report = report_type([layer_fold.rounding for layer_fold in folds.values()])
        check_rounding(report, max_rounding_loss)
    for name, layer_fold in folds.items():
        layers[name].apply_fold(layer_fold)
    return report


def calibrated_folds(
    tuner: QALoraModel,
    layers: dict[str, QALoraLinear],
    adapter_names: Optional[list[str]],
    calibration: CalibrationData,
    tokenizer: Any = None,
    progressbar: bool = False,
    calibration_seq_len: int = DEFAULT_SEQ_LEN,
    calibration_max_tokens: int = DEFAULT_MAX_TOKENS,
    calibration_method: str = DEFAULT_METHOD,
) -> dict[str, LayerFold]:
    """The calibrated integer merge of every layer, computed (the model runs on the data) but not applied."""
    if calibration_method not in METHODS:
        raise ValueError(f"calibration_method must be one of {METHODS}, got {calibration_method!r}.")
    if adapter_names is not None and set(adapter_names) != set(tuner.active_adapters):
        raise ValueError(
            f"A calibrated merge matches the outputs of the model with its active adapters {tuner.active_adapters}; "
            f"to merge {adapter_names}, make them the active ones first (`set_adapter`)."
        )
    merging = {}
    for name, layer in layers.items():
        names = check_adapters_to_merge(layer, adapter_names)
        if names:
            merging[name] = (layer, names)
    if not merging:
        return {}
    options = {"seq_len": calibration_seq_len, "max_tokens": calibration_max_tokens, "progressbar": progressbar}
    if calibration_method == "sequential":
        return sequential_calibrated_folds(tuner.model, merging, calibration, tokenizer, **options)
    layer_inputs = {name: layer for name, (layer, _) in merging.items()}
    collector = layer_hessians(tuner.model, layer_inputs, calibration, tokenizer, **options)
    folds = {}
    for name, (layer, names) in tqdm(merging.items(), disable=not progressbar, desc="Calibrated integer merge"):
        folds[name] = layer.calibrated_fold(names, collector.hessian(name), name, calibration_method)
    return folds
