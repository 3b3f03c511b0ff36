"""The stock PEFT API on QALORA models: registration, save/load, adapters by name, unload, the model card."""

import importlib
import json
import os

import pytest
import torch
import yaml
from conftest import load_gptq
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from safetensors.torch import load_file

import peft_qalora
from peft_qalora import QALoraConfig, QALoraLinear


@pytest.fixture
def trained(gptq_checkpoint):
    """A QA-LoRA model with non-trivial weights on a 4-bit act-order asymmetric v1 checkpoint."""
    synthetic = gptq_checkpoint(bits=4, act_order=True, sym=False)
    model = get_peft_model(
        load_gptq(synthetic.path), QALoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    return synthetic, model


def test_registration_is_idempotent():
    assert PeftType("QALORA") is PeftType.QALORA is peft_qalora.QALORA
    members = list(PeftType)
    importlib.reload(peft_qalora.peft_type)
    importlib.reload(peft_qalora)
    assert list(PeftType) == members
    assert PeftType.__members__["QALORA"] is peft_qalora.QALORA


def test_save_and_reload_give_identical_logits(trained, tmp_path, input_ids):
    synthetic, model = trained
    model.eval()
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "QALORA"
    assert config["base_quantization"] == {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 32,
        "desc_act": True,
        "sym": False,
        "checkpoint_format": "gptq",
    }
    q_proj = config["base_layers"]["model.layers.0.self_attn.q_proj"]
    assert q_proj["bits"] == 4 and q_proj["group_size"] == 32 and q_proj["act_order"] is True
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.qalora_A.weight"].shape == (4, 128 // 32)
    assert len(tensors) == 2 * len(synthetic.layers)

    assert isinstance(PeftConfig.from_pretrained(tmp_path), QALoraConfig)
    reloaded = PeftModel.from_pretrained(load_gptq(synthetic.path), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, expected)
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(auto(input_ids).logits, expected)


def test_model_card_metadata(trained, tmp_path):
    synthetic, model = trained
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["library_name"] == "peft"
    assert metadata["base_model"] == synthetic.path
    assert {"qalora", "gptq"} <= set(metadata["tags"])


def test_push_to_hub_uploads_the_adapter_files(trained, monkeypatch):
    """Exercised up to the `huggingface_hub` calls: the folder uploaded holds the files `save_pretrained` writes."""
    import huggingface_hub
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    _, model = trained
    uploads = []
    local_load = ModelCard.load.__func__

    class Repo:
        repo_id = "me/my-qalora"

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append({name: open(os.path.join(folder_path, name), "rb").read() for name in os.listdir(folder_path)})

    def load(cls, repo_id_or_path, *args, **kwargs):
        if os.path.exists(repo_id_or_path):
            return local_load(cls, repo_id_or_path, *args, **kwargs)
        raise EntryNotFoundError("new repository")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: Repo())
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    monkeypatch.setattr(ModelCard, "load", classmethod(load))
    model.push_to_hub("me/my-qalora", token="hf_dummy")
    (files,) = uploads
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert json.loads(files["adapter_config.json"])["peft_type"] == "QALORA"
    state = model.state_dict()
    from safetensors.torch import load as load_bytes

    uploaded = load_bytes(files["adapter_model.safetensors"])
    key = "base_model.model.model.layers.0.self_attn.q_proj.qalora_A.weight"
    assert torch.equal(uploaded[key], state[key.replace("qalora_A.weight", "qalora_A.default.weight")])


def test_adapters_by_name_disable_and_unload(gptq_checkpoint, input_ids):
    synthetic = gptq_checkpoint(bits=3, act_order=True)
    base = load_gptq(synthetic.path)
    with torch.no_grad():
        base_logits = base(input_ids).logits
    model = get_peft_model(base, QALoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    model.add_adapter("other", QALoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        first = model(input_ids).logits
        model.set_adapter("other")
        second = model(input_ids).logits
        with model.disable_adapter():
            disabled = model(input_ids).logits
    assert not torch.allclose(first, second)
    assert torch.equal(disabled, base_logits)
    assert model.active_adapters == ["other"]
    q_proj = model.get_base_model().get_submodule("model.layers.0.self_attn.q_proj")
    assert q_proj.qalora_A["other"].weight.shape == (3, 4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)

    model.delete_adapter("default")
    assert "default" not in q_proj.qalora_A
    unloaded = model.unload()
    assert not any(isinstance(m, QALoraLinear) for m in unloaded.modules())
    assert type(unloaded.model.layers[0].self_attn.q_proj).__name__ == "TorchLinear"
    with torch.no_grad():
        assert torch.equal(unloaded(input_ids).logits, base_logits)
