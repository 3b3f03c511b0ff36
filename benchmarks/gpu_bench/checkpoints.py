# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The models the phases run, built here and never downloaded: the Llama-2-7B-shaped config, its projection shapes
(and ``LAYER_SHAPES``, the three that the tiles and layers phases time), a GPTQ checkpoint of random 4-bit codes and
fp16 scales written to disk (``write_random_gptq``) and loaded through transformers + optimum + GPTQModel
(``load_gptq``), the bf16 model of the same shapes, the GPTQ kernel classes a model was loaded with, and
``randomize_adapter``, which gives an adapter a non-zero ``B`` before a merge.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

from .cli import dtype_of


def llama_config(args: argparse.Namespace, layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "head_dim": args.hidden_size // args.heads,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
    }


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every projection of one decoder layer."""
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    return {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, kv),
        "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (h, i),
        "mlp.up_proj": (h, i),
        "mlp.down_proj": (i, h),
    }


LAYER_SHAPES = {"q_proj": (4096, 4096), "gate_proj": (4096, 11008), "down_proj": (11008, 4096)}


def random_scales(shape: tuple[int, int], device: str, generator: torch.Generator) -> torch.Tensor:
    # ~0.0044 * U(0.75, 1.25): uniform 4-bit codes around zero point 8 then give weights of std ~0.02, like Llama-2.
    from peft_qalora.testing import _three_significant_bits

    s = 0.0044 * (0.75 + 0.5 * torch.rand(shape, device=device, generator=generator))
    return _three_significant_bits(s)


def write_random_gptq(path: str, config: dict, bits: int, group_size: int, device: str, seed: int = 0) -> float:
    """Write a GPTQ checkpoint with random codes and scales (sym, v1) for ``config``; returns GB written."""
    from safetensors.torch import save_file

    from peft_qalora.gptq import pack_qweight, pack_qzeros
    from peft_qalora.testing import gptq_quantization_config

    os.makedirs(path, exist_ok=True)
    gen = torch.Generator(device).manual_seed(seed)
    maxq = (1 << bits) - 1
    total = 0
    index: dict[str, str] = {}
    layers = config["num_hidden_layers"]
    for i in range(layers):
        tensors: dict[str, torch.Tensor] = {}
        for name, (k, n) in projection_shapes(config).items():
            prefix = f"model.layers.{i}.{name}"
            codes = torch.randint(0, maxq + 1, (k, n), device=device, generator=gen, dtype=torch.int32)
            groups = k // group_size
            zeros = torch.full((groups, n), (maxq + 1) // 2, device=device, dtype=torch.int64)
            tensors[f"{prefix}.qweight"] = pack_qweight(codes, bits).cpu()
            tensors[f"{prefix}.qzeros"] = pack_qzeros(zeros, bits, "gptq").cpu()
            tensors[f"{prefix}.scales"] = random_scales((groups, n), device, gen).cpu()
            tensors[f"{prefix}.g_idx"] = (torch.arange(k, dtype=torch.int32) // group_size).contiguous()
            del codes
        h = config["hidden_size"]
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        file = f"layer-{i:03d}.safetensors"
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        index.update(dict.fromkeys(tensors, file))
    h, v = config["hidden_size"], config["vocab_size"]
    rest = {
        "model.embed_tokens.weight": (torch.randn(v, h, device=device, generator=gen) * 0.02).half().cpu(),
        "lm_head.weight": (torch.randn(v, h, device=device, generator=gen) * 0.02).half().cpu(),
        "model.norm.weight": torch.ones(h, dtype=torch.float16),
    }
    save_file(rest, os.path.join(path, "rest.safetensors"), metadata={"format": "pt"})
    total += sum(t.numel() * t.element_size() for t in rest.values())
    index.update(dict.fromkeys(rest, "rest.safetensors"))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f)
    config = dict(config)
    config["quantization_config"] = gptq_quantization_config(bits, group_size)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return total / 1e9


def load_gptq(path: str, backend: str, args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPTQConfig

    with contextlib.redirect_stdout(sys.stderr):
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype_of(args),
            quantization_config=GPTQConfig(bits=4, backend=backend),
            device_map={"": args.device if args.device == "cpu" else 0},
        )
    return model


def kernel_classes(model: torch.nn.Module) -> list[str]:

    from peft_qalora.gptq import is_gptq_layer

    return sorted({type(m).__name__ for m in model.modules() if is_gptq_layer(m)})


def bf16_model(config: dict, args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config)
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype_of(args))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model


def randomize_adapter(model: torch.nn.Module) -> None:
    """Give the adapter a non-zero B (B starts at zero), so that the merge moves the zeros."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "qalora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
