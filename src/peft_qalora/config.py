# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""`QALoraConfig`, the PEFT config of a QA-LoRA adapter."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open

from .peft_type import QALORA

# Default targets per architecture: QA-LoRA adapts every linear projection of the decoder (the paper's
# setting), since each one is a GPTQ layer whose zero points can absorb the adapter.
TRANSFORMERS_MODELS_TO_QALORA_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "olmo2"),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


# The base's GPTQ settings an adapter records (``QALoraConfig.base_quantization``).
QUANTIZATION_KEYS = ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")


def base_quantization(model: Any) -> dict | None:
    """The GPTQ settings of a transformers model's ``quantization_config``, as a plain dict."""
    quantization_config = getattr(getattr(model, "config", None), "quantization_config", None)
    if quantization_config is None:
        return None
    if not isinstance(quantization_config, dict):
        quantization_config = quantization_config.to_dict()
    return {key: quantization_config[key] for key in QUANTIZATION_KEYS if key in quantization_config}


def qalora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """The adapter's output scale: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rank-stabilized LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclass
class QALoraConfig(PeftConfig):
    """Configuration of a QA-LoRA adapter ([arXiv 2309.14717](https://arxiv.org/abs/2309.14717)) on a GPTQ model.

    The adapter computes ``y = base(x) + scaling * B @ A @ pool(dropout(x))`` where ``pool`` averages the input over
    each quantization group of the wrapped GPTQ layer, so ``A`` has one column per group. There is deliberately no
    group-size option: the groups, including an act-order ``g_idx`` map, are read from each GPTQ layer, so the
    adapter always stays foldable into that layer's zero points.

    Args:
        r: Rank of the adapter.
        lora_alpha: Scaling numerator: ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: Dropout on the adapter's input, before pooling.
        target_modules: Module names (exact or suffix match), a regex, or ``"all-linear"`` for every GPTQ linear
            layer but the output head. ``None`` picks the architecture's default (all decoder projections).
        exclude_modules: Module names or a regex to leave out.
        bias: Only ``"none"`` is supported: a trained bias is not part of the quantized weight.
        use_rslora: Use rank-stabilized scaling ``lora_alpha / sqrt(r)``.
        init_lora_weights: ``True`` (Kaiming-uniform ``A``, zero ``B``: the adapter starts as a no-op),
            ``"gaussian"`` (normal ``A`` with std ``1/r``, zero ``B``) or ``False`` (random ``A`` and ``B``; for tests).
        layers_to_transform: Layer indices to adapt; needs a list of ``target_modules``.
        layers_pattern: Name of the ``nn.ModuleList`` holding the layers (e.g. ``"layers"``).
        rank_pattern: Per-module ranks, ``{regex_or_name: r}``.
        alpha_pattern: Per-module alphas, ``{regex_or_name: alpha}``.
        modules_to_save: Extra modules trained fully and saved with the adapter (not merged into GPTQ zeros).
        base_quantization: Filled in by the tuner: the GPTQ settings of the base the adapter was created on.
        base_layers: Filled in by the tuner: per adapted layer, its bits, group size, shapes and a digest of its
            ``g_idx``. Loading the adapter onto a base that differs raises an error naming the layer.
    """

    r: int = field(default=8, metadata={"help": "Adapter rank."})
    lora_alpha: int = field(default=8, metadata={"help": "Adapter scaling numerator."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names, a regex, or 'all-linear' (every GPTQ linear layer but the output head)."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to exclude."}
    )
    bias: Literal["none"] = field(default="none", metadata={"help": "Only 'none' is supported."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale by lora_alpha / sqrt(r)."})
    init_lora_weights: Union[bool, Literal["gaussian"]] = field(
        default=True, metadata={"help": "True (B = 0), 'gaussian', or False (random A and B)."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Indices of the layers to adapt."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    rank_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module ranks."})
    alpha_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module alphas."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules other than adapter layers to train and save."}
    )
    # PEFT reads this attribute of every config; QA-LoRA adapts modules, never bare parameters.
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "Not supported; keep None."})
    base_quantization: Optional[dict] = field(
        default=None, metadata={"help": "Recorded by the tuner: GPTQ settings of the base model."}
    )
    base_layers: Optional[dict] = field(
        default=None, metadata={"help": "Recorded by the tuner: quantization facts of each adapted layer."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = QALORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {self.r!r}.")
        for name, rank in (self.rank_pattern or {}).items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"`rank_pattern[{name!r}]` must be a positive integer, got {rank!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias != "none":
            raise ValueError(
                f"QA-LoRA supports only bias='none', got {self.bias!r}: a trained bias is not part of the GPTQ "
                "weight and could not be merged into the zero points."
            )
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"`init_lora_weights` must be True, False or 'gaussian', got {self.init_lora_weights!r}.")
        if self.target_parameters:
            raise ValueError("QA-LoRA adapts GPTQ linear layers only; `target_parameters` is not supported.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """``r`` and ``lora_alpha`` for one module, after ``rank_pattern`` and ``alpha_pattern``."""
        r_key = get_pattern_key((self.rank_pattern or {}).keys(), module_name)
        alpha_key = get_pattern_key((self.alpha_pattern or {}).keys(), module_name)
        return (self.rank_pattern or {}).get(r_key, self.r), (self.alpha_pattern or {}).get(alpha_key, self.lora_alpha)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load the config of a saved QA-LoRA adapter; refuse other PEFT types and broken local weight files."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if not isinstance(config, cls):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {config.peft_type} adapter, not a QALORA one. Load it with "
                "`PeftModel.from_pretrained`; a PEFT LoRA `use_qalora` adapter can be converted with "
                "`peft-qalora convert`."
            )
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        check_weights_file(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME))
        return config


def check_weights_file(path: str) -> None:
    """Raise a clear error if a local adapter weights file is truncated or not safetensors."""
    if not os.path.isfile(path):
        return  # a Hub repo id, or a folder without weights: PEFT reports what is missing
    try:
        with safe_open(path, framework="pt"):
            pass
    except SafetensorError as exc:
        raise ValueError(
            f"{path} is not a complete safetensors file ({exc}); it was probably truncated while copying or "
            "downloading. Save or download the adapter again."
        ) from exc
