# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""QA-LoRA for GPTQ models as a PEFT tuner.

``import peft_qalora`` registers the ``QALORA`` method with PEFT, after which the stock PEFT API works with
:class:`QALoraConfig`: ``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``,
``save_pretrained``, ``push_to_hub``. Without the import, PEFT fails on a QALORA adapter with
``KeyError: 'QALORA'``.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from .calibrated_merge import CalibratedMergeReport
from .calibration import CalibrationError
from .config import QALoraConfig
from .convert import convert_adapter
from .export.gguf import export_gguf
from .export.gguf_lora import export_gguf_lora
from .export.mlx import export_mlx
from .float_zero_linear import FloatZeroGPTQLinear
from .fsdp import prepare_model_for_fsdp
from .layer import QALoraLayer, QALoraLinear
from .merge import MergeReport, RoundingLossError
from .model import QALoraModel
from .model_card import write_model_card
from .offline_merge import merge_checkpoint
from .peft_type import QALORA
from .quantizer import QALoraGPTQConfig, register_with_transformers
from .save_hooks import install_peft_hooks

__version__ = "0.1.0"

__all__ = [
    "QALORA",
    "CalibratedMergeReport",
    "CalibrationError",
    "FloatZeroGPTQLinear",
    "MergeReport",
    "QALoraConfig",
    "QALoraGPTQConfig",
    "QALoraLayer",
    "QALoraLinear",
    "QALoraModel",
    "RoundingLossError",
    "__version__",
    "convert_adapter",
    "export_gguf",
    "export_gguf_lora",
    "export_mlx",
    "merge_checkpoint",
    "prepare_model_for_fsdp",
    "write_model_card",
]

if QALORA not in PEFT_TYPE_TO_CONFIG_MAPPING:  # a second import or a reload registers nothing twice
    register_peft_method(name="qalora", config_cls=QALoraConfig, model_cls=QALoraModel, prefix=QALoraModel.prefix)
register_with_transformers()
install_peft_hooks()  # QALORA models' save_pretrained / push_to_hub write the QA-LoRA model card
