# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The ``serve`` phase (issue 14): greedy generation tokens/s of the ``--serve-models`` (GPTQ base on Marlin, merged,
merged with tinygemm for one row, unmerged adapter, bf16) interleaved, eager and with a static cache that transformers compiles, with the graphs and
graph breaks that compiling produced (``dynamo_counts``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .checkpoints import bf16_model, kernel_classes, load_gptq, randomize_adapter, write_random_gptq
from .cli import PROJECTIONS, SERVE_MODELS
from .common import RESULTS, dump, free_memory, log, logits, rel
from .float_zero import fused_two_kernels, jit_launch, tinygemm_enabled, triton_tiles
from .timing import Timer


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
    }


@torch.no_grad()
def run_serve(args: argparse.Namespace, config: dict, tmp: str) -> None:
    """Generation tokens/s, eager and with a static cache (compiled by transformers), the models interleaved."""
    import peft
    import torch._dynamo

    import peft_qalora

    torch._dynamo.config.cache_size_limit = 64
    gs = args.gen_group_sizes[0]
    path = os.path.join(tmp, f"serve-g{gs}")
    write_random_gptq(path, config, 4, gs, args.device)
    wanted = set(args.serve_models)
    models: dict[str, torch.nn.Module] = {}
    if "marlin" in wanted:
        models[SERVE_MODELS["marlin"]] = load_gptq(path, "gptq_marlin", args)
    adapter_config = peft_qalora.QALoraConfig(r=args.r, lora_alpha=args.r, target_modules=PROJECTIONS)
    unmerged = None
    if wanted & {"merged", "unmerged"}:
        unmerged = peft.get_peft_model(load_gptq(path, "gptq_triton", args), adapter_config)
        randomize_adapter(unmerged)  # seeded: the merged model below folds the same adapter
        if "unmerged" in wanted:
            models[SERVE_MODELS["unmerged"]] = unmerged
    contexts: dict[str, Callable[[], contextlib.AbstractContextManager]] = {}  # how a model generates, if not plainly
    if any(name.startswith("merged") for name in wanted):
        merge_source = peft.get_peft_model(load_gptq(path, "gptq_triton", args), adapter_config)
        randomize_adapter(merge_source)
        merged = merge_source.merge_and_unload()
        del merge_source
        if "merged" in wanted:
            models[SERVE_MODELS["merged"]] = merged
        variants = {
            "merged-jit-launch": jit_launch,
            "merged-two-kernels": fused_two_kernels,
            "merged-triton-tiles": triton_tiles,
            "merged-tinygemm": functools.partial(tinygemm_enabled, 1),
            "merged-tinygemm16": functools.partial(tinygemm_enabled, 16),
        }
        for name, context in variants.items():
            if name in wanted:  # the same model, its small calls taking another path
                models[SERVE_MODELS[name]] = merged
                contexts[SERVE_MODELS[name]] = context
    if "bf16" in wanted:
        models[SERVE_MODELS["bf16"]] = bf16_model(config, args)
    for m in models.values():
        m.eval()
    RESULTS["checks"].append({"serve_classes": {k: kernel_classes(m) for k, m in models.items()}})
    if unmerged is not None:
        # every merged variant against the unmerged adapter model, on the path it generates with: 64 rows per
        # projection (a prefill, the 64x64 tiles) and one row (a decoding step, where tinygemm takes over)
        probes = {"64 rows": torch.randint(3, args.vocab_size, (2, 32), device=args.device)}
        probes["1 row"] = probes["64 rows"][:1, :1]
        reference = {label: logits(unmerged.eval(), ids) for label, ids in probes.items()}
        for key in sorted(k for k in wanted if k.startswith("merged")):
            name = SERVE_MODELS[key]
            with contexts.get(name, contextlib.nullcontext)():
                for label, ids in probes.items():
                    error = rel(logits(models[name], ids), reference[label])
                    RESULTS["checks"].append({"serve_vs_unmerged_logits_rel": key, "probe": label, "rel": error})
        if "marlin" in wanted:  # the probe's floor: the same codes through two GPTQ kernels, no adapter on either
            with unmerged.disable_adapter():
                for label, ids in probes.items():
                    error = rel(logits(models[SERVE_MODELS["marlin"]], ids), logits(unmerged, ids))
                    RESULTS["checks"].append({"serve_marlin_vs_triton_base_logits_rel": label, "rel": error})
    if "unmerged" not in wanted:
        del unmerged
        free_memory()
    for mode in args.serve_modes:
        for batch in args.gen_batches:
            ids = torch.randint(3, args.vocab_size, (batch, args.prompt_len), device=args.device)
            kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
            if mode == "static":
                kwargs["cache_implementation"] = "static"
            compiled = {}
            for name, m in models.items():
                if mode == "static" and name in contexts:
                    compiled[name] = {"error": "eager only: compiled, the merged model runs the fused kernel"}
                    continue
                before = dynamo_counts()
                started = time.perf_counter()
                try:
                    # the timed length: a static cache of another length is a new shape (a recompile, measured:
                    # 109 s inside the first timed run); twice for static: compile, then capture the CUDA graphs
                    for _ in range(2 if mode == "static" else 1):
                        with contexts.get(name, contextlib.nullcontext)():
                            m.generate(
                                input_ids=ids, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, **kwargs
                            )
                    after = dynamo_counts()
                    compiled[name] = {k: after[k] - before[k] for k in after}
                    compiled[name]["warmup_s"] = round(time.perf_counter() - started, 1)
                except Exception as exc:  # noqa: BLE001
                    compiled[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                log("warm", mode, batch, name, compiled[name])
            times: dict[str, list[float]] = {name: [] for name in models if "error" not in compiled[name]}
            names = list(times)
            for rep in range(args.gen_repeats if names else 0):  # none left when every warm-up failed
                for name in names[rep % len(names) :] + names[: rep % len(names)]:
                    with contexts.get(name, contextlib.nullcontext)(), Timer(args.device) as t:
                        out = models[name].generate(
                            input_ids=ids, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, **kwargs
                        )
                    assert out.shape[1] == args.prompt_len + args.gen_tokens, out.shape
                    times[name].append(t.ms)
            for name in models:
                record: dict[str, Any] = {"model": name, "mode": mode, "batch": batch, **compiled[name]}
                if name in times:
                    record["ms"] = statistics.median(times[name])
                    record["ms_all"] = [round(x, 1) for x in times[name]]
                    record["tokens_per_s"] = batch * args.gen_tokens / (record["ms"] / 1e3)
                log("serve", json.dumps(record))
                RESULTS.setdefault("serve", []).append(record)
                dump(args)
    del models
    free_memory()
