"""Offline merge of a 7B-shaped GPTQ checkpoint: wall time against a plain copy of the same files, and peak RSS.

The script writes a synthetic Llama-2-7B-shaped 4-bit g128 GPTQ checkpoint (random codes, ~3.9 GB in several
shards) and a QA-LoRA adapter (r=16 on all 224 projections) into a temporary folder, then alternates a plain copy
of the checkpoint files with ``peft-qalora merge`` (each merge in a fresh process, so its peak RSS is its own).
Targets: merge time at most 1.5x the copy, peak RSS under 1.5 GB.

    python benchmarks/offline_merge.py                 # ~12 GB of temporary disk
    python benchmarks/offline_merge.py --layers 4      # a quick run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

from peft_qalora import QALoraConfig
from peft_qalora.testing import tiny_llama_config

logger = logging.getLogger("offline_merge")
PROJECTIONS = {
    "self_attn.q_proj": ("hidden", "hidden"),
    "self_attn.k_proj": ("hidden", "hidden"),
    "self_attn.v_proj": ("hidden", "hidden"),
    "self_attn.o_proj": ("hidden", "hidden"),
    "mlp.gate_proj": ("hidden", "intermediate"),
    "mlp.up_proj": ("hidden", "intermediate"),
    "mlp.down_proj": ("intermediate", "hidden"),
}
# Peak RSS is read from VmHWM: Linux carries ru_maxrss over exec, so a child would report the parent's peak.
MERGE_IN_CHILD = """
import sys, time
from peft_qalora import merge_checkpoint

def rss_mb(field):
    status = open("/proc/self/status").read()
    return int(status.split(field + ":")[1].split()[0]) / 1024

after_imports = rss_mb("VmRSS")
start = time.perf_counter()
merge_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], progressbar=False)
print(time.perf_counter() - start, rss_mb("VmHWM"), after_imports)
"""


def write_checkpoint(
    folder: str, layers: int, shards: int, hidden: int, intermediate: int, vocab: int, group_size: int
) -> list[str]:
    """A random 4-bit GPTQ Llama checkpoint, written shard by shard; returns the adapted module names."""
    sizes = {"hidden": hidden, "intermediate": intermediate}
    generator = torch.Generator().manual_seed(0)
    modules = []
    weight_map = {}
    per_shard = -(-layers // shards)
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        if shard == 0:
            tensors["model.embed_tokens.weight"] = torch.randn(vocab, hidden, generator=generator).half()
        for layer in range(shard * per_shard, min(layers, (shard + 1) * per_shard)):
            for projection, (in_name, out_name) in PROJECTIONS.items():
                in_features, out_features = sizes[in_name], sizes[out_name]
                name = f"model.layers.{layer}.{projection}"
                groups = in_features // group_size
                tensors[f"{name}.qweight"] = torch.randint(
                    -(2**31), 2**31 - 1, (in_features // 8, out_features), generator=generator, dtype=torch.int32
                )
                tensors[f"{name}.qzeros"] = torch.full(
                    (groups, out_features // 8), 0x77777777, dtype=torch.int32
                )  # v1 z=8
                tensors[f"{name}.scales"] = (
                    torch.rand(groups, out_features, generator=generator) * 0.01 + 0.001
                ).half()
                tensors[f"{name}.g_idx"] = (torch.arange(in_features) // group_size).to(torch.int32)
                modules.append(name)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                tensors[f"model.layers.{layer}.{norm}.weight"] = torch.ones(hidden, dtype=torch.float16)
        if shard == shards - 1:
            tensors["model.norm.weight"] = torch.ones(hidden, dtype=torch.float16)
            tensors["lm_head.weight"] = torch.randn(vocab, hidden, generator=generator).half()
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        logger.info("wrote %s", file)
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = tiny_llama_config(hidden_size=hidden, intermediate_size=intermediate, num_layers=layers, vocab_size=vocab)
    config.update(num_attention_heads=32, num_key_value_heads=32, head_dim=hidden // 32)
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group_size,
        "desc_act": False,
        "sym": True,
        "checkpoint_format": "gptq",
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return modules


def write_adapter(folder: str, modules: list[str], sizes: dict, r: int, group_size: int) -> None:
    generator = torch.Generator().manual_seed(1)
    QALoraConfig(r=r, lora_alpha=r, target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules})).save_pretrained(
        folder
    )
    tensors = {}
    for name in modules:
        in_name, out_name = PROJECTIONS[name.split(".", 3)[3]]
        tensors[f"base_model.model.{name}.qalora_A.weight"] = (
            torch.randn(r, sizes[in_name] // group_size, generator=generator) * 0.01
        )
        tensors[f"base_model.model.{name}.qalora_B.weight"] = (
            torch.randn(sizes[out_name], r, generator=generator) * 0.01
        )
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument(
        "--workdir", default=None, help="where to write the temporary checkpoints (default: system temp)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sizes = {"hidden": 4096, "intermediate": 11008}

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        base, adapter = os.path.join(tmp, "base"), os.path.join(tmp, "adapter")
        os.makedirs(base)
        modules = write_checkpoint(
            base, args.layers, args.shards, sizes["hidden"], sizes["intermediate"], 32000, args.group_size
        )
        write_adapter(adapter, modules, sizes, 16, args.group_size)
        size_gb = folder_bytes(base) / 1e9
        copy_times, merge_times, peaks = [], [], []
        for repeat in range(args.repeats):
            target = os.path.join(tmp, "copy")
            start = time.perf_counter()
            shutil.copytree(base, target)
            copy_times.append(time.perf_counter() - start)
            shutil.rmtree(target)
            target = os.path.join(tmp, "merged")
            env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
            done = subprocess.run(
                [sys.executable, "-c", MERGE_IN_CHILD, base, adapter, target],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            seconds, peak_mb, imports_mb = map(float, done.stdout.split()[-3:])
            merge_times.append(seconds)
            peaks.append(peak_mb)
            baseline = imports_mb
            shutil.rmtree(target)
            logger.info(
                "repeat %d: copy %.1f s, merge %.1f s, merge peak RSS %.0f MB", repeat, copy_times[-1], seconds, peak_mb
            )

    copy, merge = statistics.median(copy_times), statistics.median(merge_times)
    print(
        f"\n{len(modules)} GPTQ layers in {args.layers} Llama-2-7B-shaped blocks, {args.shards} shards, "
        f"4-bit g{args.group_size}; "
        f"{os.cpu_count()} cores; medians of {args.repeats} interleaved runs"
    )
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}\n")
    print(f"| {size_gb:.2f} GB checkpoint | wall s | ratio to copy | peak RSS MB (of which imports) |")
    print("|---|---|---|---|")
    print(f"| plain copy (shutil.copytree) | {copy:.1f} | 1.00 | |")
    print(f"| peft-qalora merge (float zeros) | {merge:.1f} | {merge / copy:.2f} | {max(peaks):.0f} ({baseline:.0f}) |")


if __name__ == "__main__":
    main()
