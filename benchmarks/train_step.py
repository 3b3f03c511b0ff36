# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Training-step time and peak memory of QALORA against the frozen GPTQ base and PEFT's built-in QA-LoRA.

Writes a random Llama GPTQ checkpoint (``peft_qalora.testing.write_gptq_checkpoint``) into a temporary folder, loads
it through the real path (transformers + optimum + GPTQModel, ``backend="gptq_torch"``), and measures three variants,
each on a freshly loaded model:

- ``base``: the frozen GPTQ model alone. It has no trainable parameter, so the gradient is sent to the input
  embeddings (``enable_input_require_grads``) to make the backward real.
- ``qalora``: ``get_peft_model(model, peft_qalora.QALoraConfig(r, lora_alpha=r, target_modules=<7 projections>))``.
- ``peft-lora-qalora``: ``peft.LoraConfig(..., use_qalora=True, qalora_group_size=<group size>)`` on the same modules.

All three get ``enable_input_require_grads``, so every variant runs the same full backward through the base and the
only difference is the adapter. A step is forward + causal-LM loss + backward (+ ``AdamW.step`` over the trainable
parameters for the adapters). Timing: every variant gets warm-up steps, then the variants are stepped round-robin
(rotating which goes first) so machine noise hits all of them alike; the table reports medians and the ratio of
medians. Peak memory: each variant runs in its own subprocess; on CPU it is the peak RSS during a few steps minus
the RSS after loading, wrapping and building the optimizer (the peak is reset with ``/proc/self/clear_refs`` so
loading does not count; where that is unavailable it falls back to ``ru_maxrss``, which includes loading; glibc runs
with ``MALLOC_MMAP_THRESHOLD_=65536`` so that RSS follows live allocations, reproducible to ~1 MB), on CUDA
``torch.cuda.max_memory_allocated`` over the same steps minus the memory allocated before them.

Run (CPU, fp32; about 2.5 minutes on 2 cores with the defaults, ~1 s per step)::

    TORCHDYNAMO_DISABLE=1 .venv/bin/python benchmarks/train_step.py --threads 1

Use ``--threads 1`` on a machine shared with other work: with every core busy, each multi-threaded op waits at its
OpenMP barrier for a descheduled thread, so small ops (the adapters' rank-r matmuls) cost milliseconds and both
adapters looked ~1.8x slower than the base; the "CPU s" column (process CPU time) is the steadier number there.
Ratios depend on the shapes: the adapter's cost grows with tokens x out_features, the base's with tokens x in x out,
so tiny models (hidden 128-256) show 1.3-1.8x where realistic ones show a few percent.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

# Before torch is imported: eager kernels, no Hub access.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

logger = logging.getLogger("train_step")

VARIANTS = ("base", "qalora", "peft-lora-qalora")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--intermediate-size", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per variant in the memory subprocess")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default). Use 1 on a shared machine: with every core busy, each op's "
        "OpenMP barrier waits for a descheduled thread, which makes small ops cost milliseconds",
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--skip-memory", action="store_true", help="time only")
    # Internal: run one variant's memory measurement in this process and write the result as JSON.
    parser.add_argument("--memory-worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_checkpoint(args: argparse.Namespace, path: str) -> None:
    from peft_qalora.testing import tiny_llama_config, write_gptq_checkpoint

    config = tiny_llama_config(
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.layers,
        vocab_size=args.vocab_size,
    )
    write_gptq_checkpoint(path, bits=args.bits, group_size=args.group_size, config=config)


@dataclass
class Trainee:
    """One variant, loaded and ready: ``step()`` runs one full training step."""

    name: str
    model: torch.nn.Module
    optimizer: Optional[torch.optim.Optimizer]
    input_ids: torch.Tensor
    trainable: int

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(input_ids=self.input_ids, labels=self.input_ids).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()


def load_variant(name: str, args: argparse.Namespace, path: str) -> Trainee:
    """A fresh model for ``name``, loaded the way users load GPTQ checkpoints."""
    import peft
    from transformers import AutoModelForCausalLM, GPTQConfig

    import peft_qalora  # registers QALORA with PEFT

    # gptq_torch is the one CPU kernel that is differentiable in every case (DESIGN.md, "Traps"). gptqmodel logs
    # to stdout while loading; keep stdout for the table.
    with contextlib.redirect_stdout(sys.stderr):
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.float32,
            quantization_config=GPTQConfig(bits=args.bits, backend="gptq_torch"),
            device_map=args.device,
        )
    # Same full backward for every variant: without this the adapters' models would skip the input gradient of the
    # first layer's projections, which the base (whose only gradient goes to the embeddings) cannot skip.
    model.enable_input_require_grads()
    # transformers leaves the unquantized weights (embeddings, norms, head) trainable; the base must be frozen, as
    # get_peft_model freezes it for the adapters.
    model.requires_grad_(False)
    if name == "qalora":
        config = peft_qalora.QALoraConfig(r=args.r, lora_alpha=args.r, target_modules=PROJECTIONS)
        model = peft.get_peft_model(model, config)
    elif name == "peft-lora-qalora":
        config = peft.LoraConfig(
            r=args.r,
            lora_alpha=args.r,
            use_qalora=True,
            qalora_group_size=args.group_size,
            target_modules=PROJECTIONS,
        )
        model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, args.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    return Trainee(name, model, optimizer, input_ids.to(args.device), sum(p.numel() for p in params))


def synchronize(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


@dataclass
class StepTimes:
    """Per-step wall-clock and process CPU seconds of one variant."""

    wall: list[float]
    cpu: list[float]


def time_variants(args: argparse.Namespace, path: str) -> dict[str, StepTimes]:
    """Step times per variant, measured round-robin in this process."""
    sync = synchronize(args.device)
    trainees = []
    for name in args.variants:
        logger.info("loading %s", name)
        trainee = load_variant(name, args, path)
        logger.info("%s: %d trainable parameters; %d warm-up steps", name, trainee.trainable, args.warmup)
        for _ in range(args.warmup):
            trainee.step()
        trainees.append(trainee)
    times = {t.name: StepTimes([], []) for t in trainees}
    for rep in range(args.repeats):
        # Rotate the order so that no variant always runs right after the same other one.
        shift = rep % len(trainees)
        for trainee in trainees[shift:] + trainees[:shift]:
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            trainee.step()
            sync()
            times[trainee.name].wall.append(time.perf_counter() - start)
            # CPU time leaves out the time this process waited for a core, which dominates wall-time noise on a
            # shared machine (with one thread it is the step's compute time).
            times[trainee.name].cpu.append(time.process_time() - start_cpu)
        logger.info("repeat %d/%d: %s", rep + 1, args.repeats, {k: round(v.wall[-1], 3) for k, v in times.items()})
    return times


def _rss_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM), so the peak excludes loading."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(name: str, args: argparse.Namespace, path: str) -> dict:
    """Peak memory (MB) of ``args.memory_steps`` training steps above what the loaded model holds."""
    trainee = load_variant(name, args, path)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.memory_steps):
            trainee.step()
        torch.cuda.synchronize()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - before) / 2**20, "method": "cuda max_memory_allocated"}
    try:  # hand freed heap pages back to the OS so the baseline is what the model really holds
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = _rss_mb("VmRSS")
    if before is not None and _reset_peak_rss():
        for _ in range(args.memory_steps):
            trainee.step()
        return {"peak_mb": _rss_mb("VmHWM") - before, "method": "peak RSS (VmHWM) minus RSS after loading"}
    # Fallback: ru_maxrss cannot be reset, so it includes the loading peak.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(args.memory_steps):
        trainee.step()
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before, "method": "ru_maxrss delta"}


def memory_in_subprocess(name: str, args: argparse.Namespace, path: str, argv: list[str]) -> dict:
    """Run :func:`measure_memory` for one variant in a fresh interpreter, so no other variant's pages count."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    try:
        command = [sys.executable, os.path.abspath(__file__), *argv]
        command += ["--memory-worker", name, "--checkpoint", path, "--result-file", result_file]
        # A fixed mmap threshold makes glibc map every allocation over 64 KiB on its own and unmap it on free, so
        # RSS follows live memory; with the default, freed-but-kept heap pages made the peak vary by tens of MB.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
        with open(result_file) as f:
            return json.load(f)
    finally:
        os.unlink(result_file)


def machine_line(args: argparse.Namespace) -> str:
    line = f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    if hasattr(os, "getloadavg"):  # how busy the machine was: other processes' load shows up as wall-time noise
        line += ", load average at the end {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())
    if args.device == "cuda":
        line += f", {torch.cuda.get_device_name()}"
    return line


def _ratio(value: Optional[float], base: Optional[float]) -> str:
    return f"{value / base:.3f}x" if value is not None and base else "-"


def render(args: argparse.Namespace, times: dict[str, StepTimes], memory: dict[str, dict], argv: list[str]) -> str:
    med = {name: statistics.median(t.wall) for name, t in times.items()}
    cpu = {name: statistics.median(t.cpu) for name, t in times.items()}
    mem = {name: m["peak_mb"] for name, m in memory.items()}
    rows = [
        "| variant | median step s | ratio to base | min step s | median CPU s | CPU ratio to base "
        "| peak memory MB | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in args.variants:
        rows.append(
            f"| {name} | {med[name]:.3f} | {_ratio(med[name], med.get('base'))} | {min(times[name].wall):.3f} "
            f"| {cpu[name]:.3f} | {_ratio(cpu[name], cpu.get('base'))} "
            f"| {f'{mem[name]:.0f}' if name in mem else '-'} | {_ratio(mem.get(name), mem.get('base'))} |"
        )
    if "qalora" in times and "peft-lora-qalora" in times:
        rows.append(
            f"\nqalora / peft-lora-qalora: median step {_ratio(med['qalora'], med['peft-lora-qalora'])}, "
            f"median CPU {_ratio(cpu['qalora'], cpu['peft-lora-qalora'])}."
        )
    method = next(iter(memory.values()), {}).get("method")
    memory_note = f"{method}, over {args.memory_steps} steps, one subprocess per variant" if method else "not measured"
    rows.append(
        f"\nStep = forward + causal-LM loss + backward (+ AdamW step for the adapters), fp32, gradient sent to the "
        f"input embeddings in every variant; {args.repeats} round-robin repeats after {args.warmup} warm-up steps. "
        "CPU s = process CPU time of the step (all threads). "
        f"Peak memory = {memory_note}."
    )
    rows.append(
        f"Model: Llama hidden {args.hidden_size}, intermediate {args.intermediate_size}, {args.layers} layers, "
        f"vocab {args.vocab_size}; GPTQ {args.bits}-bit g{args.group_size} (gptq_torch); batch {args.batch_size} x "
        f"seq {args.seq_len}; r={args.r}, lora_alpha={args.r}."
    )
    rows.append(f"Machine: {machine_line(args)}, device {args.device}.")
    rows.append("Command: " + shlex.join(["TORCHDYNAMO_DISABLE=1", sys.executable, sys.argv[0], *argv]))
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("gptqmodel", "transformers", "optimum"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the table: gptqmodel prints a banner on import
        import gptqmodel  # noqa: F401
        import peft  # noqa: F401

        import peft_qalora  # noqa: F401
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.memory_worker:
        result = measure_memory(args.memory_worker, args, args.checkpoint)
        with open(args.result_file, "w") as f:
            json.dump(result, f)
        return

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qalora-bench-") as path:
        logger.info("writing GPTQ checkpoint to %s", path)
        write_checkpoint(args, path)
        memory: dict[str, dict] = {}
        if not args.skip_memory:
            for name in args.variants:
                logger.info("memory: %s (subprocess)", name)
                memory[name] = memory_in_subprocess(name, args, path, argv)
                logger.info("memory: %s %.0f MB", name, memory[name]["peak_mb"])
        times = time_variants(args, path)
    print(render(args, times, memory, argv))
    logger.info("total run time %.0f s", time.perf_counter() - started)


if __name__ == "__main__":
    main()
