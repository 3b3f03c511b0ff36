"""LoRA adapter GGUF: read back with gguf-py and applied the way llama.cpp applies it, on the base's own GGUF."""

import json
import os

import gguf
import numpy as np
import pytest
import torch
from conftest import load_gptq
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_export_gguf import gguf_name, gguf_tensors, logits, no_leftovers, plain_llama, qwen2_checkpoint, unpermute

from peft_qalora import QALoraConfig, convert_adapter, export_gguf, export_gguf_lora
from peft_qalora.testing import write_gptq_checkpoint

GROUP_SIZE = 64
ATOL = 1e-4
# Random A and B (init_lora_weights=False), so that the adapter moves the logits far beyond the tolerance.
ADAPTERS = {
    "alpha-over-r": dict(r=4, lora_alpha=8),
    # llama.cpp reads each layer's rank from lora_b but has one alpha and no rsLoRA: the exporter puts the ratio
    # into lora_b. A non-power-of-two alpha keeps that ratio inexact in binary.
    "rslora-rank-alpha-patterns": dict(
        r=4, lora_alpha=6, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}
    ),
}


def save_adapter(base_path, adapter_dir, **options):
    torch.manual_seed(0)
    config = QALoraConfig(target_modules="all-linear", init_lora_weights=False, **options)
    get_peft_model(load_gptq(base_path), config).save_pretrained(adapter_dir)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A symmetric 4-bit g64 checkpoint and its GGUF without adapter (bit-exact: -s*z is an fp16 number)."""
    root = tmp_path_factory.mktemp("gguf_lora_base")
    synthetic = write_gptq_checkpoint(root / "base", bits=4, group_size=GROUP_SIZE, sym=True)
    export_gguf(synthetic.path, None, str(root / "base.gguf"), progressbar=False)
    return synthetic, gguf.GGUFReader(root / "base.gguf")


@pytest.fixture(scope="module", params=list(ADAPTERS))
def exported(request, base, tmp_path_factory):
    """An adapter on the base, its PeftModel (fp32) and its LoRA GGUF."""
    synthetic, _ = base
    root = tmp_path_factory.mktemp("gguf_lora")
    save_adapter(synthetic.path, root / "adapter", **ADAPTERS[request.param])
    model = PeftModel.from_pretrained(load_gptq(synthetic.path), root / "adapter").eval()
    report = export_gguf_lora(synthetic.path, str(root / "adapter"), str(root / "adapter.gguf"), progressbar=False)
    return request.param, root, model, report, gguf.GGUFReader(root / "adapter.gguf")


def fields_of(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


def test_metadata_as_llama_cpp_reads_it(exported):
    name, root, model, report, reader = exported
    fields = fields_of(reader)
    # llama_adapter_lora_init_impl: general.type "adapter", general.architecture the model's, adapter.type "lora",
    # adapter.lora.alpha read with gguf_get_val_f32.
    assert fields["general.type"] == "adapter"
    assert fields["general.architecture"] == "llama" == report.architecture
    assert fields["adapter.type"] == "lora"
    alpha_field = reader.fields["adapter.lora.alpha"]
    assert alpha_field.types == [gguf.GGUFValueType.FLOAT32]
    assert fields["adapter.lora.alpha"] == ADAPTERS[name]["lora_alpha"] == report.alpha
    assert not any(key.startswith(("tokenizer.", "llama.")) for key in fields)  # no vocabulary, no hyperparameters
    assert report.layers == len(model.peft_config["default"].base_layers) == 14
    # rsLoRA scales by alpha/sqrt(r): 6/2 against llama.cpp's 6/4 (r = 4), 6/sqrt(2) against 6/2 (v_proj, r = 2);
    # down_proj's alpha 3 gives 3/2 = 6/4, which needs no rescaling.
    assert report.rescaled_layers == (0 if name == "alpha-over-r" else 12)
    assert no_leftovers(root)


def test_tensors_fit_the_base_gguf(exported, base):
    _, _, model, _, reader = exported
    synthetic, base_reader = base
    base_tensors = gguf_tensors(base_reader)
    tensors = gguf_tensors(reader)
    assert len(tensors) == 2 * 14
    config = model.peft_config["default"]
    for layer in synthetic.layers:
        base_name = gguf_name(f"{layer}.weight", synthetic.config)
        lora_a, lora_b = tensors[f"{base_name}.lora_a"], tensors[f"{base_name}.lora_b"]
        weight = base_tensors[base_name]
        assert lora_a.tensor_type == lora_b.tensor_type == gguf.GGMLQuantizationType.F32
        # The checks of llama_adapter_lora_init_impl, on ggml shapes (ne): a = [in, r], b = [r, out].
        assert weight.shape[0] == lora_a.shape[0] and weight.shape[1] == lora_b.shape[1], layer
        assert lora_a.shape[1] == lora_b.shape[0] == config.rank_and_alpha(layer)[0], layer
    for name in tensors:  # every tensor is a pair half for a tensor of the base GGUF
        assert name.endswith((".lora_a", ".lora_b")) and name[: -len(".lora_a")] in base_tensors, name


def test_tensors_are_convert_to_lora(exported, base, tmp_path):
    """lora_a is what `convert --to lora` writes, bit for bit; lora_b its B in llama.cpp's row order, rescaled."""
    name, root, model, _, reader = exported
    synthetic, _ = base
    convert_adapter(root / "adapter", tmp_path / "lora", "lora", base_model_dir=synthetic.path)
    plain = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    tensors = gguf_tensors(reader)
    config = model.peft_config["default"]
    alpha = float(fields_of(reader)["adapter.lora.alpha"])
    heads = {"q_proj": synthetic.config["num_attention_heads"], "k_proj": synthetic.config["num_key_value_heads"]}
    for layer in synthetic.layers:
        base_name = gguf_name(f"{layer}.weight", synthetic.config)
        A = plain[f"base_model.model.{layer}.lora_A.weight"]
        B = plain[f"base_model.model.{layer}.lora_B.weight"].double()
        assert torch.equal(torch.from_numpy(tensors[f"{base_name}.lora_a"].data.copy()), A), layer
        lora_b = torch.from_numpy(tensors[f"{base_name}.lora_b"].data.copy()).double()
        if layer.rsplit(".", 1)[-1] in heads:
            lora_b = unpermute(lora_b, heads[layer.rsplit(".", 1)[-1]])
        r, lora_alpha = config.rank_and_alpha(layer)
        peft_scale = lora_alpha / (r**0.5 if config.use_rslora else r)
        torch.testing.assert_close(lora_b * (alpha / r), B * peft_scale, rtol=1e-6, atol=0), layer
        if name == "alpha-over-r":
            assert torch.equal(lora_b, B), layer  # written as it is, like convert_lora_to_gguf.py


def llama_cpp_weights(synthetic, base_reader, reader, with_adapter=True):
    """Every projection as llama.cpp computes it: base GGUF weight + alpha/rank * lora_b @ lora_a in its row order."""
    base_tensors, tensors = gguf_tensors(base_reader), gguf_tensors(reader)
    alpha = float(fields_of(reader)["adapter.lora.alpha"])
    heads = {"q_proj": synthetic.config["num_attention_heads"], "k_proj": synthetic.config["num_key_value_heads"]}
    weights = {}
    for name in [*synthetic.dense_state_dict, *(f"{layer}.weight" for layer in synthetic.layers)]:
        base_name = gguf_name(name, synthetic.config)
        tensor = base_tensors[base_name]
        weight = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64))
        if with_adapter and f"{base_name}.lora_a" in tensors:
            lora_a = torch.from_numpy(tensors[f"{base_name}.lora_a"].data.astype(np.float64))
            lora_b = torch.from_numpy(tensors[f"{base_name}.lora_b"].data.astype(np.float64))
            rank = int(tensors[f"{base_name}.lora_b"].shape[0])  # llama.cpp: rank = b->ne[0]
            weight = weight + (alpha / rank) * lora_b @ lora_a
        kind = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if kind in heads:
            weight = unpermute(weight, heads[kind])
        weights[name] = weight.reshape(synthetic.dense_state_dict.get(name, weight).shape)
    return weights


def test_llama_cpp_arithmetic_gives_the_adapter_model(exported, base, input_ids):
    _, _, model, _, reader = exported
    synthetic, base_reader = base
    expected = logits(model, input_ids)
    actual = logits(plain_llama(synthetic, llama_cpp_weights(synthetic, base_reader, reader)), input_ids)
    base_only = logits(plain_llama(synthetic, llama_cpp_weights(synthetic, base_reader, reader, False)), input_ids)
    assert (base_only - logits(synthetic.dense_model(), input_ids)).abs().max() < ATOL  # the base GGUF is exact
    assert (expected - base_only).abs().max() > 1000 * ATOL  # the adapter moves the logits far beyond the tolerance
    assert (actual - expected).abs().max() < ATOL


def test_existing_output_and_interrupted_export(exported, base, tmp_path, monkeypatch):
    _, root, _, _, _ = exported
    synthetic, _ = base
    out = tmp_path / "adapter.gguf"
    out.write_text("keep me")
    with pytest.raises(ValueError, match="already exists; choose another path or pass overwrite=True"):
        export_gguf_lora(synthetic.path, str(root / "adapter"), str(out), progressbar=False)
    assert out.read_text() == "keep me"

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        export_gguf_lora(synthetic.path, str(root / "adapter"), str(out), overwrite=True, progressbar=False)
    assert out.read_text() == "keep me" and os.listdir(tmp_path) == ["adapter.gguf"]

    monkeypatch.undo()
    export_gguf_lora(synthetic.path, str(root / "adapter"), str(out), overwrite=True, progressbar=False)
    assert fields_of(gguf.GGUFReader(out))["general.type"] == "adapter" and no_leftovers(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~mask


@pytest.fixture(scope="module")
def alpha_over_r_adapter(base, tmp_path_factory):
    synthetic, _ = base
    adapter = tmp_path_factory.mktemp("plain_adapter") / "adapter"
    save_adapter(synthetic.path, adapter, r=4, lora_alpha=8)
    return str(adapter)


def test_non_qalora_adapter_is_refused(base, alpha_over_r_adapter, tmp_path):
    synthetic, _ = base
    convert_adapter(alpha_over_r_adapter, tmp_path / "lora", "lora", base_model_dir=synthetic.path)
    with pytest.raises(ValueError, match="holds a LORA adapter; .* llama.cpp's own convert_lora_to_gguf.py"):
        export_gguf_lora(synthetic.path, str(tmp_path / "lora"), str(tmp_path / "out" / "a.gguf"), progressbar=False)
    with pytest.raises(ValueError, match="is not a saved PEFT adapter folder"):
        export_gguf_lora(synthetic.path, str(tmp_path), str(tmp_path / "out" / "a.gguf"), progressbar=False)
    assert not os.path.exists(tmp_path / "out")


def test_adapter_for_another_base_is_refused(alpha_over_r_adapter, tmp_path):
    other = write_gptq_checkpoint(tmp_path / "other", bits=4, group_size=32, sym=True)
    with pytest.raises(
        ValueError, match="(?s)does not match the GPTQ checkpoint .* group_size: adapter trained with 64, base has 32"
    ):
        export_gguf_lora(other.path, alpha_over_r_adapter, str(tmp_path / "out" / "a.gguf"), progressbar=False)
    assert not os.path.exists(tmp_path / "out")


def test_unsupported_architecture_is_refused(base, alpha_over_r_adapter, tmp_path):
    synthetic, _ = base
    phi = tmp_path / "phi"
    phi.mkdir()
    for name in os.listdir(synthetic.path):
        os.symlink(os.path.join(synthetic.path, name), phi / name)
    config = {**json.loads((phi / "config.json").read_text()), "architectures": ["PhiForCausalLM"], "model_type": "phi"}
    (phi / "config.json").unlink()
    (phi / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="holds a PhiForCausalLM model; the GGUF export supports LlamaForCausalLM"):
        export_gguf_lora(str(phi), alpha_over_r_adapter, str(tmp_path / "out" / "a.gguf"), progressbar=False)
    assert not os.path.exists(tmp_path / "out")


def test_act_order_base_is_refused(tmp_path):
    """Plain LoRA would handle act-order, but the base has no GGUF for the adapter to run on."""
    synthetic = write_gptq_checkpoint(tmp_path / "base", bits=4, group_size=32, act_order=True)
    save_adapter(synthetic.path, tmp_path / "adapter", r=2, lora_alpha=4)
    with pytest.raises(ValueError, match=r"has no exact GGUF .* act-order \(desc_act=True\) in 14 layers"):
        export_gguf_lora(synthetic.path, str(tmp_path / "adapter"), str(tmp_path / "out" / "a.gguf"), progressbar=False)
    assert not os.path.exists(tmp_path / "out")


def test_qwen2(tmp_path, input_ids):
    """Qwen2 (llama.cpp's NEOX rope, no q/k permutation), applied to the base GGUF as transformers loads it."""
    from transformers import AutoModelForCausalLM

    synthetic, _ = qwen2_checkpoint(tmp_path / "base")
    save_adapter(synthetic.path, tmp_path / "adapter", r=4, lora_alpha=8)
    expected = logits(PeftModel.from_pretrained(load_gptq(synthetic.path), tmp_path / "adapter").eval(), input_ids)
    export_gguf(synthetic.path, None, str(tmp_path / "base.gguf"), progressbar=False)
    report = export_gguf_lora(synthetic.path, str(tmp_path / "adapter"), str(tmp_path / "a.gguf"), progressbar=False)
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert fields_of(reader)["general.architecture"] == "qwen2" == report.architecture
    tensors = gguf_tensors(reader)
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    B = adapter["base_model.model.model.layers.0.self_attn.q_proj.qalora_B.weight"]
    assert torch.equal(torch.from_numpy(tensors["blk.0.attn_q.weight.lora_b"].data.copy()), B)  # rows as they are

    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="base.gguf", dtype=torch.float32).eval()
    base_logits = logits(model, input_ids)
    names = {gguf_name(f"{layer}.weight", synthetic.config): layer for layer in synthetic.layers}
    with torch.no_grad():
        for base_name, layer in names.items():
            lora_a = torch.from_numpy(tensors[f"{base_name}.lora_a"].data.copy())
            lora_b = torch.from_numpy(tensors[f"{base_name}.lora_b"].data.copy())
            scale = report.alpha / int(tensors[f"{base_name}.lora_b"].shape[0])
            model.get_submodule(layer).weight += scale * lora_b @ lora_a
    assert (base_logits - expected).abs().max() > 1000 * ATOL
    assert (logits(model, input_ids) - expected).abs().max() < ATOL
