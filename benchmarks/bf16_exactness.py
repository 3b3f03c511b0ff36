# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Is the merged model still the trained model when it computes in bf16? Held-out perplexity, arithmetic by arithmetic.

The merge is exact in fp32 (``benchmarks/quality.py``: merged vs unmerged -5e-5). In bf16 every model computes with
rounding, and the unmerged adapter model and the merged model round in different places, so their perplexities differ
by the rounding of each, not by the merge. This benchmark trains one QA-LoRA adapter (quality.py's recipe), merges it
into float zero points, and scores the held-out text with each way of computing it:

* fp32: the unmerged adapter model (the reference: the model that was trained) and the merged model;
* bf16, unmerged: the GPTQ base (``gptq_torch``: fp16 weight from fp16 scales, cast to bf16, bf16 matmul) plus the
  adapter as PEFT runs it (fp32 adapter weights, PEFT's default) on this package's half-precision path (pooled sums
  in fp32, ``B`` in bf16), the base's and the adapter's outputs each rounded to bf16 and then their sum;
* bf16, unmerged, adapter branch in fp32: the same with the whole adapter branch in fp32
  (``layer._HALF_INPUT_FAST_PATH`` off);
* bf16, merged, CPU path: the merged model's own CPU path (weight rounded to bf16 once, bf16 matmul), which CUDA
  takes above 64 rows too (dequantize + cuBLAS);
* bf16, merged, CUDA kernel's arithmetic: as the fused CUDA kernel computes 1-64 rows (fp32 weight from codes, fp16
  scales and fp32 zeros, fp32 sums, the output rounded to bf16 once), emulated in torch;
* bf16, merged, tinygemm's arithmetic: as torch's int4 CUDA kernel ``_weight_int4pack_mm`` would compute it (bf16
  scales, bf16 offsets ``s * (8 - z')``, each weight one bf16 multiply-add), emulated in torch.

The table gives each row's perplexity against the fp32 reference and against the unmerged bf16 model::

    TORCHDYNAMO_DISABLE=1 python benchmarks/bf16_exactness.py --table benchmarks/results/bf16_exactness_cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_bench  # noqa: E402  (imports the example first, which sets the environment before torch)
import torch  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from quality_bench.common import (
    PROJECTIONS,
    Setup,
    configure,
    free,
    prepare,
    quiet_stdout,
    score,
    train,
    work_folder,
)  # noqa: E402
from transformers import AutoModelForCausalLM, GPTQConfig, set_seed  # noqa: E402

import peft_qalora  # noqa: E402
from peft_qalora import layer as qalora_layer  # noqa: E402
from peft_qalora.float_zero_linear import FloatZeroGPTQLinear  # noqa: E402
from peft_qalora.gptq import unpack_qweight  # noqa: E402

example = quality_bench.example
logger = logging.getLogger("bf16_exactness")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="as in quality.py (default: the example's SmolLM2-135M)")
    parser.add_argument("--data", type=Path, default=example.DEFAULT_TRAIN_DATA, help="training text (%(default)s)")
    parser.add_argument("--eval-data", type=Path, default=example.DEFAULT_EVAL_DATA, help="held-out text (%(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=example.DEFAULT_CACHE_DIR, help="shared with the example")
    parser.add_argument("--out", type=Path, help="keep the adapter and the merged model here; reused when present")
    parser.add_argument("--table", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4, help="GPTQ bits (%(default)s)")
    parser.add_argument("--group-size", type=example.positive_int, default=32, help="GPTQ group size (%(default)s)")
    parser.add_argument("--calibration-samples", type=example.positive_int, default=16, help="GPTQ calibration blocks")
    parser.add_argument("--steps", type=example.positive_int, default=20, help="training steps (%(default)s)")
    parser.add_argument("--batch-size", type=example.positive_int, default=2, help="sequences per step (%(default)s)")
    parser.add_argument("--seq-len", type=example.positive_int, default=256, help="tokens per sequence (%(default)s)")
    parser.add_argument("--lr", type=example.positive_float, default=2e-3, help="constant learning rate")
    parser.add_argument("--r", type=example.positive_int, default=16, help="rank and alpha (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="adapter init and data order (%(default)s)")
    parser.add_argument("--eval-tokens", type=example.positive_int, default=2048, help="held-out tokens (%(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    args = parser.parse_args(argv)
    args.device = "cpu"  # the arithmetic is the point: the same on any device, and the CPU is always there
    return args


@contextlib.contextmanager
def merged_weight_arithmetic(build: Callable[[FloatZeroGPTQLinear], torch.Tensor]) -> Iterator[None]:
    """``FloatZeroGPTQLinear`` computes ``(x.float() @ build(layer)).to(x.dtype)``: fp32 sums, the output rounded once.

    ``build`` gives the fp32 (in_features x out_features) weight a kernel effectively multiplies by (cached per layer).
    """
    original = FloatZeroGPTQLinear.forward
    weights: dict[int, torch.Tensor] = {}

    def forward(self: FloatZeroGPTQLinear, x: torch.Tensor) -> torch.Tensor:
        weight = weights.get(id(self))
        if weight is None:
            weight = weights[id(self)] = build(self)
        out = (x.reshape(-1, self.in_features).float() @ weight).to(x.dtype)
        if self.bias is not None:  # the kernels' callers add the bias after the rounding, in the activation dtype
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    FloatZeroGPTQLinear.forward = forward
    try:
        yield
    finally:
        FloatZeroGPTQLinear.forward = original


def cuda_kernel_arithmetic() -> contextlib.AbstractContextManager[None]:
    """As the fused CUDA kernel computes: the exact fp32 weight from codes, fp16 scales and fp32 zeros.

    The kernel multiplies the activations by the integer codes (exact in fp32), applies scale and zero per group in
    fp32 and rounds only its output (benchmarks/results/gpu.md: its error against fp64 equals that output rounding);
    up to the order of the fp32 sums this is the exact weight with fp32 sums.
    """
    return merged_weight_arithmetic(FloatZeroGPTQLinear.dequantize_weight)


def tinygemm_weight(layer: FloatZeroGPTQLinear) -> torch.Tensor:
    """The weight torch's int4 CUDA kernel (``_weight_int4pack_mm``, tinygemm) would use for this layer.

    tinygemm computes ``w = (q - 8) * scale + offset`` per weight with one bf16 multiply-add, from bf16 scales and
    bf16 offsets ``s * (8 - z')``: the scale rounds to bf16 (as GPTQModel's Marlin does for bf16 activations), the
    offset keeps bf16's relative precision (for a symmetric base it is the adapter's shift ``s * (z - z')`` alone),
    and each weight rounds to bf16 once.
    """
    codes = unpack_qweight(layer.qweight, layer.bits, layer.in_features).float()
    g = layer.g_idx.long()
    midpoint = 2 ** (layer.bits - 1)
    scale = layer.scales.to(torch.bfloat16).float()
    offset = (layer.scales.float() * (midpoint - layer.zeros)).to(torch.bfloat16).float()
    return ((codes - midpoint) * scale[g] + offset[g]).to(torch.bfloat16).float()


def tinygemm_arithmetic() -> contextlib.AbstractContextManager[None]:
    """As torch's int4 CUDA kernel would compute the merged model (:func:`tinygemm_weight`, fp32 sums)."""
    return merged_weight_arithmetic(tinygemm_weight)


@contextlib.contextmanager
def fp32_adapter_branch() -> Iterator[None]:
    """The unmerged adapter's branch computed wholly in fp32, its output rounded once (not the half fast path)."""
    saved = qalora_layer._HALF_INPUT_FAST_PATH
    qalora_layer._HALF_INPUT_FAST_PATH = False
    try:
        yield
    finally:
        qalora_layer._HALF_INPUT_FAST_PATH = saved


def load_unmerged(base_dir: Path, adapter_dir: Path, bits: int, dtype: torch.dtype) -> PeftModel:
    with quiet_stdout():
        base = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=dtype, quantization_config=GPTQConfig(bits=bits, backend="gptq_torch")
        )
    return PeftModel.from_pretrained(base, adapter_dir)


def trained_adapter(args: argparse.Namespace, setup: Setup, base_dir: Path) -> tuple[Path, Path]:
    """The adapter and its float-zero merge (trained and merged here unless ``--out`` holds them from a run before)."""
    adapter_dir, merged_dir = setup.work / "qalora-adapter", setup.work / "qalora-merged-float"
    if adapter_dir.is_dir() and merged_dir.is_dir():
        logger.info("Reusing the adapter and merged model in %s", setup.work)
        return adapter_dir, merged_dir
    set_seed(args.seed)
    model = example.load_gptq_model(base_dir, args.bits, setup.device)
    config = peft_qalora.QALoraConfig(r=args.r, lora_alpha=args.r, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    train(model, setup, args, f"QA-LoRA {args.bits}-bit")
    model.save_pretrained(adapter_dir)
    model.merge_and_unload().save_pretrained(merged_dir)
    del model
    free()
    return adapter_dir, merged_dir


def run(args: argparse.Namespace, work: Path) -> list[tuple[str, str, float]]:
    setup = prepare(args, work)
    with quiet_stdout():
        base_dir = setup.base_dir(args.bits, args.group_size)
    adapter_dir, merged_dir = trained_adapter(args, setup, base_dir)
    bf16 = torch.bfloat16

    def unmerged(dtype: torch.dtype) -> PeftModel:
        return load_unmerged(base_dir, adapter_dir, args.bits, dtype)

    def merged(dtype: torch.dtype) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype)

    nothing = contextlib.nullcontext
    variants = [  # (dtype, label, load, arithmetic)
        ("fp32", "unmerged adapter on its GPTQ base (reference)", lambda: unmerged(torch.float32), nothing),
        ("fp32", "merged, float zeros", lambda: merged(torch.float32), nothing),
        (
            "bf16",
            "unmerged: gptq_torch base, fp32 adapter (PEFT's default), B in bf16",
            lambda: unmerged(bf16),
            nothing,
        ),
        ("bf16", "unmerged, adapter branch in fp32", lambda: unmerged(bf16), fp32_adapter_branch),
        ("bf16", "merged, CPU path (weight rounded to bf16)", lambda: merged(bf16), nothing),
        (
            "bf16",
            "merged, CUDA kernel's arithmetic (fp32 weight and sums)",
            lambda: merged(bf16),
            cuda_kernel_arithmetic,
        ),
        ("bf16", "merged, tinygemm's arithmetic (bf16 scales and offsets)", lambda: merged(bf16), tinygemm_arithmetic),
    ]
    rows = []
    for dtype_name, label, load, arithmetic in variants:
        model = load()
        with arithmetic(), torch.no_grad():
            ppl = score(model, setup, args, f"{dtype_name} {label}")
        logger.info("ROW %s %s: %.4f", dtype_name, label, ppl)
        rows.append((dtype_name, label, ppl))
        del model
        free()
    return rows


def render(rows: list[tuple[str, str, float]], args: argparse.Namespace, argv: list[str], seconds: float) -> str:
    reference = rows[0][2]
    unmerged_bf16 = next(ppl for dtype, label, ppl in rows if dtype == "bf16" and label.startswith("unmerged:"))
    lines = [
        "| dtype | model, arithmetic | held-out perplexity | vs fp32 unmerged | vs bf16 unmerged |",
        "|---|---|---|---|---|",
    ]
    for dtype, label, ppl in rows:
        versus_bf16 = f"{ppl / unmerged_bf16 - 1:+.3%}" if dtype == "bf16" else "—"
        lines.append(f"| {dtype} | {label} | {ppl:.3f} | {ppl / reference - 1:+.3%} | {versus_bf16} |")
    command = shlex.join(["TORCHDYNAMO_DISABLE=1", "python", "benchmarks/bf16_exactness.py", *argv])
    lines += [
        "",
        f"{args.bits}-bit GPTQ g{args.group_size} base of the example's model; QA-LoRA r = alpha = {args.r}, "
        f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens of {args.data.name}, lr {args.lr}, seed "
        f"{args.seed}; perplexity on {args.eval_tokens:,} tokens of {args.eval_data.name} in blocks of {args.seq_len}. "
        f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads.",
        f"Wall time: {seconds / 60:.1f} min. Command: `{command}`",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    configure(args.threads)
    start = time.perf_counter()
    try:
        with work_folder(args.out, "qalora-bf16-") as work:
            rows = run(args, work)
    except example.JobError as exc:
        logger.error("%s", exc)
        return 2
    table = render(rows, args, argv, time.perf_counter() - start)
    print(table)
    if args.table:
        args.table.write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
