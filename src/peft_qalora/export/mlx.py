# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Export a GPTQ checkpoint, with a QA-LoRA adapter folded in, as an mlx-lm model folder.

MLX's affine quantization stores ``w = scales * q + biases`` per group of a row, so the fold is exact: the GPTQ codes
are repacked unchanged, ``scales = s`` and ``biases = -s * z + D`` (DESIGN.md, "The fold"). The folder is what
``mlx_lm.convert`` writes: safetensors with ``<module>.weight`` (uint32, a little-endian bit stream of the codes along
each row), ``<module>.scales`` and ``<module>.biases`` per quantized layer, every other tensor as stored, an index,
``config.json`` with a ``quantization`` entry, and the tokenizer files.

Scales and biases are stored as float32 (``mlx_lm.convert`` uses the model's fp16/bf16). A trained adapter moves a
zero point by a few thousandths of a step, and rounding ``-s * z + D`` to fp16 errs by up to ``|z| * 2^-11`` steps:
on a trained SmolLM2 adapter that is 15% of the adapter's weight change (bf16: 120%), against 2e-5 in fp32. The
fp16 scales convert exactly. Writing needs no MLX: torch and plain safetensors, about one layer in memory at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..checkpoint import (
    DTYPES_BY_NAME,
    NOT_INHERITED_FILES,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    atomic_folder,
    check_output_folder,
    read_config,
)
from ..model_card import write_model_card
from .merged_checkpoint import AffineLayer, MergedCheckpoint, TensorEntry

logger = logging.getLogger(__name__)

MLX_BITS = (2, 3, 4, 8)  # what GPTQ has of MLX's affine widths (MLX also has 5 and 6)
MLX_GROUP_SIZES = (128, 64, 32)  # MLX's affine kernels; the largest that divides a GPTQ group is used
# mlx-lm model types whose weight names are the Hugging Face ones for every GPTQ layer (no fused or renamed
# projections in their `sanitize`), checked against mlx-lm 0.32's model code.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
_SCALE_DTYPE = torch.float32
_ROW_CHUNK = 1024  # rows packed at a time: bounds the int32 temporaries of packing
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES_BY_NAME.items()}


@dataclass
class MLXExportReport:
    """What :func:`export_mlx` wrote."""

    out_dir: str
    bits: int
    group_size: int  # MLX's group size in config.json (layers that differ are listed there by name)
    quantized_layers: int
    files: list[str] = field(default_factory=list)
    total_bytes: int = 0  # all tensor data


@dataclass(frozen=True)
class _Tensor:
    """One output tensor, planned from the checkpoint's headers."""

    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    nbytes: int


def export_mlx(
    base_dir: str,
    adapter_dir: Optional[str],
    out_dir: str,
    *,
    overwrite: bool = False,
    progressbar: bool = True,
) -> MLXExportReport:
    """Write an mlx-lm model folder: the GPTQ model in ``base_dir`` with the adapter in ``adapter_dir`` folded in.

    ``mlx_lm.load(out_dir)`` loads the result; every quantized weight dequantizes to the adapter model's
    ``s * (q - z) + D`` up to float32 rounding of the biases. Codes and scales are the checkpoint's, unchanged.

    Args:
        base_dir: A GPTQ checkpoint folder (``config.json`` + safetensors, single file or sharded), without
            act-order, with bits 2, 3, 4 or 8 and a group size that is a multiple of 32 (or ``-1`` with rows that
            are); groups larger than 128 are written as several MLX groups with the same scale and bias.
        adapter_dir: What ``save_pretrained`` wrote for a QA-LoRA model on that base, or ``None`` for a lossless
            conversion of the GPTQ checkpoint alone.
        out_dir: The model folder; written atomically (nothing appears there if the export fails).
        overwrite: Replace a non-empty ``out_dir``.
        progressbar: Show a progress bar.

    Returns:
        An :class:`MLXExportReport` describing the folder.

    Raises:
        ValueError: Before anything is written, for an input MLX cannot hold exactly or mlx-lm cannot load
            (act-order, group size, bits, architecture), an adapter that does not fit the base, or an occupied
            ``out_dir``.
    """
    _check_architecture(base_dir)
    with _one_torch_thread():
        checkpoint = MergedCheckpoint(base_dir, adapter_dir)
    group_sizes = _check_quantization(checkpoint)
    check_output_folder(out_dir, overwrite)

    entries = checkpoint.entries()
    planned = [_planned_tensors(entry, group_sizes) for entry in entries]
    shards = _shard(planned)
    files = (
        [SAFETENSORS_SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    quantization = _quantization_config(checkpoint.bits, group_sizes)
    config = _mlx_lm_config(checkpoint.config, quantization)
    total_bytes = sum(t.nbytes for tensors in planned for t in tensors)

    with atomic_folder(out_dir) as tmp, _one_torch_thread():
        stream = checkpoint.tensors()
        with tqdm(total=len(entries), disable=not progressbar, desc="Writing MLX model", unit="tensor") as bar:
            for file, shard in zip(files, shards):
                _write_shard(os.path.join(tmp, file), shard, stream, group_sizes, bar)
        weight_map = {t.name: file for file, shard in zip(files, shards) for tensors in shard for t in tensors}
        index = {
            "metadata": {"total_size": total_bytes, "total_parameters": _parameter_count(entries)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        with open(os.path.join(tmp, SAFETENSORS_INDEX), "w") as f:
            json.dump(index, f, indent=4)
        _write_config(config, tmp)
        copied = _copy_other_files(base_dir, tmp, checkpoint.files)
        export = {"format": "MLX affine", "bits": checkpoint.bits, "group_size": quantization["group_size"]}
        write_model_card(tmp, kind="mlx", base_dir=base_dir, adapter_dir=adapter_dir, export=export)
    if not any(name.startswith("tokenizer") for name in copied):
        logger.warning("%s has no tokenizer files; mlx_lm.load needs them in %s.", base_dir, out_dir)
    logger.info(
        "Wrote %d quantized layers (%d-bit, MLX group size %d)%s to %s in %d file(s)",
        len(group_sizes),
        checkpoint.bits,
        quantization["group_size"],
        f" with the adapter in {adapter_dir} folded in" if adapter_dir else "",
        out_dir,
        len(files),
    )
    return MLXExportReport(out_dir, checkpoint.bits, quantization["group_size"], len(group_sizes), files, total_bytes)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: the per-layer ops are small, and a thread pool mostly adds wake-up latency."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_architecture(base_dir: str) -> None:
    config = read_config(base_dir)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{base_dir} is a {model_type!r} model; the MLX export supports model types {SUPPORTED_MODEL_TYPES}, "
            "whose mlx-lm implementations use the Hugging Face names of every GPTQ layer. Export to GGUF "
            "(--format gguf) or merge into a GPTQ checkpoint (peft-qalora merge) instead."
        )
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and rope and "rope_theta" not in rope:
        raise ValueError(
            f"{base_dir} sets rope_parameters per layer type ({sorted(rope)}); mlx-lm's {model_type!r} model reads "
            "one rope_theta, so the exported model would use other rotary frequencies than the base."
        )


def _check_quantization(checkpoint: MergedCheckpoint) -> dict[str, int]:
    """The MLX group size of every GPTQ layer, after refusing what MLX cannot hold exactly."""
    if checkpoint.bits not in MLX_BITS:
        raise ValueError(f"{checkpoint.base_dir} has {checkpoint.bits}-bit GPTQ layers; MLX exports bits {MLX_BITS}.")
    # GPTQModel's `dynamic`: "-:pattern" only leaves modules unquantized (they have no qweight, and are exported as
    # stored); any other key overrides bits or group size for some modules.
    if any(not str(key).startswith("-:") for key in checkpoint.quantization.get("dynamic") or {}):
        raise ValueError(
            f"{checkpoint.base_dir} sets per-module bits or group sizes (quantization_config.dynamic); the MLX "
            "export reads one bits/group_size for the whole checkpoint."
        )
    act_order = checkpoint.act_order_modules
    if act_order:
        raise ValueError(
            f"{checkpoint.base_dir} uses act-order (desc_act=True): the quantization groups of {len(act_order)} "
            f"layers ({act_order[:3]}...) are scattered over each row, and MLX stores contiguous groups. Use a GPTQ "
            "base quantized with desc_act=False, or keep the act-order base and ship the adapter in LoRA form "
            "(peft-qalora convert --to lora) or merged into GPTQ (peft-qalora merge)."
        )
    group_sizes, problems = {}, []
    for module, facts in checkpoint.facts.items():
        # One MLX group size per layer that tiles every GPTQ group, a partial last group included.
        last = facts.last_group_size
        group = next((size for size in MLX_GROUP_SIZES if facts.group_size % size == 0 and last % size == 0), None)
        if group is None:
            partial = f" (last group {last})" if facts.has_partial_group else ""
            problems.append(f"{module}: group size {facts.group_size}{partial}, {facts.in_features} input channels")
        group_sizes[module] = group
    if problems:
        raise ValueError(
            f"MLX quantizes contiguous groups of 32, 64 or 128 weights, so an exact export needs GPTQ groups (a "
            f"partial last group included) that are whole multiples of 32; {len(problems)} layers of "
            f"{checkpoint.base_dir} do not:\n  "
            + "\n  ".join(problems[:3])
            + ("\n  ..." if len(problems) > 3 else "")
            + "\nRe-quantize the base with group_size 32, 64 or 128, or merge into GPTQ (peft-qalora merge) instead."
        )
    return group_sizes


def _quantization_config(bits: int, group_sizes: dict[str, int]) -> dict:
    """mlx-lm's ``quantization`` entry: defaults, plus a per-layer entry for each layer that differs from them."""
    default = Counter(group_sizes.values()).most_common(1)[0][0] if group_sizes else MLX_GROUP_SIZES[-1]
    quantization: dict = {"group_size": default, "bits": bits, "mode": "affine"}
    for module, group in group_sizes.items():
        if group != default:
            quantization[module] = {"group_size": group, "bits": bits, "mode": "affine"}
    return quantization


def _planned_tensors(entry: TensorEntry, group_sizes: dict[str, int]) -> list[_Tensor]:
    """The output tensors for one checkpoint entry: three for a GPTQ layer, the tensor itself otherwise."""
    if not entry.quantized:
        nbytes = math.prod(entry.shape) * entry.dtype.itemsize
        return [_Tensor(entry.name, _DTYPE_NAMES[entry.dtype], entry.shape, nbytes)]
    module = entry.name.removesuffix(".weight")
    out_features, in_features = entry.shape
    words = in_features * entry.facts.bits // 32
    groups = in_features // group_sizes[module]
    scale_bytes = out_features * groups * _SCALE_DTYPE.itemsize
    return [
        _Tensor(f"{module}.weight", "U32", (out_features, words), out_features * words * 4),
        _Tensor(f"{module}.scales", "F32", (out_features, groups), scale_bytes),
        _Tensor(f"{module}.biases", "F32", (out_features, groups), scale_bytes),
    ]


def _shard(planned: list[list[_Tensor]]) -> list[list[list[_Tensor]]]:
    """Split the entries, in order, into shards of at most MAX_SHARD_BYTES (a larger entry gets its own shard)."""
    shards: list[list[list[_Tensor]]] = []
    size = 0
    for tensors in planned:
        nbytes = sum(t.nbytes for t in tensors)
        if not shards or size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(tensors)
        size += nbytes
    return shards


def _write_shard(path: str, shard: list[list[_Tensor]], stream, group_sizes: dict[str, int], bar: tqdm) -> None:
    """Write one safetensors file: the header from the plan, then each entry's data as the checkpoint yields it."""
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for tensors in shard:
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # 8-byte aligned data, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensors in shard:
            name, item = next(stream)
            if name != tensors[0].name:  # the plan and the stream walk the same entries in the same order
                raise RuntimeError(f"internal error: expected {tensors[0].name}, got {name}")
            if isinstance(item, AffineLayer):
                _write_layer(f, item, group_sizes[name.removesuffix(".weight")])
            else:
                _write_tensor(f, item)
            bar.update(1)
        if f.tell() != 8 + len(encoded) + offset:
            raise RuntimeError(f"internal error: {path} has {f.tell()} bytes, planned {8 + len(encoded) + offset}")


def _write_layer(f, layer: AffineLayer, group: int) -> None:
    for start in range(0, layer.codes.shape[0], _ROW_CHUNK):
        _write_tensor(f, pack_rows(layer.codes[start : start + _ROW_CHUNK], layer.bits))
    # A GPTQ group of n * `group` channels is n MLX groups with the same scale and bias.
    scales, offsets = layer.blocks(group)
    _write_tensor(f, scales.to(_SCALE_DTYPE))
    _write_tensor(f, offsets.to(_SCALE_DTYPE))


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The bytes of MLX's packed ``weight``: each row's codes as one LSB-first bit stream (uint8, rows x K*bits/8).

    Read as little-endian uint32 words this is :func:`peft_qalora.gptq.pack_int32` of the same rows; building it a
    few whole bytes at a time keeps the temporaries small (uint8 and int32, no per-bit expansion).
    """
    rows, k = codes.shape
    chunk_bits = math.lcm(bits, 8)  # the shortest run of codes that fills whole bytes
    per_chunk = chunk_bits // bits
    if k % per_chunk or (k * bits) % 32:
        raise ValueError(f"{k} codes of {bits} bits do not fill whole 32-bit words.")
    grouped = codes.reshape(rows, k // per_chunk, per_chunk).to(torch.int32)
    value = grouped[..., 0].clone()
    for i in range(1, per_chunk):
        value |= grouped[..., i] << (i * bits)
    parts = [((value >> (8 * j)) & 0xFF).to(torch.uint8) for j in range(chunk_bits // 8)]
    return torch.stack(parts, dim=-1).reshape(rows, k * bits // 8)


def _write_tensor(f, tensor: torch.Tensor) -> None:
    if tensor.numel():
        f.write(memoryview(tensor.detach().cpu().contiguous().view(torch.uint8).numpy()))


def _parameter_count(entries: list[TensorEntry]) -> int:
    """What mlx-lm reports as ``total_parameters``: quantized weights counted unpacked, scales and biases not."""
    return sum(math.prod(entry.shape) for entry in entries)


def _mlx_lm_config(config: dict, quantization: dict) -> dict:
    """The base's config.json as mlx-lm reads it: MLX's quantization entry, and rope settings where it looks."""
    config = {key: value for key, value in config.items() if key != "quantization_config"}
    config["quantization"] = quantization
    config["quantization_config"] = quantization  # mlx-lm's save_config mirrors the entry under this name
    # transformers 5 writes `rope_parameters`; mlx-lm's Llama, Qwen, Gemma and Phi-3 read the older top-level
    # `rope_theta` / `rope_scaling`, and silently fall back to their defaults without them.
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" and not config.get("rope_scaling"):
            scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
            config["rope_scaling"] = {**scaling, "type": rope_type, "rope_type": rope_type}
    return dict(sorted(config.items()))


def _write_config(config: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=4)


def _copy_other_files(base_dir: str, out_dir: str, weight_files: list[str]) -> list[str]:
    """Copy tokenizer, generation config and other plain files of the base folder; return their names."""
    copied = []
    for name in sorted(os.listdir(base_dir)):
        path = os.path.join(base_dir, name)
        if (
            os.path.isfile(path)
            and name not in NOT_INHERITED_FILES
            and name not in weight_files
            and not name.endswith(".safetensors")
        ):
            shutil.copy2(path, os.path.join(out_dir, name))
            copied.append(name)
    return copied
