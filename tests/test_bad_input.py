"""Bad input gets a clear error that names the layer and the mismatch, and changes nothing."""

import shutil

import pytest
import torch
from conftest import load_gptq
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_qalora import QALoraConfig, QALoraLinear
from peft_qalora.testing import tiny_llama_config


def assert_untouched(model):
    assert not any(isinstance(m, QALoraLinear) for m in model.modules())


@pytest.mark.parametrize("r", [0, -4])
def test_non_positive_rank(r):
    with pytest.raises(ValueError, match="`r` must be a positive integer"):
        QALoraConfig(r=r)


def test_bias_other_than_none():
    with pytest.raises(ValueError, match="only bias='none'"):
        QALoraConfig(bias="all")


def test_target_that_is_not_gptq(gptq_checkpoint):
    model = load_gptq(gptq_checkpoint(bits=4).path)
    with pytest.raises(ValueError, match=r"nothing was changed(.|\n)*lm_head \(Linear\) is not a GPTQ layer"):
        get_peft_model(model, QALoraConfig(target_modules=["q_proj", "lm_head"]))
    assert_untouched(model)


def test_model_that_is_not_quantized():
    config = {k: v for k, v in tiny_llama_config().items() if k != "torch_dtype"}
    model = LlamaForCausalLM(LlamaConfig(**config))
    with pytest.raises(ValueError, match="not GPTQ-quantized"):
        get_peft_model(model, QALoraConfig(target_modules="all-linear"))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj \(Linear\) is not a GPTQ layer"):
        get_peft_model(model, QALoraConfig())
    assert_untouched(model)


def test_g_idx_with_an_empty_group(gptq_checkpoint):
    """Partial groups are fine (tests/test_partial_groups.py); a g_idx that leaves a group empty is not."""
    model = load_gptq(gptq_checkpoint(bits=4).path, backend="gptq_torch")
    down_proj = model.model.layers[0].mlp.down_proj
    down_proj.g_idx = torch.where(down_proj.g_idx == 1, 0, down_proj.g_idx).to(down_proj.g_idx.dtype)
    with pytest.raises(
        ValueError, match=r"model.layers.0.mlp.down_proj: its g_idx assigns no input channel to group\(s\) \[1\]"
    ):
        get_peft_model(model, QALoraConfig(target_modules="all-linear"))
    assert_untouched(model)


@pytest.mark.parametrize("group", [-1, 4])
def test_g_idx_naming_a_group_the_layer_does_not_have(gptq_checkpoint, group):
    model = load_gptq(gptq_checkpoint(bits=4).path, backend="gptq_torch")
    q_proj = model.model.layers[0].self_attn.q_proj  # 128 channels, 4 groups of 32
    q_proj.g_idx = q_proj.g_idx.clone()
    q_proj.g_idx[0] = group
    with pytest.raises(ValueError, match=r"self_attn.q_proj: its g_idx names groups outside 0..3"):
        get_peft_model(model, QALoraConfig(target_modules="all-linear"))
    assert_untouched(model)


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory, gptq_checkpoint):
    """A 4-bit g32 act-order adapter, saved."""
    synthetic = gptq_checkpoint(bits=4, act_order=True, seed=0)
    model = get_peft_model(load_gptq(synthetic.path), QALoraConfig(r=4, target_modules="all-linear"))
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "base,message",
    [
        (dict(bits=3, act_order=True, seed=0), r"self_attn.q_proj: bits: adapter trained with 4, base has 3"),
        (dict(bits=4, group_size=16, act_order=True, seed=0), r"group_size: adapter trained with 32, base has 16"),
        (dict(bits=4, act_order=True, seed=1), r"g_idx_sha256: adapter trained with '[0-9a-f]+', base has"),
        (dict(bits=4, act_order=False, seed=0), r"act_order: adapter trained with True, base has False"),
        (
            dict(bits=4, act_order=True, config=tiny_llama_config(hidden_size=64)),
            r"in_features: adapter trained with 128, base has 64",
        ),
    ],
    ids=["bits", "group_size", "act_order_map", "no_act_order", "shapes"],
)
def test_adapter_on_a_different_base(saved_adapter, gptq_checkpoint, base, message):
    model = load_gptq(gptq_checkpoint(**base).path)
    with pytest.raises(ValueError, match=r"trained on a different GPTQ base model(.|\n)*" + message):
        PeftModel.from_pretrained(model, saved_adapter)
    assert_untouched(model)


def test_adapter_folder_without_config(gptq_checkpoint, tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftModel.from_pretrained(load_gptq(gptq_checkpoint(bits=4).path), tmp_path)


def test_adapter_folder_of_another_peft_type(tmp_path):
    LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a (PeftType.)?LORA adapter, not a QALORA one"):
        QALoraConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_adapter_weights(saved_adapter, gptq_checkpoint, tmp_path, damage):
    broken = tmp_path / "adapter"
    shutil.copytree(saved_adapter, broken)
    weights = broken / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-64])
    else:
        weights.write_bytes(b"not a safetensors file")
    model = load_gptq(gptq_checkpoint(bits=4, act_order=True, seed=0).path)
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a complete safetensors file"):
        PeftModel.from_pretrained(model, broken)
    assert_untouched(model)
    assert torch.is_tensor(model.model.layers[0].self_attn.q_proj.qweight)
