# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""QA-LoRA's exported rows: ``qalora_gguf_row`` exports the base and adapter to GGUF Q4_1 (``export_gguf``) and
scores it dequantized by gguf-py through transformers, with the base alone as a control; ``qalora_mlx_row`` exports
to MLX (``export_mlx``) and scores the fp32 model that ``mlx_dense_state`` dequantizes with ``mx.dequantize``. Each
row is skipped, with its reason, where this peft_qalora or this machine lacks the export.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import finetune_merge_export as example
import torch
from transformers import AutoModelForCausalLM

import peft_qalora

from .common import Setup, free, load_dense, score
from .results import Row, skipped


def qalora_gguf_row(bits: int, base_dir: Path, adapter_dir: Path, setup: Setup, args: argparse.Namespace) -> Row:
    label = "QA-LoRA → GGUF Q4_1 (gguf-py dequantized)"
    export = getattr(peft_qalora, "export_gguf", None)
    if export is None:
        return skipped(bits, "qalora-gguf", label, "this peft_qalora has no export_gguf")

    def export_and_score(adapter: Path | None, name: str) -> tuple[float, object]:
        gguf_file = setup.folder(bits, name)
        report = export(
            str(base_dir), str(adapter) if adapter else None, str(gguf_file), overwrite=True, progressbar=False
        )
        # transformers dequantizes every GGUF tensor with gguf-py into a plain fp32 model.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32, **example.placement(setup.device)
        )
        ppl = score(model, setup, args, f"{bits}-bit {name}")
        del model
        free()
        return ppl, report

    ppl, report = export_and_score(adapter_dir, "qalora.Q4_1.gguf")
    # Control: the base alone through the same export and loader, which should score what the GPTQ base scores.
    ppl_base, _ = export_and_score(None, "base.Q4_1.gguf")
    note = (
        f"fp16 offsets rounded by up to {report.max_offset_rounding:.1e} steps; the base alone as GGUF: {ppl_base:.2f}"
    )
    return Row(bits, "qalora-gguf", label, ppl, note, trained="qalora")


def mlx_dense_state(mlx_dir: Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """Every tensor of an mlx-lm model folder as fp32 torch, quantized layers dequantized with ``mx.dequantize``."""
    import json

    import mlx.core as mx
    import numpy as np

    config = json.loads((mlx_dir / "config.json").read_text())
    quantization = config.get("quantization") or config.get("quantization_config") or {}
    arrays: dict[str, mx.array] = {}
    for file in sorted(mlx_dir.glob("*.safetensors")):
        arrays.update(mx.load(str(file)))
    state = {}
    biases_dtypes = {
        str(array.dtype).removeprefix("mlx.core.") for name, array in arrays.items() if name.endswith(".biases")
    }
    for name, array in arrays.items():
        if name.endswith((".scales", ".biases")):
            continue
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{prefix}.scales" in arrays:
            settings = {**quantization, **(quantization.get(prefix) or {})}  # per-layer overrides, if any
            array = mx.dequantize(
                array,
                arrays[f"{prefix}.scales"],
                arrays[f"{prefix}.biases"],
                group_size=int(settings["group_size"]),
                bits=int(settings["bits"]),
            )
        state[name] = torch.from_numpy(np.array(array.astype(mx.float32)))
    return state, quantization, "/".join(sorted(biases_dtypes))


def qalora_mlx_row(bits: int, base_dir: Path, adapter_dir: Path, setup: Setup, args: argparse.Namespace) -> Row:
    label = "QA-LoRA → MLX affine (mx.dequantize)"
    export = getattr(peft_qalora, "export_mlx", None)
    if export is None:
        return skipped(bits, "qalora-mlx", label, "this peft_qalora has no export_mlx")
    try:
        import mlx.core  # noqa: F401
    except ImportError as exc:
        return skipped(bits, "qalora-mlx", label, f'mlx is not importable here ({exc}); `pip install "mlx[cpu]"`')
    mlx_dir = setup.folder(bits, "qalora-mlx")
    export(str(base_dir), str(adapter_dir), str(mlx_dir), overwrite=True, progressbar=False)
    state, quantization, biases_dtype = mlx_dense_state(mlx_dir)
    model = load_dense(setup.dense_dir, "cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        raise RuntimeError(f"MLX export {mlx_dir} does not match the model: missing {missing}, unexpected {unexpected}")
    model.to(setup.device)
    ppl = score(model, setup, args, f"{bits}-bit QA-LoRA MLX")
    del model, state
    free()
    note = f"group size {quantization.get('group_size')}, {quantization.get('bits')} bits, {biases_dtype} biases"
    return Row(bits, "qalora-mlx", label, ppl, note, trained="qalora")
