# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Synthetic GPTQ checkpoints for tests and benchmarks, written without any download.

:func:`write_gptq_checkpoint` builds a randomly initialised Llama model, quantizes every decoder
projection to GPTQ with round-to-nearest (per group, optionally with an act-order ``g_idx``), packs
it in the ``gptq`` (v1) or ``gptq_v2`` layout and writes ``config.json`` + ``model.safetensors``,
the way GPTQModel would. It returns the integer codes, zeros and fp16 scales it chose, so a test can
build an independent dense reference from them instead of from the code under test.

The scales are rounded to 3 significant bits. Then ``s * (q - z)`` is exact in fp16 for every bit width, so
GPTQ kernels (which dequantize in fp16) compute exactly the dequantized weight, and a comparison between a
kernel and a dense fp32 reference measures the code under test, not fp16 rounding.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

from .gptq import pack_qweight, pack_qzeros

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class QuantizedLinear:
    """The exact integer content of one GPTQ layer: ``W[n, k] = scales[g, n] * (codes[k, n] - zeros[g, n])``."""

    codes: torch.Tensor  # (in_features, out_features), int
    zeros: torch.Tensor  # (groups, out_features), int
    scales: torch.Tensor  # (groups, out_features), fp16
    g_idx: torch.Tensor  # (in_features,), int32

    def dequantize(self) -> torch.Tensor:
        """Dense fp32 weight (out_features x in_features)."""
        g = self.g_idx.long()
        return (self.scales.double()[g] * (self.codes - self.zeros[g]).double()).float().t().contiguous()


@dataclass
class SyntheticGPTQ:
    """What :func:`write_gptq_checkpoint` wrote: the folder and every quantized layer's content."""

    path: str
    config: dict
    layers: dict[str, QuantizedLinear] = field(default_factory=dict)
    dense_state_dict: dict[str, torch.Tensor] = field(default_factory=dict)

    def dense_model(self) -> torch.nn.Module:
        """A plain fp32 ``LlamaForCausalLM`` whose projections are the dequantized GPTQ weights."""
        from transformers import LlamaConfig, LlamaForCausalLM

        config = {k: v for k, v in self.config.items() if k != "quantization_config"}
        model = LlamaForCausalLM(LlamaConfig(**config)).float().eval()
        state = dict(self.dense_state_dict)
        for name, layer in self.layers.items():
            state[f"{name}.weight"] = layer.dequantize()
        model.load_state_dict(state, strict=True)
        return model


def tiny_llama_config(
    hidden_size: int = 128, intermediate_size: int = 256, num_layers: int = 2, vocab_size: int = 272
) -> dict:
    """A Llama config small enough for CPU tests, with grouped-query attention."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden_size // 4,
        "vocab_size": vocab_size,  # at least len(byte_level_tokenizer()) = 263
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": "float16",
    }


def byte_level_tokenizer():
    """A complete fast tokenizer with no download: ``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens and a few merges.

    The merges make it a real BPE tokenizer: llama.cpp refuses a byte-level BPE vocabulary that has none.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    merges = [("h", "e"), ("Ġ", "t"), ("i", "n"), ("e", "r")]
    vocab = {token: i for i, token in enumerate(specials + sorted(alphabet) + [a + b for a, b in merges])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def gptq_quantization_config(
    bits: int, group_size: int, act_order: bool = False, sym: bool = True, checkpoint_format: str = "gptq"
) -> dict:
    """The ``quantization_config`` GPTQModel writes into ``config.json`` for these settings."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": act_order,
        "sym": sym,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "true_sequential": True,
        "damp_percent": 0.01,
        # gptqmodel refuses asymmetric v1 checkpoints unless a gptqmodel >= 0.9.0 wrote them.
        "meta": {"quantizer": ["gptqmodel:7.7.0"]},
    }


def act_order_g_idx(in_features: int, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random act-order ``g_idx``: every group has ``group_size`` channels, scattered over the row."""
    perm = torch.randperm(in_features, generator=generator)
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_features) // group_size).to(torch.int32)
    return g_idx


def _three_significant_bits(x: torch.Tensor) -> torch.Tensor:
    """Round to 3 significant bits, as fp16: times any 8-bit integer, the product is still exact in fp16."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.round(mantissa * 8) / 8, exponent).half()


def quantize_rtn(weight: torch.Tensor, bits: int, g_idx: torch.Tensor, sym: bool) -> QuantizedLinear:
    """Round-to-nearest GPTQ quantization of ``weight`` (out x in) on the groups given by ``g_idx``.

    Zero points are kept in ``[1, 2^bits - 1]`` so that every format, v1 included, can hold them.
    """
    maxq = (1 << bits) - 1
    groups = int(g_idx.max()) + 1
    w = weight.t().double()  # (K, N)
    onehot = torch.nn.functional.one_hot(g_idx.long(), groups).bool()  # (K, G)
    wmin = torch.stack([w[onehot[:, g]].min(0).values for g in range(groups)]).clamp(max=0)
    wmax = torch.stack([w[onehot[:, g]].max(0).values for g in range(groups)]).clamp(min=0)
    if sym:
        absmax = torch.maximum(wmax, -wmin).clamp(min=1e-8)
        scales = _three_significant_bits(2 * absmax / maxq)
        zeros = torch.full_like(scales, (maxq + 1) // 2, dtype=torch.int64)
    else:
        scales = _three_significant_bits((wmax - wmin).clamp(min=1e-8) / maxq)
        zeros = torch.round(-wmin / scales.double()).clamp(1, maxq).to(torch.int64)
    g = g_idx.long()
    codes = torch.round(w / scales.double()[g] + zeros[g]).clamp(0, maxq).to(torch.int64)
    return QuantizedLinear(codes=codes, zeros=zeros, scales=scales, g_idx=g_idx.to(torch.int32))


def write_gptq_checkpoint(
    path: str | os.PathLike,
    *,
    bits: int = 4,
    group_size: int = 32,
    act_order: bool = False,
    sym: bool = True,
    checkpoint_format: str = "gptq",
    seed: int = 0,
    config: dict | None = None,
    shards: int = 1,
) -> SyntheticGPTQ:
    """Write a GPTQ-quantized random Llama checkpoint to ``path`` and return its exact content.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(path)`` through optimum and GPTQModel. With
    ``shards > 1`` the tensors are split over that many files with a ``model.safetensors.index.json``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config = dict(config or tiny_llama_config())
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "quantization_config"}))
    # Random init is tiny (std 0.02); widen it so that logits, losses and gradients are not all ~0.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08, generator=generator)

    synthetic = SyntheticGPTQ(path=path, config=config)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not name.endswith(LLAMA_PROJECTIONS):
            continue
        in_features = module.in_features
        if act_order:
            g_idx = act_order_g_idx(in_features, group_size, generator)
        else:
            g_idx = (torch.arange(in_features) // group_size).to(torch.int32)
        layer = quantize_rtn(module.weight.detach(), bits, g_idx, sym)
        synthetic.layers[name] = layer
        tensors[f"{name}.qweight"] = pack_qweight(layer.codes, bits)
        tensors[f"{name}.qzeros"] = pack_qzeros(layer.zeros, bits, checkpoint_format)
        tensors[f"{name}.scales"] = layer.scales
        tensors[f"{name}.g_idx"] = layer.g_idx
    quantized = {f"{name}.weight" for name in synthetic.layers}
    for key, value in model.state_dict().items():
        if key not in quantized:
            tensors[key] = value.detach().to(torch.float16).contiguous()
            # The dense reference uses exactly what the checkpoint stores.
            synthetic.dense_state_dict[key] = tensors[key].float()
    write_safetensors(path, tensors, shards)

    config["quantization_config"] = gptq_quantization_config(bits, group_size, act_order, sym, checkpoint_format)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    byte_level_tokenizer().save_pretrained(path)
    return synthetic


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    """Write ``tensors`` as ``model.safetensors``, or split in order over ``shards`` files with an index."""
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * len(names) // shards : (i + 1) * len(names) // shards]
        save_file({name: tensors[name] for name in part}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)
