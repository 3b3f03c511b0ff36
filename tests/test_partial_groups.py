"""Partial groups: a layer whose in_features the group size does not divide ends in a shorter last group.

GPTQModel writes such models (SmolLM2-135M at group size 128: hidden 576 = 4 x 128 + 64). Here hidden 96 = 64 + 32
and intermediate 160 = 2 x 64 + 32 at group size 64, with and without act-order. Every path is checked against
references built from the codes the test wrote: the dense model, the fold ``z - D / s`` with ``D`` divided by each
group's own channel count, and the formats' own readers (gguf-py, MLX).
"""

import glob
import os

import gguf
import numpy as np
import pytest
import torch
from conftest import load_gptq
from peft import PeftModel, get_peft_model
from reference import assert_close, reference_model
from transformers import AutoModelForCausalLM

from peft_qalora import QALoraConfig, convert_adapter, export_gguf, export_mlx, merge_checkpoint
from peft_qalora.testing import tiny_llama_config, write_gptq_checkpoint

GROUP_SIZE, R, LORA_ALPHA = 64, 4, 8
CONFIG = tiny_llama_config(hidden_size=96, intermediate_size=160)


@pytest.fixture(scope="module", params=[False, True], ids=["contiguous", "act-order"])
def saved(request, tmp_path_factory):
    """A 4-bit asymmetric g64 base with partial groups and a random QA-LoRA adapter saved for it."""
    root = tmp_path_factory.mktemp("partial")
    synthetic = write_gptq_checkpoint(
        root / "base", bits=4, group_size=GROUP_SIZE, act_order=request.param, sym=False, config=CONFIG
    )
    torch.manual_seed(0)
    config = QALoraConfig(r=R, lora_alpha=LORA_ALPHA, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(load(synthetic), config)
    with torch.no_grad():  # small enough that an integer merge clamps nothing, large enough to move zeros
        for name, module in model.named_modules():
            if hasattr(module, "qalora_B"):
                module.qalora_B["default"].weight.mul_(0.5)
    model.save_pretrained(root / "adapter")
    return synthetic, str(root / "adapter")


def load(synthetic):
    # GPTQModel's AVX-512 CPU kernel refuses rows its group size does not divide; the torch kernel takes them.
    return load_gptq(synthetic.path, backend="gptq_torch")


def adapter_model(synthetic, adapter_dir):
    return PeftModel.from_pretrained(load(synthetic), adapter_dir).eval()


def counts_of(g_idx):
    return torch.bincount(g_idx.long()).double()


def group_delta(synthetic, model, name):
    """``D[g, n]`` (groups x out, float64): the adapter's change to every weight of group ``g``, computed here."""
    adapted = model.get_base_model().get_submodule(name)
    A = adapted.qalora_A["default"].weight.detach().double()
    B = adapted.qalora_B["default"].weight.detach().double()
    return ((LORA_ALPHA / R) * (B @ A) / counts_of(synthetic.layers[name].g_idx)).t()


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def test_groups_and_training_match_the_dense_reference(saved, input_ids):
    synthetic, _ = saved
    torch.manual_seed(1)
    model = get_peft_model(
        load(synthetic), QALoraConfig(r=R, lora_alpha=LORA_ALPHA, target_modules="all-linear", init_lora_weights=False)
    )
    layers = model.get_base_model().model.layers[0]
    assert layers.self_attn.q_proj.qalora_A["default"].weight.shape == (R, 2)  # 64 + 32 channels
    assert layers.mlp.down_proj.qalora_A["default"].weight.shape == (R, 3)  # 64 + 64 + 32
    model.train()
    reference, ref_layers = reference_model(synthetic, model)
    out, ref = model(input_ids).logits, reference(input_ids).logits
    assert_close(out, ref, atol=1e-4, what="logits")
    out.logsumexp(-1).sum().backward()
    ref.logsumexp(-1).sum().backward()
    for name, ref_layer in ref_layers.items():
        layer = model.get_base_model().get_submodule(name)
        assert_close(layer.qalora_A["default"].weight.grad, ref_layer.A.grad, atol=1e-5, rtol=1e-4, what=f"{name} dA")
        assert_close(layer.qalora_B["default"].weight.grad, ref_layer.B.grad, atol=1e-5, rtol=1e-4, what=f"{name} dB")


def test_float_merge_and_offline_merge(saved, input_ids, tmp_path):
    synthetic, adapter_dir = saved
    model = adapter_model(synthetic, adapter_dir)
    expected = logits(reference_model(synthetic, model)[0], input_ids)
    assert_close(logits(model, input_ids), expected, atol=1e-4, what="adapter model")
    effect = (expected - logits(synthetic.dense_model(), input_ids)).abs().max().item()
    assert effect > 1e-2  # far above the tolerance: a wrong count in the last group cannot pass

    merged = model.merge_and_unload()
    assert_close(logits(merged, input_ids), expected, atol=1e-4, what="merged in memory")
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert_close(logits(reloaded, input_ids), expected, atol=1e-4, what="merged, saved and reloaded")

    merge_checkpoint(synthetic.path, adapter_dir, str(tmp_path / "offline"), progressbar=False)
    offline = AutoModelForCausalLM.from_pretrained(tmp_path / "offline", dtype=torch.float32)
    assert_close(logits(offline, input_ids), expected, atol=1e-4, what="offline merge")


def test_integer_merge_rounds_the_fold(saved, input_ids, tmp_path):
    synthetic, adapter_dir = saved
    model = adapter_model(synthetic, adapter_dir)
    # The integer model, from the test's codes: zeros round(z - D / s), D divided by each group's own count.
    dense = synthetic.dense_model()
    moved = 0
    for name, layer in synthetic.layers.items():
        zeros = torch.round(layer.zeros.double() - group_delta(synthetic, model, name) / layer.scales.double())
        moved += int((zeros != layer.zeros).sum())
        g = layer.g_idx.long()
        weight = (layer.scales.double()[g] * (layer.codes.double() - zeros[g])).t().float()
        dense.get_submodule(name).weight.data.copy_(weight)
    assert moved > 0
    expected = logits(dense, input_ids)

    merged = model.merge_and_unload(zero_format="int", max_rounding_loss=1.0)
    assert 0.0 < merged.qalora_merge_report.kept < 1.0
    assert_close(logits(merged, input_ids), expected, atol=1e-4, what="integer merge")
    merge_checkpoint(
        synthetic.path,
        adapter_dir,
        str(tmp_path / "offline"),
        zero_format="int",
        max_rounding_loss=1.0,
        progressbar=False,
    )
    offline = load_gptq(str(tmp_path / "offline"), backend="gptq_torch")
    assert_close(logits(offline, input_ids), expected, atol=1e-4, what="offline integer merge")


def test_conversions(saved, input_ids, tmp_path):
    synthetic, adapter_dir = saved
    expected = logits(adapter_model(synthetic, adapter_dir), input_ids)
    convert_adapter(adapter_dir, tmp_path / "lora", "lora", base_model_dir=synthetic.path)
    lora = PeftModel.from_pretrained(load(synthetic), tmp_path / "lora").eval()
    assert lora.peft_config["default"].peft_type.value == "LORA"
    assert_close(logits(lora, input_ids), expected, atol=1e-4, what="plain LoRA")
    with pytest.raises(ValueError, match=r"(partial quantization group|act-order)(.|\n)*Convert to 'lora'"):
        convert_adapter(adapter_dir, tmp_path / "peft", "peft-lora", base_model_dir=synthetic.path)
    assert not os.path.exists(tmp_path / "peft")


def test_exports(saved, tmp_path):
    """GGUF Q4_1 blocks of 32 and MLX groups of 32 tile the 64- and 32-channel groups exactly."""
    synthetic, adapter_dir = saved
    model = adapter_model(synthetic, adapter_dir)
    if synthetic.config["quantization_config"]["desc_act"]:
        with pytest.raises(ValueError, match="act-order"):
            export_gguf(synthetic.path, adapter_dir, str(tmp_path / "model.gguf"), progressbar=False)
        return
    expected = {}
    for name, layer in synthetic.layers.items():
        g = layer.g_idx.long()
        weight = layer.scales.double()[g] * (layer.codes.double() - layer.zeros.double()[g])
        expected[name] = (weight + group_delta(synthetic, model, name)[g]).t()  # (out, in)

    export_gguf(synthetic.path, adapter_dir, str(tmp_path / "model.gguf"), progressbar=False)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, CONFIG["num_hidden_layers"])
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    for name in synthetic.layers:
        if name.endswith(("q_proj", "k_proj")):
            continue  # rows permuted for llama.cpp's rope (tests/test_export_gguf.py checks them)
        tensor = tensors[name_map.get_name(f"{name}.weight", try_suffixes=(".weight",))]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
        actual = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64))
        # only the offset is rounded, to fp16: within an fp16 ulp of the largest offset
        assert_close(actual, expected[name], atol=2e-3 * expected[name].abs().max().item(), what=f"GGUF {name}")

    mx = pytest.importorskip("mlx.core")
    export_mlx(synthetic.path, adapter_dir, str(tmp_path / "mlx"), progressbar=False)
    loaded = {}
    for path in glob.glob(str(tmp_path / "mlx" / "model*.safetensors")):
        loaded.update(mx.load(path))
    for name in synthetic.layers:
        w = mx.dequantize(loaded[f"{name}.weight"], loaded[f"{name}.scales"], loaded[f"{name}.biases"], 32, 4)
        assert_close(torch.from_numpy(np.array(w)).double(), expected[name], atol=1e-5, what=f"MLX {name}")
