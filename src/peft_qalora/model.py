# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""`QALoraModel`, the PEFT tuner that injects QA-LoRA layers into the GPTQ layers of a model."""

from __future__ import annotations

import logging
from typing import Any, Optional

from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _ExcludedModule,
    check_target_module_exists,
)
from torch import nn

from . import model_merge
from .calibration import CalibrationData
from .config import TRANSFORMERS_MODELS_TO_QALORA_TARGET_MODULES_MAPPING, QALoraConfig, base_quantization
from .gptq import check_group_layout, is_gptq_layer, layer_facts
from .gptq_kernels import (
    check_unadapted_layers_trainable,
    gptq_layout_problem,
    pin_unadapted_layers,
    refusal_hint,
    release_gptq_layout,
)
from .layer import QALoraLayer, QALoraLinear
from .merge import DEFAULT_MAX_ROUNDING_LOSS, MergeReport
from .problems import format_problems

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"


def _base_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def gptq_layer_names(model: nn.Module) -> list[str]:
    """Names of every GPTQ linear layer of ``model`` but its output head (what ``"all-linear"`` selects)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if module is output or not is_gptq_layer(module):
            continue
        if any(part.startswith(QALoraModel.prefix) for part in name.split(".")):
            continue  # inside an existing adapter layer
        names.append(name.removesuffix(".base_layer"))
    return names


def _bits(model: nn.Module) -> int | str:
    """The model's GPTQ bits, for error messages that show the ``GPTQConfig(bits=...)`` line to use."""
    return (base_quantization(model) or {}).get("bits", "...")


class QALoraModel(BaseTuner):
    """Injects QA-LoRA adapters into a GPTQ-quantized model.

    Use it through PEFT: ``get_peft_model(model, QALoraConfig(...))`` or ``PeftModel.from_pretrained``. Every
    targeted module must be a GPTQModel GPTQ layer; all targets are checked before the model is changed.
    """

    prefix: str = "qalora_"
    tuner_layer_cls = QALoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_QALORA_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: QALoraConfig, model_config: dict) -> QALoraConfig:
        if peft_config.target_modules is None and model_config.get("model_type") not in self.target_module_mapping:
            raise ValueError(
                f"No default QA-LoRA targets for model_type={model_config.get('model_type')!r}: pass "
                f"`target_modules` (module names, a regex, or {ALL_LINEAR!r} for every GPTQ linear layer)."
            )
        return super()._prepare_adapter_config(peft_config, model_config)

    def _prepare_model(self, peft_config: QALoraConfig, model: nn.Module) -> None:
        """Resolve ``"all-linear"`` and check every target before any module is replaced."""
        # How the base's zeros read in memory depends on the checkpoint they were loaded from.
        self._checkpoint_format = (base_quantization(model) or {}).get("checkpoint_format")
        if isinstance(peft_config.target_modules, str) and peft_config.target_modules.lower() == ALL_LINEAR:
            names = gptq_layer_names(model)
            if not names:
                raise ValueError(
                    "target_modules='all-linear' found no GPTQ layer: the model is not GPTQ-quantized. Load a GPTQ "
                    "checkpoint (its config has quantization_config.quant_method='gptq') to train QA-LoRA."
                )
            peft_config.target_modules = set(names)

        problems: list[str] = []
        kernel_problems: list[str] = []
        facts = {}
        for name, module in model.named_modules():
            if not name or any(part.startswith(self.prefix) for part in name.split(".")):
                continue
            matched = check_target_module_exists(peft_config, name)
            if not matched or isinstance(matched, _ExcludedModule):
                continue
            base = _base_of(module)
            if not is_gptq_layer(base):
                problems.append(
                    f"{name} ({type(base).__name__}) is not a GPTQ layer; QA-LoRA folds into GPTQ zero points, so it "
                    "adapts only GPTQ-quantized linear layers"
                )
                continue
            layout_problem = gptq_layout_problem(base)
            if layout_problem:
                kernel_problems.append(f"{name}: {layout_problem}")
                continue
            facts[name] = layer_facts(base)
            problem = check_group_layout(facts[name], base.g_idx)
            if problem:
                problems.append(f"{name}: {problem}")
        if kernel_problems:
            raise ValueError(
                "Cannot add the QA-LoRA adapter; nothing was changed. QA-LoRA reads the quantization groups and zero "
                "points from the GPTQ tensors, trains through them and folds into them, and these layers no longer "
                "hold them:" + format_problems(kernel_problems) + "\n" + refusal_hint(_bits(model))
            )
        if problems:
            raise ValueError(
                "Cannot add the QA-LoRA adapter; nothing was changed. Fix `target_modules`/`exclude_modules` or the "
                "base model:" + format_problems(problems)
            )
        if not peft_config.inference_mode:
            check_unadapted_layers_trainable(model, set(facts), _bits(model))
        self._check_recorded_base(peft_config, facts)

    @staticmethod
    def _check_recorded_base(peft_config: QALoraConfig, facts: dict) -> None:
        """Compare the base with the one the adapter was trained on (if recorded), or record it."""
        if not peft_config.base_layers:
            peft_config.base_layers = {name: fact.to_dict() for name, fact in facts.items()}
            return
        problems = []
        for name, recorded in peft_config.base_layers.items():
            if name not in facts:
                problems.append(f"{name}: the adapter has this layer, the base model has no matching GPTQ layer")
                continue
            problems.extend(f"{name}: {mismatch}" for mismatch in facts[name].mismatches(recorded))
        if problems:
            raise ValueError(
                "This QA-LoRA adapter was trained on a different GPTQ base model; its groups would not match the "
                "quantization groups of this one. Load it onto the base it was trained on:" + format_problems(problems)
            )

    def _post_injection_hook(self, model: nn.Module, config: QALoraConfig, adapter_name: str) -> None:
        self._pin_unadapted_layers(model)
        if config.base_quantization is None:
            config.base_quantization = base_quantization(model)
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(["qalora", "gptq"])

    def _create_and_replace(
        self,
        peft_config: QALoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        r, lora_alpha = peft_config.rank_and_alpha(current_key)
        kwargs = {
            "r": r,
            "lora_alpha": lora_alpha,
            "lora_dropout": peft_config.lora_dropout,
            "init_lora_weights": peft_config.init_lora_weights,
            "use_rslora": peft_config.use_rslora,
        }
        if isinstance(target, QALoraLinear):
            target.update_layer(adapter_name, inference_mode=peft_config.inference_mode, **kwargs)
            return
        new_module = QALoraLinear(target, adapter_name, checkpoint_format=self._checkpoint_format, **kwargs)
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until it is activated
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _pin_unadapted_layers(self, model: nn.Module) -> None:
        """Keep the GPTQ layers no adapter wraps on their GPTQ-layout path too (``gptq_kernels.pin_gptq_layout``).

        Otherwise an evaluation step during training would switch them, for good, to an inference kernel under
        ``torch.no_grad``, and every adapter before them would get a silently wrong gradient. :meth:`unload` hands the
        kernel its choice back.
        """
        pinned = getattr(self, "_pinned_layers", [])
        pinned.extend(pin_unadapted_layers(model))
        self._pinned_layers = pinned

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        for module in getattr(self, "_pinned_layers", []):
            release_gptq_layout(module)
        self._pinned_layers = []
        return model

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(child, BaseTunerLayer) and not isinstance(new_module, BaseTunerLayer):
            # Unloading: put the GPTQ layer (or its merged replacement) back as it is. PEFT's generic path would
            # copy `weight` onto it, which GPTQModel layers expose as a read-only property.
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    # ------------------------------------------------------------------------------------------------- merging
    # PEFT calls these on the tuner; the merge itself is in model_merge.py.

    def merge_adapter(
        self,
        adapter_names: Optional[list[str]] = None,
        safe_merge: bool = False,
        zero_format: str = "float",
        max_rounding_loss: float = DEFAULT_MAX_ROUNDING_LOSS,
        calibration: Optional[CalibrationData] = None,
        tokenizer: Any = None,
        **calibration_options: Any,
    ) -> Optional[MergeReport]:
        """Fold the adapters into the GPTQ zero points, keeping the adapter layers (``unmerge_adapter`` undoes it).

        See :meth:`merge_and_unload` for the arguments. Returns the rounding report of an integer merge.
        """
        return model_merge.fold_all(
            self, adapter_names, zero_format, max_rounding_loss, False, calibration, tokenizer, **calibration_options
        )

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
        zero_format: str = "float",
        max_rounding_loss: float = DEFAULT_MAX_ROUNDING_LOSS,
        calibration: Optional[CalibrationData] = None,
        tokenizer: Any = None,
        **calibration_options: Any,
    ) -> nn.Module:
        """Fold the adapters into the GPTQ zero points and return the base model with no adapter left.

        Args:
            progressbar: Show a progress bar over the layers.
            safe_merge: Accepted for PEFT compatibility; non-finite adapter weights are always refused.
            adapter_names: Adapters to merge (default: the active ones).
            zero_format: ``"float"`` (default) stores ``z' = z - D / s`` exactly as fp32 zero points: the merged
                model equals the adapter model and saves as a ``peft_qalora`` checkpoint that loads after
                ``import peft_qalora``. ``"int"`` rounds the zero points to the GPTQ grid, which stock GPTQ
                loaders read, but usually loses most of a trained adapter; the loss is measured first.
            max_rounding_loss: With ``zero_format="int"``, refuse (raising :class:`RoundingLossError`, model
                unchanged) when rounding would lose more than this share of the adapter's effect. Zero points
                pushed outside the grid are always refused. A calibrated merge is judged on its own measured loss
                on the calibration inputs' layer outputs.
            calibration: With ``zero_format="int"``: calibration data (text, a list of texts, token ids, or a
                ``pathlib.Path`` to a text / ``.json`` / ``.jsonl`` file; see :mod:`peft_qalora.calibration`) from the
                fine-tuning distribution. The merge then also changes integer codes and zero points, on the base's
                grid, so that each merged layer's output on these inputs matches the adapter model's
                (:mod:`peft_qalora.calibrated_merge`); the report measures what it keeps on those outputs.
            tokenizer: Tokenizes text calibration data (default: the one saved with the base model's folder).
            calibration_options: ``calibration_seq_len`` (tokens per block, default 512), ``calibration_max_tokens``
                (default 32768), ``calibration_method`` (``"sequential"``, the default, ``"greedy"`` (faster, keeps
                less), ``"codes"``, ``"zeros"`` or ``"both"``; :mod:`peft_qalora.calibrated_merge`).

        Returns:
            The merged transformers model. After an integer merge its ``qalora_merge_report`` attribute holds the
            :class:`MergeReport`. Its ``save_pretrained`` and ``push_to_hub`` also write the model card
            (``README.md``: base model, quantization, adapter, zero format, merge report).
        """
        return model_merge.merge_and_unload(
            self,
            progressbar,
            adapter_names,
            zero_format,
            max_rounding_loss,
            calibration,
            tokenizer,
            **calibration_options,
        )
