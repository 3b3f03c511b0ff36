# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint folders on disk: reading GPTQ configs and shards, rewriting shards as a stream, atomic output.

Offline tools (merge, export) must handle models that do not fit in memory twice. A shard is therefore rewritten
tensor by tensor: unchanged tensors are copied as raw bytes from the source file, and only new or changed
tensors are serialized. Peak memory is about one tensor, and the speed is close to a file copy. The safetensors
layout written here (8-byte little-endian header length, JSON header, contiguous data) is the format's
specification; reading uses the safetensors library itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional, Union

import torch
from safetensors import safe_open

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# Files a derived model folder (merged, exported) must not inherit from its base: weights and configs are rewritten,
# and the base's model card and GPTQModel's quantize_config.json would describe another model.
NOT_INHERITED_FILES = frozenset({"config.json", SAFETENSORS_INDEX, "README.md", "quantize_config.json"})
_COPY_CHUNK = 64 << 20
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no config.json: it is not a transformers model folder.")
    with open(path) as f:
        return json.load(f)


def model_architecture(config: dict) -> Optional[str]:
    """The model class a ``config.json`` describes, resolved as ``AutoModelForCausalLM`` resolves it.

    ``architectures`` names it when present; configs written from a config object (and by some converters) have none,
    and then ``model_type`` decides, through transformers' causal-LM mapping (``llama`` -> ``LlamaForCausalLM``).
    """
    architectures = config.get("architectures")
    if architectures:
        return architectures[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))


def gptq_quantization(folder: str) -> dict:
    """The ``quantization_config`` of a GPTQ checkpoint folder, or a clear error if it is not one."""
    quantization = read_config(folder).get("quantization_config") or {}
    if quantization.get("quant_method") != "gptq":
        method = quantization.get("quant_method", "none")
        raise ValueError(
            f"{folder} is not a GPTQ checkpoint (quantization_config.quant_method is {method!r}, expected 'gptq'). "
            "QA-LoRA merges into the zero points of a GPTQ base model."
        )
    quantization = dict(quantization)
    quantization["checkpoint_format"] = quantization.get("checkpoint_format") or quantization.get("format") or "gptq"
    return quantization


def shard_files(folder: str) -> tuple[list[str], dict | None]:
    """The safetensors files of a model folder and its index (``None`` for a single file)."""
    index_path = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
        return sorted(set(index["weight_map"].values())), index
    if os.path.isfile(os.path.join(folder, SAFETENSORS_SINGLE)):
        return [SAFETENSORS_SINGLE], None
    raise ValueError(
        f"{folder} has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}; only safetensors checkpoints are read."
    )


def locate_tensors(folder: str, files: list[str]) -> dict[str, str]:
    """``{tensor name: the shard file holding it}`` over a model folder's safetensors files."""
    return {name: file for file in files for name in tensor_names(os.path.join(folder, file))}


def tensor_names(path: str) -> list[str]:
    with safe_open(path, framework="pt") as f:
        return list(f.keys())


def read_tensors(path: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Only the named tensors of one safetensors file (memory-mapped, so the rest is never read)."""
    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in names}


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


# A planned output tensor: a torch.Tensor to write, or the name of a tensor to copy byte for byte from the source.
TensorSource = Union[torch.Tensor, str]


def write_shard(source: str, destination: str, plan: list[tuple[str, TensorSource]]) -> None:
    """Write ``destination`` with the tensors of ``plan`` in order, copying unchanged ones from ``source`` as bytes.

    The source's ``__metadata__`` is kept.
    """
    header, data_start = _read_header(source)
    out_header: dict = {}
    offset = 0
    for name, item in plan:
        if isinstance(item, str):
            info = header[item]
            begin, end = info["data_offsets"]
            entry = {"dtype": info["dtype"], "shape": info["shape"]}
            size = end - begin
        else:
            entry = {"dtype": _DTYPE_NAMES[item.dtype], "shape": list(item.shape)}
            size = item.numel() * item.element_size()
        out_header[name] = {**entry, "data_offsets": [offset, offset + size]}
        offset += size
    if "__metadata__" in header:
        out_header["__metadata__"] = header["__metadata__"]
    encoded = json.dumps(out_header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data buffer starts 8-byte aligned, as safetensors writes it

    with open(source, "rb", buffering=0) as src, open(destination, "wb", buffering=0) as dst:
        _write_all(dst, struct.pack("<Q", len(encoded)) + encoded)
        for _, item in plan:
            if isinstance(item, str):
                begin, end = header[item]["data_offsets"]
                _copy_range(src.fileno(), dst.fileno(), data_start + begin, end - begin)
            elif item.numel():
                _write_all(dst, item.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def _write_all(file, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[file.write(view) :]


def _copy_range(src_fd: int, dst_fd: int, offset: int, size: int) -> None:
    """Append ``size`` bytes of ``src_fd`` from ``offset`` to ``dst_fd``; in the kernel where the OS allows."""
    copy_file_range = getattr(os, "copy_file_range", None)  # Linux: no trip through user space
    while size:
        copied = 0
        if copy_file_range is not None:
            try:
                copied = copy_file_range(src_fd, dst_fd, size, offset)
            except OSError:
                copy_file_range = None
        if not copied:
            chunk = os.pread(src_fd, min(_COPY_CHUNK, size), offset)
            if not chunk:
                raise OSError(f"unexpected end of file while copying {size} more bytes")
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst_fd, view) :]
            copied = len(chunk)
        offset += copied
        size -= copied


def check_output_folder(out_dir: str, overwrite: bool) -> None:
    """Refuse an output folder that exists and holds something, unless ``overwrite``."""
    if os.path.isfile(out_dir):
        raise ValueError(f"{out_dir} is a file; give a folder path for the output.")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(
            f"{out_dir} already exists and is not empty; choose another path or pass overwrite=True (--overwrite)."
        )


def check_output_file(out_file: str, overwrite: bool) -> None:
    """Refuse an output file path that is a folder, or an existing file unless ``overwrite``."""
    if os.path.isdir(out_file):
        raise ValueError(f"{out_file} is a folder; give the path of the file to write.")
    if os.path.exists(out_file) and not overwrite:
        raise ValueError(f"{out_file} already exists; choose another path or pass overwrite=True (--overwrite).")


def current_umask() -> int:
    """The process's umask (reading it needs setting it; set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_folder(out_dir: str) -> Iterator[str]:
    """Yield a temporary folder beside ``out_dir`` that becomes ``out_dir`` only if the block succeeds.

    On any error (or interrupt) the temporary folder is removed and ``out_dir`` is left as it was.
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".partial", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's folder is private; the result gets a normal folder's mode
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".old", dir=parent)
        os.replace(out_dir, os.path.join(old, "previous"))
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


@contextlib.contextmanager
def atomic_file(out_file: str) -> Iterator[str]:
    """Yield a temporary file path beside ``out_file`` that becomes ``out_file`` only if the block succeeds.

    On any error (or interrupt) the temporary file is removed and ``out_file`` is left as it was.
    """
    out_file = os.path.abspath(out_file)
    parent = os.path.dirname(out_file)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out_file)}.", suffix=".partial", dir=parent)
    os.close(fd)
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; the result gets a normal file's mode
    os.replace(tmp, out_file)


@dataclass(frozen=True)
class GPTQTensorNames:
    """The tensor names of one GPTQ layer in a checkpoint."""

    module: str

    @property
    def qzeros(self) -> str:
        return f"{self.module}.qzeros"

    @property
    def scales(self) -> str:
        return f"{self.module}.scales"

    @property
    def g_idx(self) -> str:
        return f"{self.module}.g_idx"


def gptq_modules(names: list[str]) -> list[str]:
    """Module names that have a GPTQ ``qweight`` among ``names``."""
    return sorted(name.removesuffix(".qweight") for name in names if name.endswith(".qweight"))
