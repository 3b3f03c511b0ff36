# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Offline merge: fold a saved QA-LoRA adapter into a GPTQ checkpoint on disk, shard by shard.

For models that do not fit anywhere twice. Only zero-point tensors change (``qweight`` never does), so every
other tensor is copied byte for byte and peak memory stays near one tensor. The output is the checkpoint that
``merge_and_unload()`` followed by ``save_pretrained()`` writes for the same inputs, tensor for tensor.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Optional

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .calibrated_merge import DEFAULT_METHOD, CalibratedMergeReport
from .calibration import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN, CalibrationData, require_tokens
from .card_facts import merged_facts
from .checkpoint import (
    NOT_INHERITED_FILES,
    SAFETENSORS_INDEX,
    GPTQTensorNames,
    atomic_folder,
    check_output_folder,
    gptq_modules,
    gptq_quantization,
    locate_tensors,
    model_architecture,
    read_config,
    read_tensors,
    shard_files,
    tensor_names,
    write_shard,
)
from .config import QALoraConfig, qalora_scaling
from .gptq import (
    GPTQLayerFacts,
    check_group_layout,
    facts_from_tensors,
    group_counts,
    pack_qweight,
    pack_qzeros,
    unpack_qzeros,
)
from .merge import DEFAULT_MAX_ROUNDING_LOSS, ZERO_FORMATS, MergeReport, check_rounding, fold, group_delta, round_zeros
from .model_card import write_card
from .quantizer import QALoraGPTQConfig

logger = logging.getLogger(__name__)

_ADAPTER_PREFIX = "base_model.model."


def read_adapter_layers(adapter_dir: str) -> tuple[QALoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The config and ``{module name: (A, B)}`` of a QA-LoRA adapter saved with ``save_pretrained``."""
    config = QALoraConfig.from_pretrained(adapter_dir)
    if config.modules_to_save:
        raise ValueError(
            f"The adapter in {adapter_dir} trains whole modules ({config.modules_to_save}) besides QA-LoRA layers; "
            "offline tools fold only QA-LoRA layers. Merge it in memory with `merge_and_unload()` instead."
        )
    weights = load_file(os.path.join(adapter_dir, SAFETENSORS_WEIGHTS_NAME))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        module, _, part = key.removeprefix(_ADAPTER_PREFIX).rpartition(".qalora_")
        if part in ("A.weight", "B.weight"):
            layers.setdefault(module, {})[part[0]] = tensor
    incomplete = [module for module, parts in layers.items() if set(parts) != {"A", "B"}]
    if not layers or incomplete:
        raise ValueError(f"{adapter_dir} holds no complete QA-LoRA layers (incomplete: {incomplete[:5]}).")
    return config, {module: (parts["A"], parts["B"]) for module, parts in layers.items()}


def check_adapter_modules(adapter: dict, modules: list[str], base_dir: str) -> None:
    """Refuse an adapter with layers the checkpoint does not have as GPTQ layers."""
    unknown = sorted(set(adapter) - set(modules))
    if unknown:
        raise ValueError(
            f"The adapter has layers that are not GPTQ layers of {base_dir}: {unknown[:5]}; it was trained on "
            "another base model."
        )


def adapter_delta(
    module: str,
    facts: GPTQLayerFacts,
    g_idx: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor],
    config: QALoraConfig,
) -> torch.Tensor:
    """``D[g, n]`` of one layer's adapter, after checking it against the layer; ValueError names any mismatch."""
    A, B = weights
    problem = check_group_layout(facts, g_idx)
    mismatches = facts.mismatches((config.base_layers or {}).get(module, {}))
    if problem or mismatches or A.shape[1] != facts.num_groups or B.shape[0] != facts.out_features:
        shapes = f"adapter shapes A {tuple(A.shape)}, B {tuple(B.shape)}"
        raise ValueError(f"{module}: {problem or '; '.join(mismatches) or shapes}")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ValueError(f"{module}: the adapter weights contain NaN or inf")
    r, lora_alpha = config.rank_and_alpha(module)
    counts = group_counts(g_idx, facts.num_groups)
    return group_delta(A, B, qalora_scaling(lora_alpha, r, config.use_rslora), counts)


def mismatch_error(base_dir: str, problems: list[str]) -> ValueError:
    return ValueError(
        f"The adapter does not match the GPTQ checkpoint {base_dir}; nothing was written:\n  "
        + "\n  ".join(problems[:8])
    )


def merge_checkpoint(
    base_dir: str,
    adapter_dir: str,
    out_dir: str,
    *,
    zero_format: str = "float",
    max_rounding_loss: float = DEFAULT_MAX_ROUNDING_LOSS,
    overwrite: bool = False,
    progressbar: bool = True,
    calibration: Optional[CalibrationData] = None,
    calibration_seq_len: int = DEFAULT_SEQ_LEN,
    calibration_max_tokens: int = DEFAULT_MAX_TOKENS,
    calibration_method: str = DEFAULT_METHOD,
) -> Optional[MergeReport]:
    """Merge the QA-LoRA adapter in ``adapter_dir`` into the GPTQ checkpoint in ``base_dir``, writing ``out_dir``.

    Args:
        base_dir: A GPTQ checkpoint folder (``config.json`` + safetensors, single file or sharded).
        adapter_dir: What ``save_pretrained`` wrote for the QA-LoRA model.
        out_dir: The merged model folder; written atomically (nothing appears there if the merge fails). Besides
            the model files it holds a model card, ``README.md``, the same as ``merge_and_unload()`` writes.
        zero_format: ``"float"`` (exact, a ``peft_qalora`` checkpoint) or ``"int"`` (a standard ``gptq_v2``
            checkpoint, with the rounding loss measured first), as in ``merge_and_unload``.
        max_rounding_loss: With ``zero_format="int"``, refuse when rounding loses more than this share.
        overwrite: Replace a non-empty ``out_dir``.
        progressbar: Show progress bars.
        calibration: With ``zero_format="int"``, calibration data (text, token ids, or a ``pathlib.Path`` to a text,
            ``.json`` or ``.jsonl`` file; text is tokenized with the base's tokenizer): the calibrated integer merge,
            as ``merge_and_unload(zero_format="int", calibration=...)``. It changes codes (``qweight``) and zero
            points, so it loads the base model with the adapter in memory to compute the layers' input Hessians.
        calibration_seq_len, calibration_max_tokens, calibration_method: As ``merge_and_unload``'s.

    Returns:
        The :class:`MergeReport` of an integer merge, ``None`` for a float merge.
    """
    if zero_format not in ZERO_FORMATS:
        raise ValueError(f"zero_format must be one of {ZERO_FORMATS}, got {zero_format!r}.")
    if calibration is not None and zero_format != "int":
        raise ValueError("Calibration data applies to the integer merge: pass zero_format='int' (--zero-format int).")
    quantization = gptq_quantization(base_dir)
    config, adapter = read_adapter_layers(adapter_dir)
    check_output_folder(out_dir, overwrite)

    files, index = shard_files(base_dir)
    located = locate_tensors(base_dir, files)
    modules = gptq_modules(list(located))
    check_adapter_modules(adapter, modules, base_dir)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few small ops per layer: a thread pool only adds wake-up latency
    try:
        zeros, report = _fold_checkpoint(
            base_dir, located, modules, adapter, config, quantization, zero_format, progressbar
        )
    finally:
        torch.set_num_threads(threads)
    codes: dict[str, torch.Tensor] = {}
    if calibration is not None:
        blocks = _calibration_blocks(base_dir, calibration, calibration_seq_len, calibration_max_tokens)
        require_tokens(blocks, max(_tensor_shape(base_dir, located, f"{module}.g_idx")[0] for module in adapter))
        report = _calibrated_solutions(
            base_dir, adapter_dir, quantization, blocks, zeros, codes, calibration_method, progressbar
        )
    if report is not None:
        check_rounding(report, max_rounding_loss)

    with atomic_folder(out_dir) as tmp:
        weight_map = {}
        for file in tqdm(files, disable=not progressbar, desc="Writing merged shards"):
            plan = _shard_plan(tensor_names(os.path.join(base_dir, file)), zeros, zero_format, codes)
            write_shard(os.path.join(base_dir, file), os.path.join(tmp, file), plan)
            weight_map.update(dict.fromkeys((name for name, _ in plan), file))
        if index is not None:
            total_size = sum(os.path.getsize(os.path.join(tmp, file)) for file in files)
            with open(os.path.join(tmp, SAFETENSORS_INDEX), "w") as f:
                json.dump(
                    {"metadata": {**index.get("metadata", {}), "total_size": total_size}, "weight_map": weight_map},
                    f,
                    indent=2,
                )
        _write_config(base_dir, tmp, quantization, modules, zero_format)
        for name in sorted(os.listdir(base_dir)):
            path = os.path.join(base_dir, name)
            if os.path.isfile(path) and name not in NOT_INHERITED_FILES and name not in files:
                shutil.copy2(path, os.path.join(tmp, name))
        # the card merge_and_unload() + save_pretrained() writes for the same inputs
        architecture = model_architecture(read_config(base_dir))
        write_card(tmp, merged_facts({"default": config}, zero_format, report, architecture, quantization))
    logger.info("Merged %d layers of %s with %s into %s", len(adapter), base_dir, adapter_dir, out_dir)
    return report


def _fold_checkpoint(base_dir, located, modules, adapter, config, quantization, zero_format, progressbar):
    """New zero tensors for every GPTQ layer (validated against the adapter), and the rounding report."""
    bits, group_size = int(quantization["bits"]), int(quantization["group_size"])
    checkpoint_format = quantization["checkpoint_format"]
    zeros: dict[str, torch.Tensor] = {}
    roundings = []
    problems: list[str] = []
    for module in tqdm(modules, disable=not progressbar, desc="Folding adapter into zero points"):
        names = GPTQTensorNames(module)
        tensors = {}
        for name in (names.qzeros, names.scales, names.g_idx):
            tensors.update(read_tensors(os.path.join(base_dir, located[name]), [name]))
        scales, g_idx = tensors[names.scales], tensors[names.g_idx]
        facts = facts_from_tensors(bits, group_size, scales.shape[1], g_idx)
        original = unpack_qzeros(tensors[names.qzeros], bits, facts.out_features, checkpoint_format).float()
        folded = original
        if module in adapter:
            try:
                folded = fold(original, scales, adapter_delta(module, facts, g_idx, adapter[module], config))
            except ValueError as exc:
                problems.append(str(exc))
                continue
        if zero_format == "float":
            zeros[module] = folded
            continue
        rounded, rounding = round_zeros(module, folded, original, scales, bits, lowest=0)
        zeros[module] = pack_qzeros(rounded, bits, "gptq_v2")
        if module in adapter:
            roundings.append(rounding)
    if problems:
        raise mismatch_error(base_dir, problems)
    return zeros, (MergeReport(roundings) if zero_format == "int" else None)


def _tensor_shape(base_dir: str, located: dict[str, str], name: str) -> list[int]:
    with safe_open(os.path.join(base_dir, located[name]), framework="pt") as f:
        return list(f.get_slice(name).get_shape())


def _calibration_blocks(base_dir: str, calibration: CalibrationData, seq_len: int, max_tokens: int) -> list:
    """The calibration data as token blocks (text tokenized with the base's tokenizer), checked before any loading."""
    from .calibration import calibration_blocks, default_tokenizer

    vocab_size = read_config(base_dir).get("vocab_size")
    tokenizer = default_tokenizer(base_dir)
    return calibration_blocks(calibration, tokenizer, seq_len=seq_len, max_tokens=max_tokens, vocab_size=vocab_size)


def _calibrated_solutions(base_dir, adapter_dir, quantization, blocks, zeros, codes, method, progressbar):
    """Run the base with the adapter on the calibration blocks; fill ``zeros``/``codes`` with the packed results.

    The in-memory calibrated merge computes them the same way (``model_merge.calibrated_folds``), so both paths agree.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPTQConfig

    from .layer import QALoraLinear
    from .model_merge import calibrated_folds

    bits = int(quantization["bits"])
    # gptq_torch: the GPTQModel kernel that reads its codes and zeros exactly on every CPU (DESIGN.md, "Traps").
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, quantization_config=GPTQConfig(bits=bits, backend="gptq_torch")
    )
    model = PeftModel.from_pretrained(base, adapter_dir)
    tuner = model.base_model
    layers = {name: m for name, m in tuner.model.named_modules() if isinstance(m, QALoraLinear)}
    folds = calibrated_folds(tuner, layers, None, blocks, progressbar=progressbar, calibration_method=method)
    for name, layer_fold in folds.items():
        zeros[name] = pack_qzeros(layer_fold.zeros, bits, "gptq_v2")
        codes[name] = pack_qweight(layer_fold.codes, bits)
    return CalibratedMergeReport([layer_fold.rounding for layer_fold in folds.values()])


def _shard_plan(
    names: list[str], zeros: dict[str, torch.Tensor], zero_format: str, codes: Optional[dict] = None
) -> list:
    """Output tensors of one shard: each ``qzeros`` (and, calibrated, ``qweight``) replaced, the rest copied."""
    plan = []
    for name in names:
        if codes and name.endswith(".qweight") and name.removesuffix(".qweight") in codes:
            plan.append((name, codes[name.removesuffix(".qweight")]))
            continue
        module = name.removesuffix(".qzeros")
        if module == name or module not in zeros:
            plan.append((name, name))
        elif zero_format == "float":
            # The layout FloatZeroGPTQLinear saves: fp32 `zeros`, and a zero-size `weight` that stops stock loaders.
            plan.append((f"{module}.zeros", zeros[module]))
            plan.append((f"{module}.weight", torch.empty(0, dtype=torch.float16)))
        else:
            plan.append((name, zeros[module]))
    return plan


def _write_config(base_dir: str, out_dir: str, quantization: dict, modules: list[str], zero_format: str) -> None:
    config = read_config(base_dir)
    if zero_format == "float":
        config["quantization_config"] = QALoraGPTQConfig(
            bits=quantization["bits"],
            group_size=quantization["group_size"],
            desc_act=quantization.get("desc_act", False),
            sym=quantization.get("sym", True),
            modules=modules,
            base_checkpoint_format=quantization["checkpoint_format"],
        ).to_dict()
    else:
        # Zeros are written as v2, and moved zeros are no longer the symmetric midpoint.
        config["quantization_config"].update(checkpoint_format="gptq_v2", sym=False)
        if "format" in config["quantization_config"]:
            config["quantization_config"]["format"] = "gptq_v2"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
