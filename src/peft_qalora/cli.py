# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The ``peft-qalora`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from .convert import CONVERSION_TARGETS, convert_adapter
from .merge import DEFAULT_MAX_ROUNDING_LOSS, ZERO_FORMATS


def _merge(args: argparse.Namespace) -> None:
    from .offline_merge import merge_checkpoint

    report = merge_checkpoint(
        args.base_dir,
        args.adapter_dir,
        args.out_dir,
        zero_format=args.zero_format,
        max_rounding_loss=args.max_rounding_loss,
        overwrite=args.overwrite,
        progressbar=not args.quiet,
    )
    if report is not None:
        print(report.summary())


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
        "(default: %(default)s)",
    )
    merge.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    merge.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    merge.set_defaults(run=_merge)

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
        args.run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"peft-qalora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
