"""MLX export: the real `mx.dequantize` and `mlx_lm.load` read back exactly what the adapter model computes."""

import glob
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import load_gptq
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file

import peft_qalora.export.mlx as mlx_export
from peft_qalora import QALoraConfig, export_mlx
from peft_qalora.gptq import pack_int32
from peft_qalora.testing import tiny_llama_config

mx = pytest.importorskip("mlx.core")

R, LORA_ALPHA = 4, 8


def save_adapter(synthetic, folder):
    base = load_gptq(synthetic.path)
    torch.manual_seed(0)
    config = QALoraConfig(r=R, lora_alpha=LORA_ALPHA, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)
    return str(folder)


def expected_weights(synthetic, adapter_dir):
    """``s * (q - z) + D`` per layer (fp64, out x in), from the test's own codes and the adapter's A and B."""
    adapter = load_file(os.path.join(adapter_dir, "adapter_model.safetensors")) if adapter_dir else {}
    group_size = synthetic.config["quantization_config"]["group_size"]
    weights = {}
    for name, layer in synthetic.layers.items():
        g = layer.g_idx.long()
        w = (layer.scales.double()[g] * (layer.codes - layer.zeros[g]).double()).t()
        if adapter:
            A = adapter[f"base_model.model.{name}.qalora_A.weight"].double()
            B = adapter[f"base_model.model.{name}.qalora_B.weight"].double()
            D = (LORA_ALPHA / R) * (B @ A) / group_size  # (out, groups): constant inside each group
            w = w + D[:, g]
        weights[name] = w
    return weights


def mlx_tensors(folder):
    tensors = {}
    for path in glob.glob(os.path.join(folder, "model*.safetensors")):
        tensors.update(mx.load(path))
    return tensors


def dequantized(tensors, name, group_size, bits):
    w = mx.dequantize(tensors[f"{name}.weight"], tensors[f"{name}.scales"], tensors[f"{name}.biases"], group_size, bits)
    return torch.from_numpy(np.array(w))


def no_leftovers(parent):
    return [name for name in os.listdir(parent) if name.endswith((".partial", ".old"))] == []


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_mlx_layout(bits):
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (4, 256), generator=torch.Generator().manual_seed(bits))
    codes[:, ::32], codes[:, 1::32] = 0, maxq  # every group spans the full range: scale 1, bias -maxq
    words, scales, biases = mx.quantize(mx.array((codes - maxq).float().numpy()), group_size=32, bits=bits)
    assert (mx.all(scales == 1) and mx.all(biases == -maxq)).item()
    ours = mlx_export.pack_rows(codes.to(torch.uint8), bits).view(torch.int32)
    assert torch.equal(ours, torch.from_numpy(np.array(words).view(np.int32)))
    assert torch.equal(ours, pack_int32(codes, bits))


@pytest.mark.parametrize(
    "bits,group_size,sym,checkpoint_format",
    [(4, 32, True, "gptq"), (3, 64, False, "gptq_v2")],
)
def test_every_layer_dequantizes_to_the_adapter_weights(
    gptq_checkpoint, tmp_path, bits, group_size, sym, checkpoint_format
):
    synthetic = gptq_checkpoint(bits=bits, group_size=group_size, sym=sym, checkpoint_format=checkpoint_format)
    adapter = save_adapter(synthetic, tmp_path / "adapter")
    out = tmp_path / "mlx"
    report = export_mlx(synthetic.path, adapter, str(out), progressbar=False)

    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": group_size, "bits": bits, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"] and config["model_type"] == "llama"
    assert report.quantized_layers == len(synthetic.layers) == 14 and report.files == ["model.safetensors"]
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"} <= set(os.listdir(out))
    assert "mlx" in (out / "README.md").read_text()  # the model card

    tensors = mlx_tensors(out)
    for name, expected in expected_weights(synthetic, adapter).items():
        assert tensors[f"{name}.weight"].dtype == mx.uint32
        assert tensors[f"{name}.scales"].dtype == tensors[f"{name}.biases"].dtype == mx.float32
        actual = dequantized(tensors, name, group_size, bits).double()
        assert (actual - expected).abs().max().item() <= 1e-6 * expected.abs().max().item(), name
    base = load_file(os.path.join(synthetic.path, "model.safetensors"))
    plain = [name for name in base if name.rsplit(".", 1)[0] not in synthetic.layers]
    for name in plain:  # embeddings, norms, lm_head: as stored
        assert torch.equal(torch.from_numpy(np.array(tensors[name].astype(mx.float32))), base[name].float())
    assert set(tensors) == set(plain) | {f"{m}.{p}" for m in synthetic.layers for p in ("weight", "scales", "biases")}
    assert no_leftovers(tmp_path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 4-bit g32 asymmetric v1 checkpoint whose config.json says `rope_parameters` (as transformers 5 writes it),
    an adapter for it, the MLX export, token ids and the adapter model's fp32 logits on them."""
    from peft_qalora.testing import write_gptq_checkpoint

    root = tmp_path_factory.mktemp("mlx_rope")
    config = {**tiny_llama_config(), "rope_parameters": {"rope_theta": 50000.0, "rope_type": "default"}}
    del config["rope_theta"]
    synthetic = write_gptq_checkpoint(root / "base", bits=4, group_size=32, sym=False, config=config)
    assert "rope_theta" not in json.loads((root / "base" / "config.json").read_text())
    adapter = save_adapter(synthetic, root / "adapter")
    export_mlx(synthetic.path, adapter, str(root / "mlx"), progressbar=False)
    input_ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    model = PeftModel.from_pretrained(load_gptq(synthetic.path), adapter).eval()
    with torch.no_grad():
        logits = model(input_ids).logits
    return synthetic, adapter, str(root / "mlx"), input_ids, logits


def test_dense_model_from_mx_dequantize_matches_the_adapter_model(exported):
    from transformers import LlamaConfig, LlamaForCausalLM

    synthetic, _, out, input_ids, expected = exported
    tensors = mlx_tensors(out)
    config = {k: v for k, v in synthetic.config.items() if k != "quantization_config"}
    dense = LlamaForCausalLM(LlamaConfig(**config)).float().eval()
    state = {}
    for name in dense.state_dict():
        module = name.removesuffix(".weight")
        if f"{module}.scales" in tensors:
            state[name] = dequantized(tensors, module, 32, 4)
        else:
            state[name] = torch.from_numpy(np.array(tensors[name].astype(mx.float32)))
    dense.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert (dense(input_ids).logits - expected).abs().max().item() < 1e-4


def test_mlx_lm_loads_it_with_the_adapter_models_logits(exported):
    mlx_lm = pytest.importorskip("mlx_lm")
    _, _, out, input_ids, expected = exported
    model, tokenizer = mlx_lm.load(out)
    assert tokenizer.decode(tokenizer.encode("hello", add_special_tokens=False)) == "hello"
    # As stored, the fp16 embedding feeds the first norm in fp16; from the first quantized layer on, fp32 scales
    # and biases make MLX compute in fp32.
    as_stored = torch.from_numpy(np.array(model(mx.array(input_ids.numpy()))))
    assert (as_stored - expected).abs().max().item() < 1e-2
    model.set_dtype(mx.float32)  # the embeddings and norms widen exactly; quantized layers are fp32 already
    exact = torch.from_numpy(np.array(model(mx.array(input_ids.numpy()))))
    assert (exact - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("bits,group_size,checkpoint_format", [(2, 128, "gptq"), (8, 32, "gptq_v2")])
def test_without_adapter_the_conversion_is_lossless(gptq_checkpoint, tmp_path, bits, group_size, checkpoint_format):
    synthetic = gptq_checkpoint(bits=bits, group_size=group_size, sym=False, checkpoint_format=checkpoint_format)
    export_mlx(synthetic.path, None, str(tmp_path / "mlx"), progressbar=False)
    assert json.loads((tmp_path / "mlx" / "config.json").read_text())["quantization"]["bits"] == bits
    tensors = mlx_tensors(tmp_path / "mlx")
    for name, layer in synthetic.layers.items():
        assert torch.equal(dequantized(tensors, name, group_size, bits), layer.dequantize()), name


@pytest.mark.parametrize("group_size", [256, -1])
def test_groups_above_128_become_several_mlx_groups(gptq_checkpoint, tmp_path, group_size):
    synthetic = gptq_checkpoint(
        bits=4, group_size=256, config=tiny_llama_config(hidden_size=256, intermediate_size=256)
    )
    base = synthetic.path
    if group_size == -1:  # every row is 256 long, so one group per row is the same checkpoint
        base = str(tmp_path / "base")
        shutil.copytree(synthetic.path, base)
        config = json.loads(open(os.path.join(base, "config.json")).read())
        config["quantization_config"]["group_size"] = -1
        open(os.path.join(base, "config.json"), "w").write(json.dumps(config))
    export_mlx(base, None, str(tmp_path / "mlx"), progressbar=False)
    assert json.loads((tmp_path / "mlx" / "config.json").read_text())["quantization"]["group_size"] == 128
    tensors = mlx_tensors(tmp_path / "mlx")
    for name, layer in synthetic.layers.items():
        assert tensors[f"{name}.scales"].shape[1] == 2
        assert torch.equal(dequantized(tensors, name, 128, 4), layer.dequantize()), name


def test_sharded_input_and_output(gptq_checkpoint, tmp_path, monkeypatch):
    synthetic = gptq_checkpoint(bits=4, group_size=32, shards=3)
    export_mlx(synthetic.path, None, str(tmp_path / "single"), progressbar=False)
    monkeypatch.setattr(mlx_export, "MAX_SHARD_BYTES", 100_000)
    report = export_mlx(synthetic.path, None, str(tmp_path / "sharded"), progressbar=False)

    assert len(report.files) > 3 and report.files[0] == f"model-00001-of-{len(report.files):05d}.safetensors"
    assert sorted(report.files) == sorted(n for n in os.listdir(tmp_path / "sharded") if n.endswith(".safetensors"))
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    single, sharded = mlx_tensors(tmp_path / "single"), mlx_tensors(tmp_path / "sharded")
    assert set(index["weight_map"]) == set(sharded) == set(single)
    assert index["metadata"]["total_size"] == report.total_bytes == sum(v.nbytes for v in sharded.values())
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / "sharded" / file), framework="numpy") as f:
            assert name in f.keys() and f.metadata() == {"format": "mlx"}
        assert mx.array_equal(single[name], sharded[name]).item(), name
    for file in report.files:
        size = os.path.getsize(tmp_path / "sharded" / file)
        with safe_open(str(tmp_path / "sharded" / file), framework="numpy") as f:
            assert size < 100_000 + 4096 or len(list(f.keys())) <= 3  # only a single oversized entry may exceed it
    mlx_lm = pytest.importorskip("mlx_lm")
    mlx_lm.load(str(tmp_path / "sharded"))


def _edited_copy(synthetic, folder, **changes):
    shutil.copytree(synthetic.path, folder)
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    for key, value in changes.items():
        if key == "dynamic":
            config["quantization_config"]["dynamic"] = value
        else:
            config[key] = value
    open(os.path.join(folder, "config.json"), "w").write(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize(
    "case,message",
    [
        ("act_order", r"uses act-order \(desc_act=True\).*MLX stores contiguous groups.*convert --to lora"),
        (
            "group_size",
            r"(?s)groups of 32, 64 or 128.*group size 16.*Re-quantize the base with group_size 32, 64 or 128",
        ),
        ("architecture", r"is a 'gpt2' model; the MLX export supports model types \('llama'"),
        ("dynamic", r"per-module bits or group sizes \(quantization_config.dynamic\)"),
        ("rope", r"rope_parameters per layer type \(\['full_attention'\]\)"),
        ("not_gptq", r"is not a GPTQ checkpoint"),
        ("adapter", r"bits: adapter trained with 4, base has 3"),
    ],
)
def test_refusals_write_nothing(gptq_checkpoint, exported, tmp_path, case, message):
    synthetic = gptq_checkpoint(bits=4, group_size=32)
    adapter = None
    base = synthetic.path
    if case == "act_order":
        base = gptq_checkpoint(bits=4, group_size=32, act_order=True).path
    elif case == "group_size":
        base = gptq_checkpoint(bits=4, group_size=16).path
    elif case == "architecture":
        base = _edited_copy(synthetic, tmp_path / "base", model_type="gpt2")
    elif case == "dynamic":
        base = _edited_copy(synthetic, tmp_path / "base", dynamic={r"+:.*q_proj": {"bits": 8}})
    elif case == "rope":
        base = _edited_copy(synthetic, tmp_path / "base", rope_parameters={"full_attention": {"rope_theta": 1e4}})
    elif case == "not_gptq":
        base = _edited_copy(synthetic, tmp_path / "base", quantization_config=None)
    elif case == "adapter":
        adapter = exported[1]  # trained on a 4-bit base
        base = gptq_checkpoint(bits=3, group_size=32).path
    with pytest.raises(ValueError, match=message):
        export_mlx(base, adapter, str(tmp_path / "out"), progressbar=False)
    assert not os.path.exists(tmp_path / "out") and no_leftovers(tmp_path)


def test_occupied_output_folder(gptq_checkpoint, tmp_path):
    synthetic = gptq_checkpoint(bits=4, group_size=32)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        export_mlx(synthetic.path, None, str(tmp_path / "out"), progressbar=False)
    assert os.listdir(tmp_path / "out") == ["mine.txt"]
    export_mlx(synthetic.path, None, str(tmp_path / "out"), overwrite=True, progressbar=False)
    assert "mine.txt" not in os.listdir(tmp_path / "out") and no_leftovers(tmp_path)


def test_interrupted_export_leaves_nothing(gptq_checkpoint, tmp_path, monkeypatch):
    synthetic = gptq_checkpoint(bits=4, group_size=32)
    written = []
    real_write_layer = mlx_export._write_layer

    def failing_write_layer(f, layer, group):
        if written:
            raise OSError("disk full")
        real_write_layer(f, layer, group)
        written.append(f.name)

    monkeypatch.setattr(mlx_export, "_write_layer", failing_write_layer)
    with pytest.raises(OSError, match="disk full"):
        export_mlx(synthetic.path, None, str(tmp_path / "out"), progressbar=False)
    assert len(written) == 1 and not os.path.exists(written[0])
    assert not os.path.exists(tmp_path / "out") and no_leftovers(tmp_path)


def test_writing_needs_no_mlx(gptq_checkpoint, tmp_path, monkeypatch):
    synthetic = gptq_checkpoint(bits=4, group_size=32)
    for name in [n for n in sys.modules if n == "mlx" or n.startswith(("mlx.", "mlx_lm"))]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of MLX now raises ImportError
    export_mlx(synthetic.path, None, str(tmp_path / "out"), progressbar=False)
    source = open(mlx_export.__file__).read()
    assert "import mlx" not in source and "from mlx" not in source
