# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The ``peft-qalora`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from .calibrated_merge import DEFAULT_METHOD, METHODS
from .calibration import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN
from .convert import CONVERSION_TARGETS, convert_adapter
from .merge import DEFAULT_MAX_ROUNDING_LOSS, ZERO_FORMATS


def _merge(args: argparse.Namespace) -> int:
    from .offline_merge import merge_checkpoint

    _check_hub_arguments(args)

    calibration = None
    if args.calibration_data is not None:
        if args.zero_format != "int":
            raise ValueError("--calibration-data applies to the integer merge: add --zero-format int.")
        calibration = Path(args.calibration_data)
    report = merge_checkpoint(
        args.base_dir,
        args.adapter_dir,
        args.out_dir,
        zero_format=args.zero_format,
        max_rounding_loss=args.max_rounding_loss,
        overwrite=args.overwrite,
        progressbar=not args.quiet,
        calibration=calibration,
        calibration_seq_len=args.calibration_seq_len,
        calibration_max_tokens=args.calibration_max_tokens,
        calibration_method=args.calibration_method,
    )
    if report is not None:
        print(report.summary())
    if args.push_to_hub:
        return _push(args.out_dir, args.push_to_hub, private=args.private)
    return 0


def _add_hub_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help=f"after the {what}, upload the output (model card included) to this Hugging Face Hub model repository, "
        "creating it if needed (log in first: `hf auth login`, or set HF_TOKEN)",
    )
    parser.add_argument("--private", action="store_true", help="with --push-to-hub, create the repository private")


def _check_hub_arguments(args: argparse.Namespace) -> None:
    """Refuse --private without --push-to-hub before any work is done."""
    if args.private and not args.push_to_hub:
        raise ValueError("--private applies to the repository that --push-to-hub creates; pass --push-to-hub REPO.")


def _push(path: str, repo_id: str, private: bool) -> int:
    """Upload a written output (a folder, whose card then names ``repo_id``, or one file); 1 if the upload fails."""
    from .hub_upload import push_file, push_folder

    push = push_file if os.path.isfile(path) else push_folder
    try:
        commit = push(path, repo_id, private=private or None)
    except Exception as exc:  # network, authentication, permissions: the files on disk are complete
        print(
            f"peft-qalora: {path} is complete, but uploading it to {repo_id} failed: {exc}\n"
            f"Upload it again with: hf upload {repo_id} {path}",
            file=sys.stderr,
        )
        return 1
    print(f"Uploaded {path} to {getattr(commit, 'repo_url', repo_id)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    _check_hub_arguments(args)
    adapter_dir = None if args.adapter_dir == "-" else args.adapter_dir
    if args.format == "gguf":
        from .export.gguf import export_gguf

        report = export_gguf(args.base_dir, adapter_dir, args.out, overwrite=args.overwrite, progressbar=not args.quiet)
        print(
            f"Wrote {report.path}: {report.quantized_tensors} Q4_1 tensors, {report.other_tensors} other tensors. "
            f"fp16 rounding of the offsets: mean {report.mean_offset_rounding:.1e}, max "
            f"{report.max_offset_rounding:.1e} quantization steps."
        )
    elif args.format == "gguf-lora":
        from .export.gguf_lora import export_gguf_lora

        if adapter_dir is None:
            raise ValueError("--format gguf-lora writes the adapter itself: give ADAPTER_DIR, not -.")
        report = export_gguf_lora(
            args.base_dir, adapter_dir, args.out, overwrite=args.overwrite, progressbar=not args.quiet
        )
        print(
            f"Wrote {report.path}: a llama.cpp LoRA adapter for {report.architecture} ({report.layers} layers, alpha "
            f"{report.alpha:g}). Run it on the base's GGUF: llama-cli -m BASE.gguf --lora {report.path}"
        )
    else:
        from .export.mlx import export_mlx

        report = export_mlx(args.base_dir, adapter_dir, args.out, overwrite=args.overwrite, progressbar=not args.quiet)
        print(
            f"Wrote {report.out_dir}: {report.quantized_layers} {report.bits}-bit layers, group size "
            f"{report.group_size}, {report.total_bytes / 1e9:.2f} GB in {len(report.files)} file(s)."
        )
    if args.push_to_hub:
        return _push(args.out, args.push_to_hub, private=args.private)
    return 0


def _convert(args: argparse.Namespace) -> None:
    convert_adapter(args.in_dir, args.out_dir, args.to, base_model_dir=args.base, overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-qalora", description="QA-LoRA adapters for GPTQ models.")
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser(
        "merge",
        help="fold a saved QA-LoRA adapter into a GPTQ checkpoint on disk",
        description="Fold a QA-LoRA adapter (what save_pretrained wrote) into the zero points of a GPTQ checkpoint, "
        "streaming shard by shard; OUT_DIR is written atomically.",
    )
    merge.add_argument("base_dir", metavar="BASE_DIR", help="GPTQ checkpoint folder")
    merge.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="QA-LoRA adapter folder")
    merge.add_argument("out_dir", metavar="OUT_DIR", help="folder for the merged model")
    merge.add_argument(
        "--zero-format",
        choices=ZERO_FORMATS,
        default="float",
        help="float: exact real-valued zero points (load with `import peft_qalora`); int: standard GPTQ, rounded "
        "(default: %(default)s)",
    )
    merge.add_argument(
        "--max-rounding-loss",
        type=float,
        default=DEFAULT_MAX_ROUNDING_LOSS,
        help="with --zero-format int, refuse if rounding loses more than this share of the adapter "
        "(with --calibration-data: of its effect on the calibration inputs' layer outputs) (default: %(default)s)",
    )
    merge.add_argument(
        "--calibration-data",
        metavar="FILE",
        help="with --zero-format int: calibrate the merge on this data (UTF-8 text, tokenized with BASE_DIR's "
        "tokenizer; or token ids as .json / .jsonl). The merge then also changes codes and zero points, on the base's "
        "grid, so that each layer's output on this data matches the adapter model's; it loads the model in memory",
    )
    merge.add_argument(
        "--calibration-seq-len",
        type=int,
        default=DEFAULT_SEQ_LEN,
        help="calibration tokens per block (default: %(default)s)",
    )
    merge.add_argument(
        "--calibration-max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="use at most this many calibration tokens (default: %(default)s)",
    )
    merge.add_argument(
        "--calibration-method",
        choices=METHODS,
        default=DEFAULT_METHOD,
        help="how codes and zero points are chosen: sequential keeps the most, greedy is faster (docs/design.md, "
        "'Calibrated integer merge') (default: %(default)s)",
    )
    merge.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    merge.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_hub_arguments(merge, "merge")
    merge.set_defaults(run=_merge)

    export = commands.add_parser(
        "export",
        help="write a GPTQ checkpoint with a QA-LoRA adapter folded in (or the adapter alone) as GGUF or MLX",
        description="Export a GPTQ checkpoint with a saved QA-LoRA adapter folded into it, keeping the GPTQ codes and "
        "scales and moving only the per-group offsets. gguf: one Q4_1 file for llama.cpp (2/3/4-bit, no act-order, "
        "group size a multiple of 32; offsets rounded to fp16, which can cost part of a small adapter). gguf-lora: the "
        "adapter alone as a llama.cpp LoRA GGUF, exact, to run on the base's GGUF (export BASE_DIR - base.gguf "
        "--format gguf). mlx: an mlx-lm model folder (2/3/4/8-bit, groups that are multiples of 32, no act-order), "
        "exact. OUT is written atomically.",
    )
    export.add_argument("base_dir", metavar="BASE_DIR", help="GPTQ checkpoint folder")
    export.add_argument(
        "adapter_dir", metavar="ADAPTER_DIR", help="QA-LoRA adapter folder, or - to convert the GPTQ checkpoint alone"
    )
    export.add_argument("out", metavar="OUT", help="the .gguf file (gguf, gguf-lora) or the model folder (mlx)")
    export.add_argument("--format", required=True, choices=("gguf", "gguf-lora", "mlx"), help="output format")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _add_hub_arguments(export, "export")
    export.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    export.set_defaults(run=_export)

    convert = commands.add_parser(
        "convert",
        help="convert an adapter between QA-LoRA, PEFT's LoRA use_qalora format and plain LoRA",
        description="Convert a saved adapter into another format with the same function; OUT_DIR is written "
        "atomically. qalora: a PEFT LoRA use_qalora adapter to QA-LoRA (mergeable into the GPTQ zero points). "
        "peft-lora: QA-LoRA to PEFT's LoRA use_qalora format (loads with stock PEFT; no act-order). lora: QA-LoRA to "
        "plain LoRA (any LoRA runtime, act-order included).",
    )
    convert.add_argument(
        "in_dir", metavar="IN_DIR", help="adapter folder (adapter_config.json + adapter_model.safetensors)"
    )
    convert.add_argument("out_dir", metavar="OUT_DIR", help="folder for the converted adapter")
    convert.add_argument("--to", required=True, choices=CONVERSION_TARGETS, help="output format")
    convert.add_argument(
        "--base",
        metavar="BASE_DIR",
        help="GPTQ checkpoint folder of the base model, to read its quantization groups (needed for --to qalora, "
        "and for --to lora with act-order; default: the adapter's base_model_name_or_path if it is a local folder)",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    convert.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError) as exc:
        print(f"peft-qalora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
