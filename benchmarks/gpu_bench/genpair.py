# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The ``genpair`` phase: the GPTQ base model and the merged model (Triton dequantize) loaded side by side and their
greedy generation timed alternately, which cancels most of the run-to-run spread of decoding at these sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from .checkpoints import load_gptq, randomize_adapter, write_random_gptq
from .cli import PROJECTIONS
from .common import RESULTS, free_memory, log
from .float_zero import float_zero_path
from .timing import Timer


@torch.no_grad()
def run_genpair(args: argparse.Namespace, config: dict, tmp: str) -> None:
    """Base GPTQ model and merged model (Triton dequantize) loaded side by side, generation timed alternately."""
    import peft

    import peft_qalora

    gs = args.gen_group_sizes[0]
    path = os.path.join(tmp, f"pair-g{gs}")
    write_random_gptq(path, config, 4, gs, args.device)
    base = load_gptq(path, args.backend, args)
    model = peft.get_peft_model(
        load_gptq(path, args.backend, args),
        peft_qalora.QALoraConfig(r=args.r, lora_alpha=args.r, target_modules=PROJECTIONS),
    )
    randomize_adapter(model)
    merged = model.merge_and_unload()
    models = {"gptq base": base, "merged (Triton dequantize)": merged}
    for m in models.values():
        m.eval()
    with float_zero_path(triton=True):
        for batch in args.gen_batches:
            ids = torch.randint(3, args.vocab_size, (batch, args.prompt_len), device=args.device)
            kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
            for m in models.values():
                m.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
            times: dict[str, list[float]] = {name: [] for name in models}
            names = list(models)
            for rep in range(args.gen_repeats):
                for name in names[rep % 2 :] + names[: rep % 2]:  # alternate which goes first
                    with Timer(args.device) as t:
                        models[name].generate(
                            input_ids=ids, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, **kwargs
                        )
                    times[name].append(t.ms)
            for name, ms in times.items():
                record = {
                    "variant": name + " [alternating]",
                    "group_size": gs,
                    "batch": batch,
                    "ms": statistics.median(ms),
                    "ms_all": [round(x, 1) for x in ms],
                }
                record["tokens_per_s"] = batch * args.gen_tokens / (record["ms"] / 1e3)
                record["ms_per_step"] = record["ms"] / args.gen_tokens
                log("generate", json.dumps(record))
                RESULTS["generate"].append(record)
    del base, merged, model, models
    free_memory()
