# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Export of a GPTQ model, with a QA-LoRA adapter folded in, to one GGUF file that llama.cpp runs as it is.

GGUF's ``Q4_1`` block holds 32 consecutive weights of a row as ``w = d * q + m`` with fp16 ``d`` and ``m`` and 4-bit
``q``. A GPTQ group of ``gs`` input channels with its adapter folded in is ``w = s * q + (-s * z + D)``
(DESIGN.md, "The fold"), so with ``d = s`` and ``m = -s * z + D`` each group becomes ``gs / 32`` blocks: the codes
and scales are copied bit for bit and only ``m`` is rounded, once, to fp16. 2- and 3-bit codes fit a 4-bit field as
they are. The packing is done here; gguf-py's own quantizer would re-quantize the weights.

The one rounding is not always negligible: ``m`` is dominated by ``-s * z`` (``-8 s`` for a symmetric 4-bit base),
so fp16 rounds it by up to ``2^-12 * |m|``, about 0.002 steps, while a briefly trained adapter moves a zero point by
a few thousandths of a step. On SmolLM2-135M a 2-step adapter's shift was as large as the rounding (both 0.0006
steps median) and the GGUF kept about 70% of its held-out loss gain; 6- and 20-step adapters kept all of it. The
report returns the rounding so that it can be compared with the adapter.

Metadata, tensor names and the tokenizer follow llama.cpp's ``convert_hf_to_gguf.py`` for the Llama family, using
gguf-py (llama.cpp's own writer) for names, keys and vocabulary files. Llama and Mistral keep llama.cpp's q/k row
permutation (its rotary embedding pairs adjacent channels, transformers' pairs the two halves of a head); being a
row permutation it moves codes, scales and offsets together and changes no value. The tokenizer's metadata is read
in :mod:`.gguf_vocab`, the rope settings in :mod:`.gguf_rope`; this module plans, packs and writes the file.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_file, check_output_file, model_architecture, read_config
from .gguf_rope import _Rope, _rope_settings
from .gguf_vocab import _read_vocabulary
from .merged_checkpoint import AffineLayer, MergedCheckpoint, TensorEntry

logger = logging.getLogger(__name__)

# transformers architecture -> (llama.cpp architecture, whether q/k rows get llama.cpp's rotary permutation)
SUPPORTED_ARCHITECTURES: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False),
}
_Q4_1 = gguf.GGMLQuantizationType.Q4_1
_BLOCK, _BLOCK_BYTES = gguf.GGML_QUANT_SIZES[_Q4_1]  # 32 weights in 20 bytes: fp16 d, fp16 m, 16 bytes of nibbles
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")  # as llama.cpp skips them


@dataclass(frozen=True)
class GGUFExportReport:
    """What :func:`export_gguf` wrote."""

    path: str
    quantized_tensors: int  # Q4_1 tensors: every GPTQ layer
    other_tensors: int  # F32 / F16 / BF16 as stored
    max_offset_rounding: float  # max |fp16(m) - m| / s over all groups, in quantization steps
    mean_offset_rounding: float  # the same, averaged over all groups
    pre_tokenizer: str  # tokenizer.ggml.pre ("default" for a SentencePiece vocabulary)


@dataclass
class _PlannedTensor:
    gguf_name: str
    entry: Optional[TensorEntry]  # None for a tensor generated here (rope_freqs)
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    nbytes: int
    permute_heads: Optional[int]  # the q/k rotary permutation over this many heads, or None


def export_gguf(
    base_dir: str,
    adapter_dir: Optional[str],
    out_file: str,
    *,
    overwrite: bool = False,
    progressbar: bool = True,
) -> GGUFExportReport:
    """Write a GPTQ checkpoint, with a QA-LoRA adapter folded into its zero points, as one GGUF file.

    Every GPTQ layer becomes ``Q4_1`` with ``d = s`` and ``m = -s * z + D``: the codes and scales are exact and only
    the offset ``m`` is rounded to fp16. Other tensors keep their stored precision (1-D tensors and norms as F32, as
    llama.cpp's converter writes them; fp16 as F16, fp32 as F32, bf16 as BF16). Architecture metadata and the
    tokenizer (vocabulary, merges, special tokens, chat template) come from the checkpoint folder. Everything is
    checked before the file is created; the file is written one layer at a time to a temporary file beside
    ``out_file`` and renamed at the end, so a failed export leaves nothing behind.

    Args:
        base_dir: A GPTQ checkpoint folder (``config.json``, safetensors, tokenizer files) of a Llama, Mistral or
            Qwen2 model, 2/3/4-bit, without act-order, group size a multiple of 32.
        adapter_dir: The QA-LoRA adapter folder ``save_pretrained`` wrote, or ``None`` to convert the GPTQ
            checkpoint alone (exact where ``-s * z`` is an fp16 number, as for every symmetric checkpoint).
        out_file: The ``.gguf`` file to write.
        overwrite: Replace an existing ``out_file``.
        progressbar: Show a progress bar.

    Returns:
        A :class:`GGUFExportReport`, including how far fp16 rounded the offsets, in quantization steps: compare
        it with how far the adapter moves the zero points.

    Raises:
        ValueError: For input GGUF cannot hold exactly (8-bit, act-order, group sizes that are not a multiple of
            32), an unsupported architecture, rope scaling or tokenizer, an adapter that does not fit the base, or
            an existing ``out_file`` without ``overwrite``.
    """
    threads = torch.get_num_threads()
    # Many small ops per layer: on a busy machine a thread pool only adds wake-up latency (3-5x slower measured).
    torch.set_num_threads(1)
    try:
        return _export(base_dir, adapter_dir, os.path.abspath(out_file), overwrite, progressbar)
    finally:
        torch.set_num_threads(threads)


def _export(
    base_dir: str, adapter_dir: Optional[str], out_file: str, overwrite: bool, progressbar: bool
) -> GGUFExportReport:
    check_output_file(out_file, overwrite)
    config, architecture = _read_config_for_export(base_dir)
    arch, permute_qk = SUPPORTED_ARCHITECTURES[architecture]
    checkpoint = MergedCheckpoint(base_dir, adapter_dir)
    _check_exact(checkpoint, base_dir)
    rope = _rope_settings(config, arch)
    plan = _plan_tensors(checkpoint, config, arch, permute_qk, rope)
    vocab = _read_vocabulary(base_dir, config, arch)

    with atomic_file(out_file) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        try:
            _add_metadata(writer, config, base_dir, rope)
            vocab.add_to(writer)
            for item in plan:
                writer.add_tensor_info(item.gguf_name, item.shape, np.float32, item.nbytes, raw_dtype=item.ggml_type)
            writer.write_header_to_file(Path(tmp))
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            max_rounding, mean_rounding = _write_tensors(writer, checkpoint, plan, rope, progressbar)
        finally:
            writer.close()
    quantized = sum(item.ggml_type == _Q4_1 for item in plan)
    logger.info(
        "Wrote %s: %d Q4_1 tensors, %d other tensors; fp16 rounding of the offsets: mean %.2e, max %.2e steps",
        out_file,
        quantized,
        len(plan) - quantized,
        mean_rounding,
        max_rounding,
    )
    return GGUFExportReport(out_file, quantized, len(plan) - quantized, max_rounding, mean_rounding, vocab.pre)


# ----------------------------------------------------------------------------------------------------------------
# Checks, all before any file is created


def _read_config_for_export(base_dir: str) -> tuple[dict, str]:
    config = read_config(base_dir)
    architecture = model_architecture(config)
    if architecture not in SUPPORTED_ARCHITECTURES:
        described = architecture or f"model_type={config.get('model_type')!r}"
        raise ValueError(
            f"{base_dir} holds a {described} model; the GGUF export supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}. For other architectures merge into a GPTQ checkpoint instead "
            "(peft-qalora merge) or serve the adapter unmerged (peft-qalora convert --to lora)."
        )
    return config, architecture


def _check_exact(checkpoint: MergedCheckpoint, base_dir: str) -> None:
    """Refuse what GGUF cannot hold exactly, saying why and what works instead."""
    if checkpoint.bits == 8:
        raise ValueError(
            f"{base_dir} is an 8-bit GPTQ model; GGUF cannot hold it exactly: its 8-bit weight type Q8_0 stores "
            "w = d * q with no per-block offset, and the GPTQ zero point (with the adapter folded in) needs one. "
            "Export a 2/3/4-bit base, use the MLX export (8-bit affine), or merge into a GPTQ checkpoint "
            "(peft-qalora merge)."
        )
    act_order = checkpoint.act_order_modules
    if act_order:
        raise ValueError(
            f"{base_dir} uses act-order (desc_act=True) in {len(act_order)} layers (e.g. {act_order[0]}); GGUF "
            "cannot hold it exactly: a Q4_1 block shares one scale and offset over 32 consecutive input channels, "
            "and act-order scatters each quantization group over the row. Quantize the base without act-order, or "
            "keep this base and merge into a GPTQ checkpoint (peft-qalora merge) or serve the adapter unmerged "
            "(peft-qalora convert --to lora)."
        )
    for module, facts in checkpoint.facts.items():
        # Every group, a partial last one included, must be whole blocks: then the row length is too.
        last = facts.last_group_size
        if facts.group_size % _BLOCK or last % _BLOCK:
            partial = f", the last group {last}" if facts.has_partial_group else ""
            raise ValueError(
                f"{base_dir} has group size {facts.group_size} (layer {module}, {facts.in_features} input channels"
                f"{partial}); GGUF cannot hold it exactly: a Q4_1 block shares one scale and offset over {_BLOCK} "
                f"consecutive input channels, so every quantization group (a partial last one included) must hold "
                f"multiples of {_BLOCK} channels. "
                "Use a base quantized with such a group size, the MLX export (groups of 32, 64, 128), or merge "
                "into a GPTQ checkpoint (peft-qalora merge)."
            )


def _plan_tensors(
    checkpoint: MergedCheckpoint, config: dict, arch: gguf.MODEL_ARCH, permute_qk: bool, rope: _Rope
) -> list[_PlannedTensor]:
    """Every GGUF tensor with its name, type and size, from the checkpoint headers alone."""
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    plan, unmapped = [], []
    if rope.llama3_factors is not None:
        rope_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(
            _PlannedTensor(
                rope_name,
                None,
                gguf.GGMLQuantizationType.F32,
                (rope.llama3_factors.numel(),),
                rope.llama3_factors.numel() * 4,
                None,
            )
        )
    for entry in checkpoint.entries():
        if entry.name.endswith(_SKIPPED_SUFFIXES):
            continue
        gguf_name = name_map.get_name(entry.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unmapped.append(entry.name)
            continue
        permute_heads = None
        if permute_qk and entry.name.endswith(("q_proj.weight", "q_proj.bias")):
            permute_heads = n_head
        elif permute_qk and entry.name.endswith(("k_proj.weight", "k_proj.bias")):
            permute_heads = n_head_kv
        if entry.quantized:
            rows, columns = entry.shape
            nbytes = rows * columns // _BLOCK * _BLOCK_BYTES
            plan.append(_PlannedTensor(gguf_name, entry, _Q4_1, entry.shape, nbytes, permute_heads))
            continue
        ggml_type = _plain_type(entry, gguf_name)
        nbytes = math.prod(entry.shape) * (2 if ggml_type != gguf.GGMLQuantizationType.F32 else 4)
        plan.append(_PlannedTensor(gguf_name, entry, ggml_type, entry.shape, nbytes, permute_heads))
    if unmapped:
        raise ValueError(
            f"{checkpoint.base_dir} has tensors llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} architecture has no place "
            f"for: {', '.join(unmapped[:5])}{' ...' if len(unmapped) > 5 else ''}."
        )
    return plan


def _plain_type(entry: TensorEntry, gguf_name: str) -> gguf.GGMLQuantizationType:
    # llama.cpp's converter writes 1-D tensors and norms as F32: most of llama.cpp only handles F32 there.
    if len(entry.shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if entry.dtype == torch.float16:
        return gguf.GGMLQuantizationType.F16
    if entry.dtype == torch.bfloat16:
        return gguf.GGMLQuantizationType.BF16
    return gguf.GGMLQuantizationType.F32


# ----------------------------------------------------------------------------------------------------------------
# Metadata and tensor data


def _add_metadata(writer: gguf.GGUFWriter, config: dict, base_dir: str, rope: _Rope) -> None:
    name = (
        config.get("_name_or_path") or config.get("_model_name_or_path") or os.path.basename(os.path.abspath(base_dir))
    )
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(os.path.basename(str(name).rstrip("/")) or "model")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_rope_freq_base(rope.theta)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if rope.scaling_type is not None:
        writer.add_rope_scaling_type(rope.scaling_type)
        writer.add_rope_scaling_factor(rope.factor)
        if rope.original_context is not None:
            writer.add_rope_scaling_orig_ctx_len(rope.original_context)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def permute_rows(tensor: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order from transformers': within each head, interleave the two halves.

    It is ``LlamaModel.permute`` of llama.cpp's converter; applied to codes, scales and offsets alike.
    """
    return (
        tensor.reshape(n_head, 2, tensor.shape[0] // n_head // 2, *tensor.shape[1:])
        .swapaxes(1, 2)
        .reshape(tensor.shape)
    )


def pack_q4_1(layer: AffineLayer) -> tuple[np.ndarray, float]:
    """The ``Q4_1`` bytes of a folded GPTQ layer (rows x blocks*20, uint8), and ``|fp16(m) - m| / s`` per block.

    ``d`` is the GPTQ scale bit for bit, ``m = -s*z + D`` rounded to fp16, and block byte ``j`` holds code ``j`` in
    its low nibble and code ``j + 16`` in its high nibble (``block_q4_1`` in llama.cpp's ggml-common.h).
    """
    rows, columns = layer.shape
    blocks = columns // _BLOCK
    block_scales, block_offsets = layer.blocks(_BLOCK)  # a GPTQ group of n * 32 channels is n blocks alike
    scales = block_scales.to(torch.float16).numpy()  # (rows, blocks)
    offsets = block_offsets.numpy()
    offsets_fp16 = offsets.astype(np.float16)  # numpy rounds float64 to fp16 once; torch goes via fp32, twice
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = np.abs(offsets_fp16.astype(np.float64) - offsets) / scales.astype(np.float64)
    steps = np.where(scales != 0, steps, 0.0)
    out = np.empty((rows, blocks, _BLOCK_BYTES), dtype=np.uint8)
    out[..., :4] = np.stack([scales, offsets_fp16], axis=-1).view(np.uint8)  # d, m of every block
    # Eight codes per uint64 word: codes < 16, so shifting a whole word by 4 moves each code into its byte's high
    # nibble without spilling into the next byte; codes j and j + 16 of a block share byte j.
    words = np.ascontiguousarray(layer.codes.numpy()).view(np.uint64).reshape(rows, blocks, 2, 2)
    packed = words[..., 0, :] | (words[..., 1, :] << np.uint64(4))
    out[..., 4:] = packed.view(np.uint8).reshape(rows, blocks, _BLOCK // 2)
    return out.reshape(rows, columns // _BLOCK * _BLOCK_BYTES), steps


def _write_tensors(
    writer: gguf.GGUFWriter, checkpoint: MergedCheckpoint, plan: list[_PlannedTensor], rope: _Rope, progressbar: bool
) -> tuple[float, float]:
    """Stream the tensor data in plan order, one checkpoint tensor or layer in memory at a time."""
    max_rounding, rounding_sum, groups = 0.0, 0.0, 0
    planned = {item.entry.name: item for item in plan if item.entry is not None}
    bar = tqdm(total=len(plan), disable=not progressbar, desc="Writing GGUF", unit="tensor")
    with bar:
        if rope.llama3_factors is not None:  # planned first
            writer.write_tensor_data(rope.llama3_factors.numpy())
            bar.update()
        for name, tensor in checkpoint.tensors():
            item = planned.get(name)
            if item is None:  # a tensor llama.cpp does not use (rotary inv_freq buffers)
                continue
            if isinstance(tensor, AffineLayer):
                if item.permute_heads is not None:
                    tensor = AffineLayer(
                        permute_rows(tensor.codes, item.permute_heads),
                        permute_rows(tensor.scales, item.permute_heads),
                        permute_rows(tensor.offsets, item.permute_heads),
                        tensor.bits,
                        tensor.group_counts,
                    )
                data, steps = pack_q4_1(tensor)
                max_rounding = max(max_rounding, float(steps.max(initial=0.0)))
                rounding_sum, groups = rounding_sum + float(steps.sum()), groups + steps.size
            else:
                if item.permute_heads is not None:
                    tensor = permute_rows(tensor, item.permute_heads)
                data = _plain_bytes(tensor, item.ggml_type)
            writer.write_tensor_data(data)
            bar.update()
    return max_rounding, rounding_sum / max(groups, 1)


def _plain_bytes(tensor: torch.Tensor, ggml_type: gguf.GGMLQuantizationType) -> np.ndarray:
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return tensor.to(torch.float32).contiguous().numpy()
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    return tensor.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()  # numpy has no bfloat16
