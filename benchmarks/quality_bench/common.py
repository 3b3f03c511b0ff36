# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""What every row shares, built on the example's functions: the ``logger``, the ``PROJECTIONS`` every adapter
targets, ``Setup`` (the model source and tokenizer, the dense model folder, the training, held-out and calibration
blocks, the cached GPTQ bases and the work folder) made by ``prepare``, and the helpers of every row: ``train`` with
the shared budget, ``score`` (held-out perplexity), ``load_dense`` (an fp32 model), ``free`` and ``quiet_stdout``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import finetune_merge_export as example
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger("quality")


# The decoder projections of Llama-style models: the layers GPTQ quantizes and every adapter here targets.
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def configure(threads: int) -> None:
    """The benchmarks' logging (timestamps; the libraries' own INFO chatter off) and torch's CPU threads (0: default)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("gptqmodel", "transformers", "optimum", "peft_qalora"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if threads:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def work_folder(out: Path | None, prefix: str) -> Iterator[Path]:
    """Where a run keeps its adapters and merged models: ``--out`` (created, kept) or a temporary folder."""
    if out:
        out.mkdir(parents=True, exist_ok=True)
        yield out.resolve()
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as work:
            yield Path(work)


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
