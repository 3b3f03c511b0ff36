"""Offline merge: the same checkpoint as the in-memory path, streamed, atomic, and refusing bad input."""

import glob
import os
import subprocess
import sys

import pytest
import torch
from conftest import load_gptq
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_qalora.offline_merge as offline
from peft_qalora import QALoraConfig, RoundingLossError, merge_checkpoint
from peft_qalora.checkpoint import current_umask
from peft_qalora.testing import tiny_llama_config


def save_adapter(synthetic, folder, lora_alpha=8, scale_B=1.0):
    base = load_gptq(synthetic.path)
    torch.manual_seed(0)
    model = get_peft_model(
        base, QALoraConfig(r=4, lora_alpha=lora_alpha, target_modules="all-linear", init_lora_weights=False)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "qalora_B" in name:
                param.mul_(scale_B)
    model.save_pretrained(folder)
    return folder


def tensors_of(folder):
    tensors = {}
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def in_memory_merge(synthetic, adapter_dir, out_dir, **kwargs):
    base = load_gptq(synthetic.path, dtype=torch.float16)  # the checkpoint's dtype: dense tensors saved as stored
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload(**kwargs)
    merged.save_pretrained(out_dir)


def no_leftovers(parent):
    return [name for name in os.listdir(parent) if name.endswith((".partial", ".old"))] == []


@pytest.mark.parametrize("zero_format", ["float", "int"])
@pytest.mark.parametrize("shards", [1, 3])
def test_offline_merge_equals_in_memory_save(gptq_checkpoint, tmp_path, zero_format, shards):
    synthetic = gptq_checkpoint(bits=4, act_order=True, sym=False, shards=shards)
    adapter = save_adapter(synthetic, tmp_path / "adapter")
    kwargs = {"zero_format": zero_format, "max_rounding_loss": 1.0}
    in_memory_merge(synthetic, adapter, tmp_path / "in_memory", **kwargs)
    merge_checkpoint(synthetic.path, adapter, str(tmp_path / "offline"), progressbar=False, **kwargs)

    expected, actual = tensors_of(tmp_path / "in_memory"), tensors_of(tmp_path / "offline")
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype and torch.equal(actual[name], expected[name]), name
    base_tensors = tensors_of(synthetic.path)
    for name in (n for n in base_tensors if n.endswith((".qweight", ".scales", ".g_idx"))):
        assert torch.equal(actual[name], base_tensors[name]), name
    names = sorted(os.listdir(tmp_path / "offline"))
    assert "tokenizer.json" in names and "config.json" in names
    assert ("model.safetensors.index.json" in names) == (shards > 1)
    assert no_leftovers(tmp_path)


def test_offline_float_merge_loads_with_the_plugin(gptq_checkpoint, tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    synthetic = gptq_checkpoint(bits=4, act_order=True, sym=False, shards=3)
    adapter = save_adapter(synthetic, tmp_path / "adapter")
    adapted = PeftModel.from_pretrained(load_gptq(synthetic.path), adapter).eval()
    merge_checkpoint(synthetic.path, adapter, str(tmp_path / "merged"), progressbar=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        difference = (merged(input_ids).logits - adapted(input_ids).logits).abs().max().item()
    assert difference < 1e-4


def test_cli_merge(gptq_checkpoint, tmp_path):
    synthetic = gptq_checkpoint(bits=4)
    adapter = save_adapter(synthetic, tmp_path / "adapter")
    cli = [sys.executable, "-m", "peft_qalora.cli", "merge", synthetic.path, str(adapter), str(tmp_path / "out"), "-q"]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    done = subprocess.run(cli, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.exists(tmp_path / "out" / "model.safetensors")

    again = subprocess.run(cli, capture_output=True, text=True, env=env)
    assert again.returncode == 2
    assert "already exists and is not empty" in again.stderr and "--overwrite" in again.stderr
    done = subprocess.run(
        cli + ["--overwrite", "--zero-format", "int", "--max-rounding-loss", "1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "integer zero points keep" in done.stdout


@pytest.mark.parametrize(
    "base,message",
    [
        (dict(bits=3, act_order=True), r"bits: adapter trained with 4, base has 3"),
        (dict(bits=4, group_size=16, act_order=True), r"group_size: adapter trained with 32, base has 16"),
        (dict(bits=4, act_order=True, seed=1), r"g_idx_sha256: adapter trained with"),
        (dict(bits=4, act_order=True, config=tiny_llama_config(num_layers=1)), r"not GPTQ layers of .*model.layers.1"),
    ],
    ids=["bits", "group_size", "act_order_map", "layer_names"],
)
def test_adapter_and_base_that_do_not_match(gptq_checkpoint, tmp_path, base, message):
    adapter = save_adapter(gptq_checkpoint(bits=4, act_order=True), tmp_path / "adapter")
    with pytest.raises(ValueError, match=message):
        merge_checkpoint(gptq_checkpoint(**base).path, adapter, str(tmp_path / "out"), progressbar=False)
    assert not os.path.exists(tmp_path / "out") and no_leftovers(tmp_path)


def test_non_empty_output_folder_is_refused(gptq_checkpoint, tmp_path):
    synthetic = gptq_checkpoint(bits=4)
    adapter = save_adapter(synthetic, tmp_path / "adapter")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        merge_checkpoint(synthetic.path, adapter, str(tmp_path / "out"), progressbar=False)
    assert os.listdir(tmp_path / "out") == ["mine.txt"]
    merge_checkpoint(synthetic.path, adapter, str(tmp_path / "out"), overwrite=True, progressbar=False)
    assert "mine.txt" not in os.listdir(tmp_path / "out") and no_leftovers(tmp_path)
    # a normal folder's mode, not the private one of the temporary folder it was written in
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~current_umask()


def test_non_finite_adapter(gptq_checkpoint, tmp_path):
    synthetic = gptq_checkpoint(bits=4)
    adapter = save_adapter(synthetic, tmp_path / "adapter")
    weights_path = adapter / "adapter_model.safetensors"
    weights = load_file(weights_path)
    key = next(k for k in weights if k.endswith("layers.1.mlp.up_proj.qalora_A.weight"))
    weights[key][0, 0] = float("inf")
    save_file(weights, weights_path)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj: the adapter weights contain NaN or inf"):
        merge_checkpoint(synthetic.path, adapter, str(tmp_path / "out"), progressbar=False)
    assert not os.path.exists(tmp_path / "out")


def test_base_that_is_not_gptq(gptq_checkpoint, tmp_path):
    synthetic = gptq_checkpoint(bits=4)
    adapter = save_adapter(synthetic, tmp_path / "adapter")
    merge_checkpoint(synthetic.path, adapter, str(tmp_path / "merged"), progressbar=False)
    with pytest.raises(
        ValueError, match=r"is not a GPTQ checkpoint \(quantization_config.quant_method is 'peft_qalora'"
    ):
        merge_checkpoint(str(tmp_path / "merged"), adapter, str(tmp_path / "out"), progressbar=False)


def test_adapter_of_another_type(gptq_checkpoint, tmp_path):
    synthetic = gptq_checkpoint(bits=4)
    LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="holds a (PeftType.)?LORA adapter, not a QALORA one"):
        merge_checkpoint(synthetic.path, str(tmp_path / "lora"), str(tmp_path / "out"), progressbar=False)


def test_integer_merge_that_would_clamp(gptq_checkpoint, tmp_path):
    synthetic = gptq_checkpoint(bits=4, sym=False)
    adapter = save_adapter(synthetic, tmp_path / "adapter", scale_B=1000.0)
    with pytest.raises(RoundingLossError, match=r"push \d+ zero points outside the quantization grid"):
        merge_checkpoint(
            synthetic.path, adapter, str(tmp_path / "out"), zero_format="int", max_rounding_loss=1.0, progressbar=False
        )
    assert not os.path.exists(tmp_path / "out")


def test_interrupted_merge_leaves_no_output(gptq_checkpoint, tmp_path, monkeypatch):
    synthetic = gptq_checkpoint(bits=4, shards=3)
    adapter = save_adapter(synthetic, tmp_path / "adapter")
    written = []
    real_write_shard = offline.write_shard

    def failing_write_shard(source, destination, plan):
        if written:
            raise OSError("disk full")
        real_write_shard(source, destination, plan)
        written.append(destination)

    monkeypatch.setattr(offline, "write_shard", failing_write_shard)
    with pytest.raises(OSError, match="disk full"):
        merge_checkpoint(synthetic.path, adapter, str(tmp_path / "out"), progressbar=False)
    assert len(written) == 1 and not os.path.exists(written[0])
    assert not os.path.exists(tmp_path / "out") and no_leftovers(tmp_path)
