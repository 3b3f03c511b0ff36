# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The usual route ("QLoRA w/ GPTQ" in the paper): ``run_usual_route`` trains plain LoRA on the GPTQ base and
scores it unmerged, merged into the dequantized fp32 weights (``merge_lora_into_dense``, with each GPTQ layer's
``dequantized_weight``), and that dense model quantized again with GPTQ on the same calibration sequences.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import finetune_merge_export as example
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel, set_seed

from peft_qalora.float_zero_linear import FloatZeroGPTQLinear
from peft_qalora.merge import read_zero_points
from peft_qalora.model import base_quantization

from .common import PROJECTIONS, Setup, free, load_dense, logger, quiet_stdout, score, train
from .results import Results, Row


def dequantized_weight(layer: torch.nn.Module, checkpoint_format: str | None) -> torch.Tensor:
    """The dense fp32 weight (out x in) of a GPTQ layer, ``s * (q - z)``."""
    return FloatZeroGPTQLinear.from_gptq(layer, read_zero_points(layer, checkpoint_format)).dequantize_weight().t()


@torch.no_grad()
def merge_lora_into_dense(model: PeftModel, setup: Setup) -> PreTrainedModel:
    """The fp32 model whose projections are the GPTQ base dequantized plus the LoRA delta ``scaling * B @ A``."""
    inner = model.get_base_model()
    checkpoint_format = (base_quantization(inner) or {}).get("checkpoint_format")
    dense = load_dense(setup.dense_dir, setup.device)
    merged = 0
    for name, module in inner.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = dequantized_weight(module.get_base_layer(), checkpoint_format)
        for adapter in module.active_adapters:
            a, b = module.lora_A[adapter].weight.float(), module.lora_B[adapter].weight.float()
            weight = weight + module.scaling[adapter] * (b @ a)
        target = dense.get_submodule(name).weight
        if target.shape != weight.shape:
            raise RuntimeError(f"{name}: dense weight {tuple(target.shape)} vs merged {tuple(weight.shape)}")
        target.copy_(weight)
        merged += 1
    logger.info("Merged LoRA into %d dequantized projections", merged)
    return dense


def run_usual_route(bits: int, base_dir: Path, setup: Setup, args: argparse.Namespace, results: Results) -> None:
    wanted = set(args.rows)
    set_seed(args.seed)
    model = example.load_gptq_model(base_dir, bits, setup.device)
    config = LoraConfig(r=args.r, lora_alpha=args.r, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    note = train(model, setup, args, f"LoRA {bits}-bit")
    ppl = score(model, setup, args, f"{bits}-bit LoRA")
    if "lora" in wanted:
        results.add(Row(bits, "lora", "usual route: LoRA on GPTQ, unmerged", ppl, note))
    if not {"lora-fp32", "lora-gptq"} & wanted:
        return
    dense = merge_lora_into_dense(model, setup)
    del model
    free()
    if "lora-fp32" in wanted:
        ppl_dense = score(dense, setup, args, f"{bits}-bit LoRA merged, fp32")
        label = "usual route: merged into dequantized fp32 weights"
        results.add(Row(bits, "lora-fp32", label, ppl_dense, trained="lora"))
    if "lora-gptq" not in wanted:
        return
    dense_dir = setup.folder(bits, "lora-merged-fp32")
    dense.save_pretrained(dense_dir)
    setup.tokenizer.save_pretrained(dense_dir)
    del dense
    free()
    requantized = setup.folder(bits, "lora-merged-gptq")
    with quiet_stdout():
        example.quantize_gptq(
            str(dense_dir), setup.tokenizer, setup.calibration, bits, args.group_size, setup.device, requantized
        )
    model = example.load_gptq_model(requantized, bits, setup.device)
    ppl_gptq = score(model, setup, args, f"{bits}-bit LoRA merged, GPTQ again")
    del model
    free()
    results.add(
        Row(
            bits,
            "lora-gptq",
            'usual route: merged, GPTQ-quantized again ("QLoRA w/ GPTQ")',
            ppl_gptq,
            f"GPTQ on the same {len(setup.calibration)} calibration sequences",
            trained="lora",
        )
    )
