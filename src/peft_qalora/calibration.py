# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Calibration data for the calibrated integer merge: reading it, tokenizing it, and each layer's input Hessian.

One place for both merges (``merge_and_unload(zero_format="int", calibration=...)`` and the offline
``merge_checkpoint`` / ``peft-qalora merge --calibration-data``), so they read the same data into the same token
blocks and the same Hessians.

Calibration data is text or token ids:

* a ``str`` (text), or a list of ``str`` (documents);
* token ids: a 1-D or 2-D integer ``torch.Tensor``, a list of ints, or a list of lists of ints;
* a file (a ``pathlib.Path`` in Python, ``FILE`` on the command line): UTF-8 text; ``.json`` holding token ids
  (a list of ints, a list of lists, or ``{"input_ids": ...}``); or ``.jsonl``, one record a line (a list of ints,
  ``{"input_ids": [...]}`` or ``{"text": "..."}``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 512
DEFAULT_MAX_TOKENS = 32768
# Fewer calibration tokens than a layer has inputs leave H = X^T X singular: error feedback then trades real error
# for error in directions the data never showed. Below this many tokens per input channel, refuse.
MIN_TOKENS_PER_INPUT = 2

CalibrationData = Union[str, os.PathLike, Sequence[str], torch.Tensor, Sequence[int], Sequence[Sequence[int]]]


class CalibrationError(ValueError):
    """Calibration data that is missing, unreadable or too small for the calibrated integer merge."""


def read_calibration_file(path: str | os.PathLike) -> Union[str, list]:
    """The content of a calibration file: text (``str``), or token ids / texts (a list) from ``.json`` / ``.jsonl``."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"Calibration data {path} is not a file.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(
            f"Calibration data {path} is not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 4]!r}); give a "
            "UTF-8 text file, or token ids as .json / .jsonl."
        ) from None
    if path.suffix == ".json":
        try:
            content = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"Calibration data {path} is not valid JSON: {exc}.") from None
        return content["input_ids"] if isinstance(content, dict) and "input_ids" in content else content
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path}, line {number}: not valid JSON: {exc}.") from None
            if isinstance(record, dict):
                if "input_ids" not in record and "text" not in record:
                    raise CalibrationError(f"{path}, line {number}: a record needs 'input_ids' or 'text'.")
                record = record.get("input_ids", record.get("text"))
            records.append(record)
        return records
    return text


def _is_token_ids(data: Any) -> bool:
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence) or not data:
        return False
    first = data[0]
    return isinstance(first, (int, torch.Tensor)) or (isinstance(first, Sequence) and not isinstance(first, str))


def _token_sequences(data: Any) -> list[torch.Tensor]:
    """Token-id data as a list of 1-D int64 tensors; a clear error for anything that is not integers."""
    if isinstance(data, torch.Tensor):
        if data.is_floating_point() or data.is_complex() or data.dim() not in (1, 2):
            raise CalibrationError(
                f"Calibration token ids must be a 1-D or 2-D integer tensor, got {data.dim()}-D {data.dtype}."
            )
        return list(data.to(torch.int64).reshape(-1, data.shape[-1])) if data.numel() else []
    rows = [data] if isinstance(data[0], int) else list(data)
    sequences = []
    for i, row in enumerate(rows):
        if isinstance(row, torch.Tensor):
            if row.is_floating_point() or row.is_complex():
                raise CalibrationError(f"Calibration token ids: sequence {i} is a {row.dtype} tensor, not integers.")
            sequences.extend(_token_sequences(row))
            continue
        if not isinstance(row, Sequence) or isinstance(row, str) or not all(isinstance(t, int) for t in row):
            raise CalibrationError(f"Calibration token ids: sequence {i} is not a list of integers.")
        if row:
            sequences.append(torch.tensor(row, dtype=torch.int64))
    return sequences


def _tokenize(texts: Iterable[str], tokenizer: Any, first: int = 0) -> list[torch.Tensor]:
    if tokenizer is None:
        raise CalibrationError(
            "Calibration data is text, but no tokenizer was given or found: pass `tokenizer=` (or token ids)."
        )
    sequences = []
    for i, text in enumerate(texts, first):
        if not isinstance(text, str):
            raise CalibrationError(f"Calibration data: document {i} is {type(text).__name__}, not text.")
        try:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        except Exception as exc:  # a tokenizer's own errors come in many types; say which document it was
            raise CalibrationError(f"The tokenizer cannot read calibration document {i}: {exc}") from exc
        if ids:
            sequences.append(torch.tensor(ids, dtype=torch.int64))
    return sequences


def calibration_blocks(
    data: CalibrationData,
    tokenizer: Any = None,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    vocab_size: int | None = None,
) -> list[torch.Tensor]:
    """Calibration data as token blocks of at most ``seq_len`` (each a 1-D int64 tensor), ``max_tokens`` in all.

    Every document or token sequence is cut into blocks of ``seq_len`` on its own (a shorter last block is kept), so
    no block spans two documents. Raises :class:`CalibrationError` for missing, unreadable or out-of-vocabulary data.
    """
    if seq_len <= 0 or max_tokens <= 0:
        raise CalibrationError(f"seq_len and max_tokens must be positive, got {seq_len} and {max_tokens}.")
    if data is None:
        raise CalibrationError(
            "The calibrated integer merge needs calibration data (text or token ids from the fine-tuning "
            "distribution): pass `calibration=` (`--calibration-data FILE` on the command line)."
        )
    if isinstance(data, os.PathLike):
        data = read_calibration_file(data)
    if isinstance(data, str):
        sequences = _tokenize([data], tokenizer)
    elif isinstance(data, torch.Tensor) or (isinstance(data, Sequence) and data and isinstance(data[0], int)):
        sequences = _token_sequences(data)
    elif isinstance(data, Sequence):  # documents: texts and token-id sequences, mixed as a .jsonl file may hold them
        sequences = []
        for i, item in enumerate(data):
            if isinstance(item, str):
                sequences.extend(_tokenize([item], tokenizer, first=i))
            elif isinstance(item, (torch.Tensor, Sequence)) and not isinstance(item, bytes):
                sequences.extend(_token_sequences(item) if len(item) else [])
            else:
                raise CalibrationError(f"Calibration data: document {i} is {type(item).__name__}, not text or ids.")
    else:
        raise CalibrationError(
            f"Calibration data must be text, a list of texts or token ids, got {type(data).__name__}."
        )
    if not sequences:
        raise CalibrationError("The calibration data holds no tokens.")
    for i, sequence in enumerate(sequences):
        low, high = int(sequence.min()), int(sequence.max())
        if low < 0 or (vocab_size is not None and high >= vocab_size):
            raise CalibrationError(
                f"Calibration sequence {i} has token ids {low}..{high}, outside the model's vocabulary "
                f"(0..{vocab_size - 1 if vocab_size else '?'})."
            )
    blocks, total = [], 0
    for sequence in sequences:
        for block in sequence.split(seq_len):
            block = block[: max_tokens - total]
            blocks.append(block)
            total += block.numel()
            if total >= max_tokens:
                return blocks
    return blocks


def require_tokens(blocks: list[torch.Tensor], in_features: int) -> int:
    """The number of calibration tokens; a clear error if there are too few for an ``in_features`` Hessian."""
    tokens = sum(block.numel() for block in blocks)
    needed = MIN_TOKENS_PER_INPUT * in_features
    if tokens < needed:
        raise CalibrationError(
            f"{tokens} calibration tokens are too few: the widest adapted layer has {in_features} inputs, and its "
            f"input Hessian needs at least {needed} tokens ({MIN_TOKENS_PER_INPUT} per input) to be usable; "
            "thousands are better. Give more calibration text."
        )
    return tokens


def equal_length_batches(blocks: list[torch.Tensor], batch_tokens: int = 4096) -> list[torch.Tensor]:
    """Consecutive blocks of equal length stacked into batches of at most ``batch_tokens`` (no padding)."""
    batches: list[list[torch.Tensor]] = []
    for block in blocks:
        last = batches[-1] if batches else None
        if last and last[0].numel() == block.numel() and (len(last) + 1) * block.numel() <= batch_tokens:
            last.append(block)
        else:
            batches.append([block])
    return [torch.stack(batch) for batch in batches]


class HessianCollector:
    """Forward pre-hooks summing ``X^T X`` of each named module's input over calibration forwards (fp32).

    Modules that receive the very same input tensor (q/k/v projections, gate/up) share one sum: it is computed and
    stored once.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}  # module name -> the module whose sum it shares
        self.tokens = 0
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._first_batch = True
        self._handles: list = []

    def _hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.dtype)
            if self._first_batch and key in self._seen:
                self.aliases[name] = self._seen[key][0]
            if name in self.aliases:
                return
            self._seen[key] = (name, x)  # keeps x alive for the batch, so its address is not reused
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            if name not in self.sums:
                self.sums[name] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float32, device=flat.device)
            self.sums[name].addmm_(flat.t(), flat)

        return pre_hook

    @torch.no_grad()
    def run(
        self, model: nn.Module, blocks: list[torch.Tensor], progressbar: bool = False, batch_tokens: int = 4096
    ) -> None:
        """Run ``model`` on every block; blocks of equal length are batched (no padding ever enters the sums).

        Only the backbone runs when it holds every hooked layer: the output head's logits are not needed.
        """
        device = next(model.parameters()).device
        backbone = getattr(model, "base_model", None)
        if isinstance(backbone, nn.Module) and backbone is not model:
            inside = {id(m) for m in backbone.modules()}
            if not all(id(m) in inside for m in self.modules.values()):
                backbone = model
        else:
            backbone = model
        batches = equal_length_batches(blocks, batch_tokens)
        was_training = model.training
        model.eval()
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            for batch in tqdm(batches, disable=not progressbar, desc="Calibration: layer input Hessians"):
                self._seen.clear()
                backbone(input_ids=batch.to(device))
                self._first_batch = False
                self.tokens += batch.numel()
        finally:
            for handle in self._handles:
                handle.remove()
            self._seen.clear()
            model.train(was_training)

    def hessian(self, name: str) -> torch.Tensor:
        """``X^T X / tokens`` of the named module's calibration inputs."""
        return self.sums[self.aliases.get(name, name)] / max(self.tokens, 1)


def default_tokenizer(name_or_path: str | os.PathLike | None) -> Any:
    """The tokenizer saved with a local model folder, or ``None`` (text calibration data then needs ``tokenizer=``)."""
    if not name_or_path or not os.path.isdir(name_or_path):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        logger.info("No tokenizer in %s (%s)", name_or_path, exc)
        return None


def model_calibration_blocks(
    model: nn.Module,
    layers: dict[str, nn.Module],
    data: CalibrationData,
    tokenizer: Any = None,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> list[torch.Tensor]:
    """``data`` as token blocks for ``model``, checked: readable, in its vocabulary, enough for the widest layer."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab_size = getattr(embeddings, "num_embeddings", None)
    if tokenizer is None and not _is_token_ids(data) and not isinstance(data, torch.Tensor):
        tokenizer = default_tokenizer(getattr(getattr(model, "config", None), "_name_or_path", None))
    blocks = calibration_blocks(data, tokenizer, seq_len=seq_len, max_tokens=max_tokens, vocab_size=vocab_size)
    tokens = require_tokens(blocks, max(int(layer.in_features) for layer in layers.values()))
    logger.info("Calibrating %d layers on %d tokens in %d blocks", len(layers), tokens, len(blocks))
    return blocks


def layer_hessians(
    model: nn.Module,
    layers: dict[str, nn.Module],
    data: CalibrationData,
    tokenizer: Any = None,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progressbar: bool = False,
) -> HessianCollector:
    """Run ``model`` on the calibration data and collect every layer's input Hessian.

    Checks the data (readable, in the vocabulary, enough tokens for the widest layer) before running anything.
    """
    blocks = model_calibration_blocks(model, layers, data, tokenizer, seq_len=seq_len, max_tokens=max_tokens)
    collector = HessianCollector(layers)
    collector.run(model, blocks, progressbar)
    return collector
