# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The ``train`` and ``generate`` phases, which share one loaded GPTQ model per group size: training steps timed
(tokens/s, peak memory) per variant and shape with an optional profiled step (``train_variant``, ``profile_step``),
greedy generation timed per batch (``generate_variant``), and ``run_gptq_variants``, which runs the GPTQ base, the
QA-LoRA variants, the merged model's two dequantize paths and PEFT's ``use_qalora`` on one checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .checkpoints import kernel_classes, load_gptq, randomize_adapter
from .cli import PROJECTIONS
from .common import RESULTS, free_memory, log, logits, rel
from .float_zero import float_zero_path
from .timing import Timer


def train_variant(
    name: str,
    model: torch.nn.Module,
    args: argparse.Namespace,
    group_size: int | None,
    setup: Callable[[], None] = lambda: None,
) -> None:
    """Time ``args.steps`` training steps of ``model`` for every ``--train-shapes`` entry and record them."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    trainable = sum(p.numel() for p in params)
    model.train()
    setup()
    for shape in args.train_shapes:
        seq, batch = map(int, shape.split("x"))
        ids = torch.randint(3, args.vocab_size, (batch, seq), device=args.device)
        record: dict[str, Any] = {
            "variant": name,
            "group_size": group_size,
            "seq": seq,
            "batch": batch,
            "trainable": trainable,
        }
        try:
            times, warm = [], []
            free_memory()
            for step in range(args.warmup + args.steps):
                if step == args.warmup and args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                    record["allocated_before_gib"] = torch.cuda.memory_allocated() / 2**30
                    torch.cuda.reset_peak_memory_stats()
                with Timer(args.device) as t:
                    optimizer.zero_grad(set_to_none=True)
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    optimizer.step()
                (times if step >= args.warmup else warm).append(t.ms)
            record["warmup_ms"] = [round(x, 1) for x in warm]
            record["loss"] = float(loss.detach())
            record["step_ms"] = statistics.median(times)
            record["step_ms_all"] = [round(x, 2) for x in times]
            record["tokens_per_s"] = batch * seq / (record["step_ms"] / 1e3)
            if args.device.startswith("cuda"):
                record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except torch.OutOfMemoryError as exc:
            record["error"] = f"OOM: {str(exc)[:160]}"
        except Exception as exc:  # noqa: BLE001
            record["error"] = f"{type(exc).__name__}: {exc}"[:400]
        first = shape == args.train_shapes[0] and group_size in (None, args.group_sizes[0])
        if name in args.profile and first and "error" not in record:
            profile_step(f"{name} g{group_size}", model, optimizer, ids, args)
        optimizer.zero_grad(set_to_none=True)
        loss = None
        log("train", json.dumps({k: v for k, v in record.items() if k != "step_ms_all"}))
        RESULTS["train"].append(record)
        free_memory()
    del optimizer


def profile_step(
    name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, args: argparse.Namespace
) -> None:
    """One training step under the torch profiler; the top CUDA kernels go to ``--out``/profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    except Exception as exc:  # noqa: BLE001
        table = f"profiler failed: {type(exc).__name__}: {exc}"
    with open(os.path.join(args.out, "profile.txt"), "a") as f:
        f.write(f"\n===== {name}, seq x batch {ids.shape[1]} x {ids.shape[0]}\n{table}\n")


@torch.no_grad()
def generate_variant(name: str, model: torch.nn.Module, args: argparse.Namespace, group_size: int | None) -> None:
    model.eval()
    for batch in args.gen_batches:
        record: dict[str, Any] = {"variant": name, "group_size": group_size, "batch": batch}
        try:
            ids = torch.randint(3, args.vocab_size, (batch, args.prompt_len), device=args.device)
            kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
            model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
            times = []
            for _ in range(args.gen_repeats):
                with Timer(args.device) as t:
                    out = model.generate(
                        input_ids=ids, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, **kwargs
                    )
                times.append(t.ms)
            assert out.shape[1] == args.prompt_len + args.gen_tokens, out.shape
            record["ms"] = statistics.median(times)
            record["tokens_per_s"] = batch * args.gen_tokens / (record["ms"] / 1e3)
            record["ms_per_step"] = record["ms"] / args.gen_tokens
        except Exception as exc:  # noqa: BLE001
            record["error"] = f"{type(exc).__name__}: {exc}"[:400]
        log("generate", json.dumps(record))
        RESULTS["generate"].append(record)
        free_memory()


def run_gptq_variants(args: argparse.Namespace, path: str, gs: int, phases: set[str]) -> None:
    import peft

    import peft_qalora
    from peft_qalora import kernels

    want_gen = "generate" in phases and gs in args.gen_group_sizes
    want_train = "train" in phases
    started = time.perf_counter()
    model = load_gptq(path, args.backend, args)
    RESULTS["checks"].append(
        {
            "group_size": gs,
            "load_s": round(time.perf_counter() - started, 1),
            "classes": kernel_classes(model),
            "backend": args.backend,
        }
    )
    log("loaded", RESULTS["checks"][-1])
    if want_gen:
        generate_variant("gptq base", model, args, gs)
    config = peft_qalora.QALoraConfig(r=args.r, lora_alpha=args.r, target_modules=PROJECTIONS)
    model = peft.get_peft_model(model, config)
    if want_train:
        from peft_qalora import layer as qalora_layer

        def paths(recompute: bool, half_fast_path: bool) -> Callable[[], None]:
            def setup() -> None:
                kernels.set_recompute(recompute)
                qalora_layer._HALF_INPUT_FAST_PATH = half_fast_path

            return setup

        train_variant("qalora", model, args, gs, setup=paths(True, True))
        train_variant("qalora, fp32 adapter tensors", model, args, gs, setup=paths(True, False))
        train_variant(
            "qalora, GPTQModel backward + fp32 adapter tensors (before)", model, args, gs, setup=paths(False, False)
        )
        paths(True, True)()
    if want_gen:
        randomize_adapter(model)
        ids = torch.randint(3, args.vocab_size, (2, 128), device=args.device)
        ref = logits(model, ids)
        with model.disable_adapter():
            base_effect = rel(logits(model, ids), ref)
        generate_variant("gptq + adapter (unmerged)", model, args, gs)
        merged = model.merge_and_unload()
        with float_zero_path(triton=False):
            out = logits(merged, ids)
        with float_zero_path(triton=True):
            out_triton = logits(merged, ids)
        RESULTS["checks"].append(
            {
                "group_size": gs,
                "merged_vs_unmerged_logits_rel": rel(out, ref),
                "merged_triton_vs_unmerged_logits_rel": rel(out_triton, ref),
                "merged_triton_vs_merged_torch_rel": rel(out_triton, out),
                "adapter_effect_base_vs_unmerged_logits_rel": base_effect,
            }
        )
        log("check", RESULTS["checks"][-1])
        with float_zero_path(triton=False):
            generate_variant("merged (torch fp32 dequantize)", merged, args, gs)
        with float_zero_path(triton=True):
            generate_variant("merged (Triton dequantize)", merged, args, gs)
        del merged
    del model
    free_memory()
    if want_train:
        model = load_gptq(path, args.backend, args)
        config = peft.LoraConfig(
            r=args.r, lora_alpha=args.r, use_qalora=True, qalora_group_size=gs, target_modules=PROJECTIONS
        )
        model = peft.get_peft_model(model, config)
        train_variant("peft use_qalora", model, args, gs)
        del model
        free_memory()
