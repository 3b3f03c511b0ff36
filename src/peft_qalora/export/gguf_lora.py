# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Export of a QA-LoRA adapter as a llama.cpp LoRA adapter GGUF, applied at run time on the base's GGUF.

Folding the adapter into a ``Q4_1`` GGUF (:func:`~peft_qalora.export.gguf.export_gguf`) rounds each offset
``m = -s * z + D`` to fp16, and that rounding (about 0.002 quantization steps) is as large as a trained adapter's
shift of the zero points. The exact route for llama.cpp is the base alone as GGUF (bit-exact for a symmetric GPTQ
base: ``export_gguf(base_dir, None, "base.gguf")``) plus this file, which llama.cpp applies unmerged
(``llama-cli -m base.gguf --lora adapter.gguf``, ``llama-server --lora``), computing ``W x + scale * B (A' x)``.

The adapter becomes a plain LoRA first, exactly as ``peft-qalora convert --to lora`` does
(:mod:`peft_qalora.convert`): ``A'[:, k] = A[:, g_idx[k]] / count(g_idx[k])`` (r x in_features) has the same function as
QA-LoRA's ``A`` on the group means. The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes for a PEFT LoRA
adapter: ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32), the base's
``general.architecture``, and per adapted layer ``<base tensor name>.lora_a`` (ggml shape ``[in_features, r]``,
PEFT's ``A`` as it is) and ``.lora_b`` (``[r, out_features]``, PEFT's ``B`` as it is), both F32, with llama.cpp's
q/k row permutation applied to the rows of ``lora_b`` (the rows of the base weight it is added to).

llama.cpp scales each layer by ``alpha / rank`` with ``rank`` read from ``lora_b``'s shape (``get_scale`` in
``src/llama-adapter.h``), so ``rank_pattern`` needs nothing; a layer whose PEFT scale is something else
(``use_rslora``: ``alpha / sqrt(r)``; ``alpha_pattern``) carries the ratio in its ``lora_b``, which
``convert_lora_to_gguf.py`` does not do.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from peft.utils import CONFIG_NAME
from tqdm.auto import tqdm

from ..checkpoint import atomic_file, check_output_file
from ..config import QALoraConfig, qalora_scaling
from ..convert import plain_lora_A
from ..offline_merge import read_adapter_layers
from .gguf import SUPPORTED_ARCHITECTURES, _check_exact, _read_config_for_export, permute_rows
from .merged_checkpoint import MergedCheckpoint

logger = logging.getLogger(__name__)

_F32 = gguf.GGMLQuantizationType.F32


@dataclass(frozen=True)
class GGUFLoraExportReport:
    """What :func:`export_gguf_lora` wrote."""

    path: str
    architecture: str  # general.architecture: the llama.cpp architecture of the base ("llama", "qwen2")
    layers: int  # adapted layers: one lora_a / lora_b pair each
    alpha: float  # adapter.lora.alpha as written (float32)
    rescaled_layers: int  # layers whose lora_b carries a scale other than alpha / r (use_rslora, alpha_pattern)


@dataclass
class _LoraPair:
    base_name: str  # the base GGUF's tensor name, e.g. blk.0.attn_q.weight
    A: np.ndarray  # (r, in_features) float32: ggml ne = [in_features, r]
    B: np.ndarray  # (out_features, r) float32, in llama.cpp's row order: ggml ne = [r, out_features]


def export_gguf_lora(
    base_dir: str,
    adapter_dir: str,
    out_file: str,
    *,
    overwrite: bool = False,
    progressbar: bool = True,
) -> GGUFLoraExportReport:
    """Write a QA-LoRA adapter as a llama.cpp LoRA adapter GGUF for the GGUF of its GPTQ base.

    The adapter is expanded to a plain LoRA (``A'[:, k] = A[:, g_idx[k]] / count(g_idx[k])``, the same function) and
    written as llama.cpp's ``convert_lora_to_gguf.py`` writes a PEFT LoRA adapter, in F32, so llama.cpp computes
    exactly what the QA-LoRA model computes on top of the base GGUF. Pair it with the base converted by
    :func:`~peft_qalora.export.gguf.export_gguf` without an adapter (``export_gguf(base_dir, None, "base.gguf")``):
    ``llama-cli -m base.gguf --lora adapter.gguf``. Unlike the merged ``Q4_1`` GGUF, this keeps all of the adapter:
    no offset is rounded to fp16.

    Everything is checked before the file is created, and the file is written to a temporary file beside
    ``out_file`` and renamed at the end, so a failed export leaves nothing behind.

    Args:
        base_dir: The GPTQ checkpoint folder the adapter was trained on (Llama, Mistral or Qwen2; 2/3/4-bit, no
            act-order, group size a multiple of 32: the bases :func:`export_gguf` converts exactly). It gives the
            quantization groups, the architecture and the tensor names.
        adapter_dir: The QA-LoRA adapter folder ``save_pretrained`` wrote.
        out_file: The ``.gguf`` file to write.
        overwrite: Replace an existing ``out_file``.
        progressbar: Show a progress bar.

    Returns:
        A :class:`GGUFLoraExportReport`.

    Raises:
        ValueError: For an adapter that is not a QA-LoRA adapter or does not fit the base, a base whose GGUF
            :func:`export_gguf` cannot write exactly (act-order, 8-bit, group sizes that are not a multiple of 32),
            an unsupported architecture, or an existing ``out_file`` without ``overwrite``.
    """
    out_file = os.path.abspath(out_file)
    check_output_file(out_file, overwrite)
    config, architecture = _read_config_for_export(base_dir)
    arch, permute_qk = SUPPORTED_ARCHITECTURES[architecture]
    _check_qalora_adapter(adapter_dir)
    checkpoint = MergedCheckpoint(base_dir, adapter_dir)  # checks the adapter against every base layer it adapts
    try:
        _check_exact(checkpoint, base_dir)
    except ValueError as exc:
        raise ValueError(
            f"llama.cpp applies a LoRA adapter GGUF on a GGUF of its base model, and {base_dir} has no exact GGUF "
            f"(export_gguf refuses it), so the adapter GGUF would have no base to run on. {exc}"
        ) from exc
    adapter_config, adapter = read_adapter_layers(adapter_dir)
    alpha = _written_alpha(adapter_config.lora_alpha)
    pairs, rescaled = _lora_pairs(checkpoint, adapter_config, adapter, config, arch, permute_qk, alpha, progressbar)
    _write(out_file, arch, adapter_dir, alpha, pairs)
    logger.info(
        "Wrote %s: %d LoRA layers for llama.cpp's %s architecture, alpha %g (%d layers rescaled in lora_b); apply it "
        "on the base GGUF with `llama-cli -m base.gguf --lora %s`",
        out_file,
        len(pairs),
        gguf.MODEL_ARCH_NAMES[arch],
        alpha,
        rescaled,
        os.path.basename(out_file),
    )
    return GGUFLoraExportReport(out_file, gguf.MODEL_ARCH_NAMES[arch], len(pairs), alpha, rescaled)


# ----------------------------------------------------------------------------------------------------------------
# Checks, all before any file is created


def _check_qalora_adapter(adapter_dir: str) -> None:
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{adapter_dir} has no {CONFIG_NAME}: it is not a saved PEFT adapter folder.")
    with open(path, encoding="utf-8") as f:
        peft_type = json.load(f).get("peft_type")
    if peft_type != "QALORA":
        raise ValueError(
            f"{adapter_dir} holds a {peft_type} adapter; export_gguf_lora converts QA-LoRA (QALORA) adapters. A plain "
            "PEFT LoRA adapter converts with llama.cpp's own convert_lora_to_gguf.py; a PEFT LoRA adapter with "
            "use_qalora=True converts to QALORA first (peft-qalora convert --to qalora)."
        )


# ----------------------------------------------------------------------------------------------------------------
# Scale


def _written_alpha(lora_alpha: float) -> float:
    """``adapter.lora.alpha`` as llama.cpp reads it back: a float32."""
    return float(np.float32(lora_alpha))


def _llama_cpp_scale(alpha: float, rank: int) -> float:
    """The scale llama.cpp gives a layer at ``--lora`` scale 1: ``alpha / rank``, or 1 where alpha is 0.

    ``llama_adapter_lora_weight::get_scale`` (src/llama-adapter.h): ``alpha ? adapter_scale * alpha / rank :
    adapter_scale`` with ``rank = b->ne[0]``.
    """
    return alpha / rank if alpha else 1.0


def _lora_pairs(
    checkpoint: MergedCheckpoint,
    adapter_config: QALoraConfig,
    adapter: dict[str, tuple[torch.Tensor, torch.Tensor]],
    config: dict,
    arch: gguf.MODEL_ARCH,
    permute_qk: bool,
    alpha: float,
    progressbar: bool,
) -> tuple[list[_LoraPair], int]:
    """Every adapted layer as ``lora_a`` / ``lora_b`` in llama.cpp's names, shapes and row order, in model order."""
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    modules = [module for module in checkpoint.modules if module in adapter]  # a fixed order: the file is reproducible
    unmapped = [
        module for module in modules if name_map.get_name(f"{module}.weight", try_suffixes=(".weight",)) is None
    ]
    if unmapped:
        raise ValueError(
            f"The adapter adapts layers llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} architecture has no tensor for: "
            f"{', '.join(unmapped[:5])}{' ...' if len(unmapped) > 5 else ''}."
        )
    pairs, rescaled = [], 0
    for module in tqdm(modules, disable=not progressbar, desc="Converting LoRA layers", unit="layer"):
        A, B = adapter[module]
        facts = checkpoint.facts[module]
        # act-order bases are refused before this point, so a layer's groups are contiguous runs of channels
        A_plain = plain_lora_A(A, torch.arange(facts.in_features) // facts.group_size)
        r, lora_alpha = adapter_config.rank_and_alpha(module)
        # PEFT's scale for this layer against llama.cpp's; any ratio goes into lora_b so that llama.cpp's product
        # alpha / rank * B' equals PEFT's scaling * B (computed in float64, rounded once to float32).
        ratio = qalora_scaling(lora_alpha, r, adapter_config.use_rslora) / _llama_cpp_scale(alpha, B.shape[1])
        B_plain = B.detach().double() * ratio if ratio != 1.0 else B.detach()
        B_plain = B_plain.float()
        rescaled += ratio != 1.0
        if permute_qk and module.endswith("q_proj"):
            B_plain = permute_rows(B_plain, n_head)  # the rows of the base weight lora_b's product is added to
        elif permute_qk and module.endswith("k_proj"):
            B_plain = permute_rows(B_plain, n_head_kv)
        base_name = name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))
        pairs.append(_LoraPair(base_name, A_plain.contiguous().numpy(), B_plain.contiguous().numpy()))
    return pairs, rescaled


# ----------------------------------------------------------------------------------------------------------------
# File


def _write(out_file: str, arch: gguf.MODEL_ARCH, adapter_dir: str, alpha: float, pairs: list[_LoraPair]) -> None:
    """The GGUF file, written to a temporary file beside ``out_file`` and renamed into place."""
    with atomic_file(out_file) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        try:
            # The keys convert_lora_to_gguf.py writes (set_type, then the model name, set_gguf_parameters and the
            # quantization version of ModelBase.prepare_metadata), and nothing of the base's hyperparameters.
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_name(os.path.basename(os.path.abspath(adapter_dir).rstrip("/")) or "adapter")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for pair in pairs:
                writer.add_tensor(f"{pair.base_name}.lora_a", pair.A, raw_dtype=_F32)
                writer.add_tensor(f"{pair.base_name}.lora_b", pair.B, raw_dtype=_F32)
            writer.write_header_to_file(Path(tmp))
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
