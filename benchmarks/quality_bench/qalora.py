# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""QA-LoRA's rows: ``run_qalora`` trains one adapter per bit width (or reloads it with ``--reuse-adapters``) and
scores it unmerged, merged into float zero points and reloaded, in bf16 (``qalora_bf16_rows``), merged into integer
zero points (``qalora_int_row``) and with the calibrated integer merge (``qalora_int_calibrated_row``), then hands
the adapter to the GGUF and MLX rows of ``qalora_export``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import finetune_merge_export as example
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, set_seed

import peft_qalora
from peft_qalora.float_zero_linear import FloatZeroGPTQLinear

from .common import PROJECTIONS, Setup, free, load_dense, quiet_stdout, score, train
from .qalora_export import qalora_gguf_row, qalora_mlx_row
from .results import Results, Row


def run_qalora(bits: int, base_dir: Path, setup: Setup, args: argparse.Namespace, results: Results) -> None:
    wanted = set(args.rows)
    set_seed(args.seed)
    model = example.load_gptq_model(base_dir, bits, setup.device)
    saved = setup.work / f"w{bits}" / "qalora-adapter"
    if args.reuse_adapters and saved.is_dir():
        # The adapter an earlier run with the same --out trained (same settings, same seed): rows added later reuse it.
        model = PeftModel.from_pretrained(model, saved, is_trainable=True)
        note = f"adapter trained by an earlier run ({saved})"
        adapter_dir = saved
    else:
        config = peft_qalora.QALoraConfig(
            r=args.r, lora_alpha=args.r, target_modules=PROJECTIONS, task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, config)
        note = train(model, setup, args, f"QA-LoRA {bits}-bit")
        adapter_dir = setup.folder(bits, "qalora-adapter")
        model.save_pretrained(adapter_dir)
    ppl = score(model, setup, args, f"{bits}-bit QA-LoRA")
    if "qalora" in wanted:
        results.add(Row(bits, "qalora", "QA-LoRA, unmerged", ppl, note))

    if wanted & {"qalora-float", "qalora-bf16"}:
        merged_dir = setup.folder(bits, "qalora-merged-float")
        merged = model.merge_and_unload()  # float zero points: exact
        merged.save_pretrained(merged_dir)
        del model, merged
        free()
    else:
        del model
    free()
    if "qalora-float" in wanted:
        reloaded = load_dense(merged_dir, setup.device)  # quant_method "peft_qalora", loads after `import peft_qalora`
        ppl_merged = score(reloaded, setup, args, f"{bits}-bit QA-LoRA merged, float zeros")
        del reloaded
        results.add(
            Row(
                bits,
                "qalora-float",
                "QA-LoRA merged, float zeros (reloaded)",
                ppl_merged,
                f"vs unmerged {ppl_merged / ppl - 1:+.1e}",
                trained="qalora",
            )
        )
        free()
    if "qalora-bf16" in wanted:
        for row in qalora_bf16_rows(bits, base_dir, adapter_dir, merged_dir, setup, args):
            results.add(row)

    if "qalora-int" in wanted:
        results.add(qalora_int_row(bits, base_dir, adapter_dir, setup, args))
    if "qalora-int-calibrated" in wanted:
        for method in args.calibration_method:
            results.add(qalora_int_calibrated_row(bits, base_dir, adapter_dir, setup, args, method))
    if "qalora-gguf" in wanted:
        results.add(qalora_gguf_row(bits, base_dir, adapter_dir, setup, args))
    if "qalora-mlx" in wanted:
        results.add(qalora_mlx_row(bits, base_dir, adapter_dir, setup, args))


def qalora_bf16_rows(
    bits: int, base_dir: Path, adapter_dir: Path, merged_dir: Path, setup: Setup, args: argparse.Namespace
) -> list[Row]:
    """The adapter on its GPTQ base and the reloaded merged model, loaded with ``dtype=torch.bfloat16``."""
    from transformers import GPTQConfig

    with quiet_stdout():
        base = AutoModelForCausalLM.from_pretrained(
            base_dir,
            dtype=torch.bfloat16,
            quantization_config=GPTQConfig(bits=bits, backend="gptq_torch"),
            **example.placement(setup.device),
        )
    unmerged = PeftModel.from_pretrained(base, adapter_dir)
    ppl_unmerged = score(unmerged, setup, args, f"{bits}-bit QA-LoRA unmerged, bf16")
    del unmerged, base
    free()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16, **example.placement(setup.device))
    zeros = {m.zeros.dtype for m in merged.modules() if isinstance(m, FloatZeroGPTQLinear)}
    ppl_merged = score(merged, setup, args, f"{bits}-bit QA-LoRA merged, float zeros, bf16")
    del merged
    free()
    zeros_note = "/".join(sorted(str(d).removeprefix("torch.") for d in zeros))
    return [
        Row(bits, "qalora-bf16", "QA-LoRA, unmerged, bf16", ppl_unmerged, "", trained="qalora"),
        Row(
            bits,
            "qalora-float-bf16",
            "QA-LoRA merged, float zeros (reloaded), bf16",
            ppl_merged,
            f"vs unmerged bf16 {ppl_merged / ppl_unmerged - 1:+.1e}; zeros kept in {zeros_note}",
            trained="qalora",
        ),
    ]


def qalora_int_row(bits: int, base_dir: Path, adapter_dir: Path, setup: Setup, args: argparse.Namespace) -> Row:
    label = "QA-LoRA merged, integer zeros (stock GPTQ)"
    int_dir = setup.folder(bits, "qalora-merged-int")
    try:
        # Rounding forced (max_rounding_loss=1.0) to measure what it costs; the default would refuse above 5%.
        report = peft_qalora.merge_checkpoint(
            str(base_dir), str(adapter_dir), str(int_dir), zero_format="int", max_rounding_loss=1.0, progressbar=False
        )
    except peft_qalora.RoundingLossError as exc:  # clamped zero points are refused whatever the limit
        report = exc.report
        return Row(
            bits,
            "qalora-int",
            label,
            None,
            f"refused: {report.clamped_groups} zero points would leave the {bits}-bit grid; kept {report.kept:.1%}",
            trained="qalora",
        )
    model = example.load_gptq_model(int_dir, bits, setup.device)
    ppl = score(model, setup, args, f"{bits}-bit QA-LoRA merged, integer zeros")
    del model
    free()
    return Row(
        bits,
        "qalora-int",
        label,
        ppl,
        f"merge report: kept {report.kept:.1%} of the adapter, largest rounding error "
        f"{report.max_error_steps:.2f} steps",
        trained="qalora",
    )


def qalora_int_calibrated_row(
    bits: int, base_dir: Path, adapter_dir: Path, setup: Setup, args: argparse.Namespace, method: str
) -> Row:
    label = f"QA-LoRA merged, calibrated integer codes and zeros (stock GPTQ), {method}"
    out = setup.folder(bits, f"qalora-merged-int-calibrated-{method}")
    start = time.perf_counter()
    # Forced (max_rounding_loss=1.0) to measure what it keeps; the default refuses a merge that loses over 5%.
    report = peft_qalora.merge_checkpoint(
        str(base_dir),
        str(adapter_dir),
        str(out),
        zero_format="int",
        max_rounding_loss=1.0,
        calibration=list(setup.calibration),
        calibration_method=method,
        progressbar=False,
    )
    seconds = time.perf_counter() - start
    model = example.load_gptq_model(out, bits, setup.device)
    ppl = score(model, setup, args, f"{bits}-bit QA-LoRA merged, calibrated integer")
    del model
    free()
    what = (
        "of the layer-output error the base codes leave on the merged model's inputs (sequential)"
        if method == "sequential"
        else "of the adapter's effect on the layer outputs"
    )
    note = (
        f"merge report: kept {report.kept:.1%} {what}, on "
        f"{sum(b.numel() for b in setup.calibration):,} calibration tokens, {report.codes_changed:,} codes "
        f"({report.codes_changed / report.codes_total:.2%}) and {report.zeros_changed:,} zero points changed, "
        f"{seconds:.0f} s (model load, calibration, solve, write)"
    )
    return Row(bits, "qalora-int-calibrated", label, ppl, note, trained="qalora")
