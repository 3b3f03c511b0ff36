# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""What a QA-LoRA model card says (:class:`CardFacts`), gathered from adapter configs, merge reports and models.

The facts are independent of where the files came from: ``model_card.py`` writes them into a card, and a card written
from them holds them again in its ``qalora`` metadata block (:func:`facts_from_card`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from huggingface_hub import ModelCard

from .config import QUANTIZATION_KEYS
from .peft_type import QALORA

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
KINDS = ("adapter", "merged", "gguf", "mlx")
METADATA_KEY = "qalora"
# Metadata a derived model inherits from its base's card when the base is a local folder.
_INHERITED = ("license", "license_name", "license_link", "language")


@dataclass
class CardFacts:
    """What a card says, independent of where the files came from.

    Args:
        kind: ``"adapter"``, ``"merged"``, ``"gguf"`` or ``"mlx"``.
        base_model: Hub id (or local path) of the GPTQ base model.
        quantization: The base's GPTQ settings (``bits``, ``group_size``, ``desc_act``, ``sym``,
            ``checkpoint_format``, ...).
        adapters: ``{adapter name: summary}`` (see :func:`adapter_summary`).
        merge: For merged outputs and exports: zero format, storage and (integer zeros) the rounding report.
        export: Format-specific facts of an export, shown as given (e.g. ``{"format": "Q4_1", "file": "x.gguf"}``).
        pipeline_tag: Hub pipeline tag (``"text-generation"`` for causal language models).
        inherited: Metadata taken over from the base's card (license, language).
    """

    kind: str
    base_model: Optional[str] = None
    quantization: Optional[dict] = None
    adapters: dict[str, dict] = field(default_factory=dict)
    merge: Optional[dict] = None
    export: Optional[dict] = None
    pipeline_tag: Optional[str] = None
    inherited: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}.")
        # Plain YAML types only: configs hold str enums (QuantizationMethod) and sets.
        self.quantization, self.adapters, self.merge, self.export = _plain(
            [self.quantization, self.adapters, self.merge, self.export]
        )

    def metadata(self) -> dict:
        """The ``qalora`` block of the card's YAML metadata."""
        block: dict[str, Any] = {"kind": self.kind}
        if self.quantization:
            block["quantization"] = dict(self.quantization)
        if self.adapters:
            block["adapters"] = {name: dict(summary) for name, summary in self.adapters.items()}
        if self.merge:
            block["merge"] = dict(self.merge)
        if self.export:
            block["export"] = dict(self.export)
        return block


def _plain(value: Any) -> Any:
    """``value`` as JSON types (str enums become their strings, sets sorted lists)."""

    def default(item: Any) -> Any:
        return sorted(item) if isinstance(item, (set, frozenset)) else str(item)

    return json.loads(json.dumps(value, default=default))


def adapter_summary(config: Any) -> dict:
    """Rank, alpha and targets of a QA-LoRA adapter config (a ``QALoraConfig`` or its dict)."""
    values = config if isinstance(config, dict) else config.to_dict()
    layers = sorted(values.get("base_layers") or {})
    targets = values.get("target_modules")
    summary: dict[str, Any] = {"r": values.get("r"), "lora_alpha": values.get("lora_alpha")}
    if layers:
        summary["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in layers})
        summary["layers"] = len(layers)
    elif isinstance(targets, str):
        summary["target_modules"] = targets
    elif targets:
        summary["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in targets})
    for key in ("use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if values.get(key):
            value = values[key]
            summary[key] = sorted(value) if isinstance(value, (set, list, tuple)) else value
    return summary


def merge_summary(zero_format: str, report: Any = None) -> dict:
    """The ``merge`` facts of a merged output: zero format, how it is stored, and the rounding report if any."""
    if zero_format == "float":
        return {"zero_format": "float", "exact": True, "quant_method": "peft_qalora", "format": "gptq_float_zeros"}
    if zero_format != "int":
        raise ValueError(f"zero_format must be 'float' or 'int', got {zero_format!r}.")
    merge: dict[str, Any] = {"zero_format": "int", "quant_method": "gptq", "format": "gptq_v2"}
    if report is not None:
        merge.update(
            exact=report.lost == 0,
            kept=round(float(report.kept), 4),
            max_error_steps=round(float(report.max_error_steps), 4),
            clamped_zero_points=int(report.clamped_groups),
            layers=len(report.layers),
        )
    return merge


def pipeline_tag_for(architecture: Optional[str]) -> Optional[str]:
    """``"text-generation"`` for a causal language model class name, else ``None``."""
    return "text-generation" if architecture and architecture.endswith("ForCausalLM") else None


def base_card_metadata(base_model: Optional[str]) -> dict:
    """License and language from the base's ``README.md`` when the base is a local folder (never the network)."""
    path = os.path.join(base_model, CARD_NAME) if base_model and os.path.isdir(base_model) else None
    if path is None or not os.path.isfile(path):
        return {}
    try:
        data = ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except Exception as exc:  # a broken base card must not stop a save
        logger.warning("Could not read the base model's card %s: %s", path, exc)
        return {}
    return {key: data[key] for key in _INHERITED if data.get(key)}


def merged_facts(
    configs: dict[str, Any],
    zero_format: str,
    report: Any = None,
    architecture: Optional[str] = None,
    quantization: Optional[dict] = None,
) -> CardFacts:
    """Facts of a merged checkpoint, the same from ``merge_and_unload()`` and ``merge_checkpoint()``.

    Args:
        configs: ``{adapter name: QALoraConfig or its dict}`` of the merged adapters.
        zero_format: ``"float"`` or ``"int"``.
        report: The :class:`~peft_qalora.MergeReport` of an integer merge.
        architecture: The model class name (``config.architectures[0]``).
        quantization: The base's GPTQ settings when the adapter did not record them.
    """
    first = next(iter(configs.values()))
    values = first if isinstance(first, dict) else first.to_dict()
    base_model = values.get("base_model_name_or_path")
    quantization = values.get("base_quantization") or quantization or {}
    return CardFacts(
        kind="merged",
        base_model=base_model,
        quantization={key: quantization[key] for key in QUANTIZATION_KEYS if key in quantization} or None,
        adapters={name: adapter_summary(config) for name, config in configs.items()},
        merge=merge_summary(zero_format, report),
        pipeline_tag=pipeline_tag_for(architecture),
        inherited=base_card_metadata(base_model),
    )


def facts_from_card(card: ModelCard) -> Optional[CardFacts]:
    """The facts a QA-LoRA card was written from (its ``qalora`` metadata block), or ``None`` for another card."""
    block = card.data.get(METADATA_KEY)
    if not isinstance(block, dict) or block.get("kind") not in KINDS:
        return None
    return CardFacts(
        kind=block["kind"],
        base_model=card.data.base_model if isinstance(card.data.base_model, str) else None,
        quantization=block.get("quantization"),
        adapters=block.get("adapters") or {},
        merge=block.get("merge"),
        export=block.get("export"),
        pipeline_tag=card.data.pipeline_tag,
    )


def qalora_configs(peft_model: Any) -> dict:
    """``{adapter name: QALoraConfig}`` of the QALORA adapters of a PEFT model (empty for any other model)."""
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict):
        return {}
    return {name: config for name, config in configs.items() if getattr(config, "peft_type", None) == QALORA}


def adapter_facts(peft_model: Any) -> CardFacts:
    """Card facts of a PEFT model holding QALORA adapters."""
    configs = qalora_configs(peft_model)
    first = configs.get("default") or next(iter(configs.values()))
    base = peft_model.get_base_model()
    base_model = first.base_model_name_or_path or getattr(base, "name_or_path", None) or None
    architecture = type(base).__name__
    return CardFacts(
        kind="adapter",
        base_model=base_model,
        quantization=first.base_quantization,
        adapters={name: adapter_summary(config) for name, config in configs.items()},
        pipeline_tag=pipeline_tag_for(architecture),
        inherited=base_card_metadata(base_model),
    )
