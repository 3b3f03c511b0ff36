# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The markdown report: ``render`` turns the ``RESULTS`` record into the tables printed last and written to
``--out``/gpu_results.md (training, generation, kernels, the decode phase's layer table, checks and phase seconds),
with ``render_issue14`` for the tiles, layers and serve phases' tables and ``_fmt`` for numbers that may be missing.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from .common import RESULTS


def render_issue14() -> list[str]:
    """Tables of the tiles, layers and serve phases."""
    lines: list[str] = []
    if RESULTS.get("exactness"):
        lines += [
            "**Fused kernel exactness** (relative error; fp64 reference built from the codes, scales and fp32 "
            "zeros; the torch path rounds the weight to the activation dtype)",
            "",
            "| layer | rows | dtype | fused vs fp64 | torch path vs fp64 | fused vs torch path | rounding of the exact output |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in RESULTS["exactness"]:
            lines.append(
                f"| {r['layer']} | {r['rows']} | {r.get('dtype', 'bfloat16')} | {r['fused_vs_fp64']:.2e} "
                f"| {r['torch_path_vs_fp64']:.2e} | {r['fused_vs_torch_path']:.2e} "
                f"| {r.get('output_rounding', r.get('bf16_output_rounding')):.2e} |"
            )
        lines.append("")
    if RESULTS.get("tile_best"):
        lines += [
            "**Fused kernel tiles** (GPU us per call from CUDA-graph replays; best of the sweep vs the default)",
            "",
            "| layer | rows | default us | default | best us | best | best tile, codes converted |",
            "|---|---|---|---|---|---|---|",
        ]

        def short(c: dict) -> str:
            flags = {
                "ROW_SUM_EACH_BLOCK": " sum each block",
                "SWAP_AB": " swapped",
                "PER_CODE_LOAD": " per-code load",
                "PAIRED_UNPACK": " paired",
            }
            stages = f" s{c['num_stages']}" if c.get("num_stages") else ""
            stages += f" r{c['maxnreg']}" if c.get("maxnreg") else ""  # Triton's register cap per thread
            name = "M{BLOCK_M} N{BLOCK_N} K{BLOCK_K}x{STEPS} split{SPLIT_K} w{w}".format(w=c.get("num_warps"), **c)
            return name + stages + "".join(text for key, text in flags.items() if c.get(key))

        for r in RESULTS["tile_best"]:
            lines.append(
                f"| {r['layer']} | {r['rows']} | {r['default_us']:.1f} | {short(r['default'])} "
                f"| {r['best_us']:.1f} | {short(r['best'])} | {_fmt(r.get('best_converting_codes_us'), '.1f')} |"
            )
        lines.append("")
    if RESULTS.get("crossover"):
        lines += [
            "**Fused kernel vs dequantize + cuBLAS by rows** (GPU us)",
            "",
            "| layer | rows | fused | dequantize + cuBLAS |",
            "|---|---|---|---|",
        ]
        for r in RESULTS["crossover"]:
            lines.append(f"| {r['layer']} | {r['rows']} | {r['fused_us']:.1f} | {r['dequant_cublas_us']:.1f} |")
        lines.append("")
    if RESULTS.get("tinygemm"):
        lines += [
            "**torch `_weight_int4pack_mm` (tinygemm; bf16 scales and offsets)**",
            "",
            "| layer | rows | GPU us | vs fp64 | fused vs fp64 |",
            "|---|---|---|---|---|",
        ]
        for r in RESULTS["tinygemm"]:
            if "error" in r:
                lines.append(f"| {r['layer']} | - | {r['error'][:100]} | | |")
                continue
            lines.append(
                f"| {r['layer']} | {r['rows']} | {r['gpu_us']:.1f} | {r['vs_fp64']:.2e} "
                f"| {_fmt(r['fused_vs_fp64'], '.2e')} |"
            )
        lines.append("")
    if RESULTS.get("layers"):
        lines += [
            "**One layer** (bf16, no grad; graph us = GPU time per call from CUDA-graph replays cycling through "
            "the projection of every decoder layer, weights read from HBM; GPU us = triton do_bench median of one "
            "layer, Python launch included where it is longer than the kernel; loop us = wall time per call in "
            "a loop, CPU dispatch included; errors: merged output vs the fp32-dequantized merged weight in fp64, "
            "and vs the unmerged adapter layer)",
            "",
            "| layer | rows | kernel | GPU us | graph us | loop us | vs fp64 | vs unmerged |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in RESULTS["layers"]:
            if "error" in r:
                lines.append(f"| {r['layer']} | {r['rows']} | {r['variant']} | {r['error'][:80]} | | | | |")
                continue
            lines.append(
                f"| {r['layer']} {r.get('shape', '')} | {r['rows']} | {r['variant']} | {r['gpu_us']:.1f} "
                f"| {_fmt(r.get('graph_us'), '.1f')} | {r['loop_us']:.1f} | {_fmt(r.get('vs_fp32_dequant_fp64_matmul'), '.1e')} "
                f"| {_fmt(r.get('vs_unmerged'), '.1e')} |"
            )
        lines.append("")
    if RESULTS.get("serve"):
        lines += [
            "**Generation** (greedy, 64-token prompt, 64 new tokens, median of 3 interleaved; static = "
            '`cache_implementation="static"`, which transformers compiles where the quantizer allows)',
            "",
            "| model | mode | batch | tokens/s | graphs | graph breaks |",
            "|---|---|---|---|---|---|",
        ]
        for r in RESULTS["serve"]:
            tps = _fmt(r.get("tokens_per_s"), ".1f") if "error" not in r else r["error"][:80]
            lines.append(
                f"| {r['model']} | {r['mode']} | {r['batch']} | {tps} | {r.get('unique_graphs', '-')} "
                f"| {r.get('graph_breaks', '-')} |"
            )
        lines.append("")
    return lines


def _fmt(x: Any, spec: str = ".0f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x)) else "-"


def render(args: argparse.Namespace) -> str:
    v = RESULTS.get("versions", {})
    lines = [
        f"GPU: {v.get('gpu')} ({v.get('gpu_memory_gib')} GiB); torch {v.get('torch')} (CUDA {v.get('cuda')}), "
        f"triton {v.get('triton')}, transformers {v.get('transformers')}, peft {v.get('peft')}, "
        f"optimum {v.get('optimum')}, gptqmodel {v.get('gptqmodel')}.",
        f"Model: Llama-2-7B shapes (hidden {args.hidden_size}, intermediate {args.intermediate_size}, "
        f"{args.heads} heads, vocab {args.vocab_size}), {args.layers} decoder layers (7B has 32), random 4-bit sym "
        f"GPTQ, {args.dtype} activations, GPTQModel backend `{args.backend}`, r={args.r} on all 7 projections.",
        "",
    ]
    train = RESULTS["train"]
    if train:
        lines += [
            "**Training** (forward + loss + backward + AdamW; median of "
            f"{args.steps} steps after {args.warmup} warm-up; peak = max_memory_allocated over the timed steps)",
            "",
            "| variant | group | seq x batch | step ms | tokens/s | vs LoRA bf16 | vs PEFT use_qalora | peak GiB "
            "| peak vs LoRA bf16 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lora = {(r["seq"], r["batch"]): r for r in train if r["variant"] == "lora bf16"}
        peftq = {(r["group_size"], r["seq"], r["batch"]): r for r in train if r["variant"] == "peft use_qalora"}
        for r in train:
            key = (r["seq"], r["batch"])
            base, pq = lora.get(key, {}), peftq.get((r["group_size"],) + key, {})
            if "error" in r:
                lines.append(
                    f"| {r['variant']} | {r['group_size'] or '-'} | {r['seq']} x {r['batch']} | "
                    f"{r['error'][:60]} | | | | | |"
                )
                continue

            def ratio(a, b):
                return f"{a / b:.2f}x" if a and b else "-"

            lines.append(
                f"| {r['variant']} | {r['group_size'] or '-'} | {r['seq']} x {r['batch']} | {r['step_ms']:.1f} "
                f"| {r['tokens_per_s']:.0f} | {ratio(r['tokens_per_s'], base.get('tokens_per_s'))} "
                f"| {ratio(r['tokens_per_s'], pq.get('tokens_per_s'))} | {_fmt(r.get('peak_gib'), '.2f')} "
                f"| {ratio(r.get('peak_gib'), base.get('peak_gib'))} |"
            )
        lines.append("")
    gen = RESULTS["generate"]
    if gen:
        lines += [
            f"**Generation** (greedy, prompt {args.prompt_len}, {args.gen_tokens} new tokens, KV cache, median of "
            f"{args.gen_repeats})",
            "",
            "| model | group | batch | tokens/s | ms per step | vs GPTQ base |",
            "|---|---|---|---|---|---|",
        ]
        basegen = {
            (r["group_size"], r["batch"], r["variant"].endswith("[alternating]")): r
            for r in gen
            if r["variant"].startswith("gptq base")
        }
        for r in gen:
            if "error" in r:
                lines.append(f"| {r['variant']} | {r['group_size'] or '-'} | {r['batch']} | {r['error'][:80]} | | |")
                continue
            key = (r["group_size"], r["batch"], r["variant"].endswith("[alternating]"))
            b = basegen.get(key, {}) if r["group_size"] else {}
            ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.3f}x" if b.get("tokens_per_s") else "-"
            lines.append(
                f"| {r['variant']} | {r['group_size'] or '-'} | {r['batch']} | {r['tokens_per_s']:.1f} "
                f"| {r['ms_per_step']:.2f} | {ratio} |"
            )
        lines.append("")
    if RESULTS["kernels"]:
        lines += [
            "**GPTQModel kernels on this GPU** (relative error vs the fp64 dequantized reference; `no grad` = the "
            "output has no gradient; QA-LoRA columns: max over forward, input, A and B gradients)",
            "",
            "| backend | group | class | train fwd / grad | eval fwd / grad | QA-LoRA (dequantize-again) "
            "| QA-LoRA (stock) |",
            "|---|---|---|---|---|---|---|",
        ]
        for k in RESULTS["kernels"]:
            if "backend" not in k:
                lines.append(
                    f"| auto-select | {k.get('group_size', '-')} | "
                    f"{k.get('auto_select', k.get('auto_select_error', ''))[:80]} (trainable: "
                    f"{k.get('auto_trainable_select', '-')}) | | | | |"
                )
                continue
            if "error" in k:
                lines.append(f"| {k['backend']} | {k['group_size']} | {k['error'][:90]} | | | | |")
                continue

            def mode(m: str) -> str:
                parts = []
                for proj in ("q_proj", "down_proj"):
                    d = k.get(proj, {})
                    if f"{m}_error" in d:
                        parts.append(d[f"{m}_error"][:40])
                        continue
                    grad = d.get(f"{m}_grad")
                    parts.append(
                        f"{_fmt(d.get(f'{m}_fwd'), '.1e')} / {grad if isinstance(grad, str) else _fmt(grad, '.1e')}"
                    )
                return "; ".join(parts)

            def qalora(tag: str) -> str:
                d = k.get("qalora_down_proj", {}).get(tag)
                if isinstance(d, dict):
                    return _fmt(max(d.values()), ".1e")
                return (d or "-")[:60]

            lines.append(
                f"| {k['backend']} | {k['group_size']} | {', '.join(k.get('classes', []))} | {mode('train')} "
                f"| {mode('eval')} | {qalora('recompute')} | {qalora('stock')} |"
            )
        lines.append("")
    lines += render_issue14()
    if RESULTS.get("layers") and "decode" in args.phases:
        lines += [
            "**One layer, bf16, no grad** (GPU us = triton do_bench median; loop us = wall time per call in a "
            "back-to-back loop, CPU dispatch included)",
            "",
            "| layer | rows | variant | GPU us | loop us |",
            "|---|---|---|---|---|",
        ]
        for r in RESULTS["layers"]:
            if "error" in r:
                lines.append(f"| {r['layer']} | {r['rows']} | {r['variant']} | {r['error'][:60]} | |")
                continue
            lines.append(
                f"| {r['layer']} {r['shape']} | {r['rows']} | {r['variant']} | {r['gpu_us']:.1f} | {r['loop_us']:.1f} |"
            )
        lines.append("")
    for c in RESULTS["checks"]:
        lines.append("check: " + json.dumps(c, default=str))
    lines.append("phase seconds: " + json.dumps(RESULTS["phase_seconds"]))
    return "\n".join(lines)
