"""GGUF export: read back with llama.cpp's gguf-py and with transformers, the fold is exact up to fp16 rounding of m."""

import json
import os

import gguf
import numpy as np
import pytest
import torch
from conftest import load_gptq
from peft import PeftModel, get_peft_model

import peft_qalora.export.gguf as gguf_export
from peft_qalora import QALoraConfig, export_gguf
from peft_qalora.testing import tiny_llama_config, write_gptq_checkpoint

GROUP_SIZE = 64  # two Q4_1 blocks per GPTQ group
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("a", "n")]


def tokenizer_with_merges():
    """A byte-level BPE tokenizer with a few merges and a chat template: 267 tokens, so the vocabulary is padded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(pair) for pair in MERGES]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 4-bit asymmetric g64 checkpoint, a QA-LoRA adapter on it, the adapter model and the exported GGUF."""
    root = tmp_path_factory.mktemp("gguf")
    synthetic = write_gptq_checkpoint(root / "base", bits=4, group_size=GROUP_SIZE, sym=False)
    tokenizer_with_merges().save_pretrained(synthetic.path)
    torch.manual_seed(0)
    # Random A and B: D of up to a step or so, so that a wrong fold cannot hide in the rounding tolerance.
    config = QALoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(load_gptq(synthetic.path), config).save_pretrained(root / "adapter")
    model = PeftModel.from_pretrained(load_gptq(synthetic.path), root / "adapter").eval()
    report = export_gguf(synthetic.path, str(root / "adapter"), str(root / "model.gguf"), progressbar=False)
    return synthetic, model, report, gguf.GGUFReader(root / "model.gguf")


def group_delta(synthetic, model, name):
    """``D[n, g]`` (out x groups, float64) from the adapter's A and B, computed here, not by the code under test."""
    adapted = model.get_base_model().get_submodule(name)
    config = model.peft_config["default"]
    A = adapted.qalora_A["default"].weight.detach().double()
    B = adapted.qalora_B["default"].weight.detach().double()
    return (config.lora_alpha / config.r) * (B @ A) / synthetic.config["quantization_config"]["group_size"]


def reference_layer(synthetic, model, name, round_offsets):
    """``s * q + m`` with ``m = -s * z + D``, exact (float64) or with ``m`` rounded to fp16 as Q4_1 stores it."""
    layer = synthetic.layers[name]
    group_size = synthetic.config["quantization_config"]["group_size"]
    scales = layer.scales.double().t()  # (out, groups)
    offsets = -scales * layer.zeros.double().t()
    if model is not None:
        offsets = offsets + group_delta(synthetic, model, name)
    if round_offsets:
        offsets = torch.from_numpy(offsets.numpy().astype(np.float16)).double()  # rounded once, unlike torch
    expand = lambda t: t.repeat_interleave(group_size, dim=1)  # noqa: E731
    return expand(scales) * layer.codes.double().t() + expand(offsets), offsets


def unpermute(weight, n_head):
    """Undo llama.cpp's q/k row order (written independently of the exporter's permutation)."""
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_name(hf_name, config):
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    return name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def gguf_tensors(reader):
    return {tensor.name: tensor for tensor in reader.tensors}


def dequantized(tensor, hf_name, config):
    """A GGUF tensor as a float64 torch tensor in transformers' layout, via gguf-py's reference dequantizer."""
    weight = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64))
    if hf_name.endswith("q_proj.weight"):
        weight = unpermute(weight, config["num_attention_heads"])
    elif hf_name.endswith("k_proj.weight"):
        weight = unpermute(weight, config["num_key_value_heads"])
    return weight


def plain_llama(synthetic, weights):
    """A plain fp32 transformers Llama with the given ``{name: weight}`` and the checkpoint's other tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {k: v for k, v in synthetic.config.items() if k != "quantization_config"}
    model = LlamaForCausalLM(LlamaConfig(**config)).float().eval()
    state = dict(synthetic.dense_state_dict)
    state.update({name: weight.float() for name, weight in weights.items()})
    model.load_state_dict(state, strict=True)
    return model


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits.double()


def test_quantized_tensors_are_the_fold(exported):
    synthetic, model, report, reader = exported
    tensors = gguf_tensors(reader)
    worst = 0.0
    for name, layer in synthetic.layers.items():
        tensor = tensors[gguf_name(f"{name}.weight", synthetic.config)]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1, name
        actual = dequantized(tensor, f"{name}.weight", synthetic.config)
        expected, offsets = reference_layer(synthetic, model, name, round_offsets=False)
        # Q4_1 keeps d = s exactly; only m is rounded to fp16. One unit in its last place: half of it is the rounding,
        # the rest covers the fp32 arithmetic of the adapter delta and of gguf-py's d * q + m.
        ulp = torch.from_numpy(np.spacing(offsets.abs().numpy().astype(np.float16)).astype(np.float64))
        bound = ulp.repeat_interleave(GROUP_SIZE, dim=1) + 2**-23 * expected.abs()
        assert bool(((actual - expected).abs() <= bound).all()), name
        # Half an fp16 ulp of m, in quantization steps (2^-25 is half the spacing of fp16 subnormals).
        steps = (2**-11 * offsets.abs() + 2**-25) / layer.scales.double().t()
        worst = max(worst, float(steps.max()))
        delta_steps = (group_delta(synthetic, model, name) / layer.scales.double().t()).abs()
        assert float(delta_steps.max()) > 0.05, "the adapter should move the zero points visibly"

        # The block bytes themselves: d is the GPTQ scale bit for bit, the nibbles are the GPTQ codes.
        blocks = tensor.data.reshape(tensor.data.shape[0], -1, 20)
        d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])
        nibbles = torch.from_numpy(blocks[..., 4:].astype(np.int64))
        codes = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).reshape(d.shape[0], -1)
        n_head = {"q_proj": synthetic.config["num_attention_heads"], "k_proj": synthetic.config["num_key_value_heads"]}
        heads = n_head.get(name.rsplit(".", 1)[-1])
        if heads is not None:
            d, codes = unpermute(d, heads), unpermute(codes, heads)
        assert torch.equal(d, layer.scales.t().repeat_interleave(GROUP_SIZE // 32, dim=1)), name
        assert torch.equal(codes, layer.codes.t()), name
    assert report.quantized_tensors == len(synthetic.layers)
    assert 0 < report.mean_offset_rounding < report.max_offset_rounding <= worst


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_plain_gptq_checkpoint_converts_losslessly(tmp_path, bits):
    synthetic = write_gptq_checkpoint(tmp_path / "base", bits=bits, group_size=32, sym=False)
    report = export_gguf(synthetic.path, None, str(tmp_path / "plain.gguf"), progressbar=False)
    tensors = gguf_tensors(gguf.GGUFReader(tmp_path / "plain.gguf"))
    for name, layer in synthetic.layers.items():
        actual = dequantized(tensors[gguf_name(f"{name}.weight", synthetic.config)], f"{name}.weight", synthetic.config)
        assert torch.equal(actual.float(), layer.dequantize()), name  # -s*z is exact in fp16 for these scales
    for name, value in synthetic.dense_state_dict.items():
        tensor = tensors[gguf_name(name, synthetic.config)]
        expected_type = gguf.GGMLQuantizationType.F32 if value.dim() == 1 else gguf.GGMLQuantizationType.F16
        assert tensor.tensor_type == expected_type, name
        assert torch.equal(torch.tensor(np.asarray(tensor.data, dtype=np.float32)).reshape(value.shape), value)
    assert report.max_offset_rounding == 0.0


def test_metadata_and_tokenizer(exported):
    synthetic, _, report, reader = exported
    config = synthetic.config
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_1
    assert fields["llama.block_count"] == config["num_hidden_layers"]
    assert fields["llama.embedding_length"] == config["hidden_size"]
    assert fields["llama.feed_forward_length"] == config["intermediate_size"]
    assert fields["llama.attention.head_count"] == config["num_attention_heads"]
    assert fields["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert fields["llama.context_length"] == config["max_position_embeddings"]
    assert fields["llama.rope.freq_base"] == config["rope_theta"]
    assert fields["llama.rope.dimension_count"] == config["head_dim"]
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])

    tokenizer = tokenizer_with_merges()
    vocab = {i: token for token, i in tokenizer.get_vocab().items()}
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == config["vocab_size"] == 272
    assert tokens[: len(vocab)] == [vocab[i] for i in range(len(vocab))]
    assert tokens[len(vocab) :] == [f"[PAD{i}]" for i in range(len(vocab), 272)]
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and types[3] == gguf.TokenType.NORMAL
    assert types[-1] == gguf.TokenType.UNUSED
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2" == report.pre_tokenizer
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in MERGES]
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.unknown_token_id"] == 0
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert "output.weight" in gguf_tensors(reader)  # the tiny model does not tie its embeddings


@pytest.fixture(scope="module")
def logits_reference(exported, input_ids_module):
    """The adapter model's logits, and the tolerance that fp16 rounding of m allows, computed from the references.

    The tolerance is the logit change between two dense models built here from the test's own codes, zeros and
    adapter: one with the exact offsets, one with the offsets rounded to fp16 as Q4_1 stores them (twice that, plus
    fp32 noise).
    """
    synthetic, model, _, _ = exported
    exact, rounded = {}, {}
    for name in synthetic.layers:
        exact[f"{name}.weight"] = reference_layer(synthetic, model, name, round_offsets=False)[0]
        rounded[f"{name}.weight"] = reference_layer(synthetic, model, name, round_offsets=True)[0]
    adapter_logits = logits(model, input_ids_module)
    exact_logits = logits(plain_llama(synthetic, exact), input_ids_module)
    rounded_logits = logits(plain_llama(synthetic, rounded), input_ids_module)
    assert (exact_logits - adapter_logits).abs().max() < 1e-4  # the dense reference is the adapter model
    rounding_effect = (rounded_logits - exact_logits).abs().max().item()
    base_logits = logits(synthetic.dense_model(), input_ids_module)
    adapter_effect = (adapter_logits - base_logits).abs().max().item()
    assert adapter_effect > 100 * rounding_effect  # the adapter is far above the tolerance
    return adapter_logits, rounded_logits, 2 * rounding_effect + 1e-4


@pytest.fixture(scope="module")
def input_ids_module():
    return torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(1))


def test_plain_llama_from_gguf_tensors_matches_adapter_model(exported, logits_reference, input_ids_module):
    synthetic, _, _, reader = exported
    adapter_logits, rounded_logits, tolerance = logits_reference
    tensors = gguf_tensors(reader)
    weights = {}
    for name in [*synthetic.dense_state_dict, *(f"{layer}.weight" for layer in synthetic.layers)]:
        weights[name] = dequantized(tensors[gguf_name(name, synthetic.config)], name, synthetic.config)
        weights[name] = weights[name].reshape(synthetic.dense_state_dict.get(name, weights[name]).shape)
    gguf_logits = logits(plain_llama(synthetic, weights), input_ids_module)
    assert (gguf_logits - rounded_logits).abs().max() < 1e-4  # exactly the model with fp16-rounded offsets
    assert (gguf_logits - adapter_logits).abs().max() <= tolerance


def test_transformers_loads_the_gguf(exported, logits_reference, input_ids_module):
    from transformers import AutoModelForCausalLM

    _, _, report, _ = exported
    adapter_logits, rounded_logits, tolerance = logits_reference
    folder, name = os.path.split(report.path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    gguf_logits = logits(model, input_ids_module)
    assert (gguf_logits - rounded_logits).abs().max() < 1e-4
    assert (gguf_logits - adapter_logits).abs().max() <= tolerance


def no_leftovers(folder):
    return [name for name in os.listdir(folder) if name.endswith(".partial")] == []


def test_config_without_architectures(tmp_path):
    """A config.json written from a config object names no architectures: model_type decides, as in transformers."""
    synthetic = write_gptq_checkpoint(tmp_path / "base")
    with open(os.path.join(synthetic.path, "config.json")) as f:
        config = json.load(f)
    del config["architectures"]
    with open(os.path.join(synthetic.path, "config.json"), "w") as f:
        json.dump(config, f)
    export_gguf(synthetic.path, None, str(tmp_path / "model.gguf"), progressbar=False)
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    field = reader.get_field("general.architecture")
    assert bytes(field.parts[field.data[0]]).decode() == "llama"


def unsupported_architecture(tmp_path):
    synthetic = write_gptq_checkpoint(tmp_path / "base")
    with open(os.path.join(synthetic.path, "config.json")) as f:
        config = json.load(f)
    config.update(architectures=["PhiForCausalLM"], model_type="phi")
    with open(os.path.join(synthetic.path, "config.json"), "w") as f:
        json.dump(config, f)
    return synthetic.path


@pytest.mark.parametrize(
    "base,message",
    [
        (dict(bits=8), r"8-bit GPTQ model; GGUF cannot hold it exactly: its 8-bit weight type Q8_0 .* MLX export"),
        (dict(act_order=True), r"act-order \(desc_act=True\) in 14 layers .* Quantize the base without act-order"),
        (dict(group_size=16), r"group size 16 .* multiples of 32 .* MLX export"),
        ("phi", r"holds a PhiForCausalLM model; the GGUF export supports LlamaForCausalLM, MistralForCausalLM"),
    ],
    ids=["8-bit", "act-order", "group-size-16", "architecture"],
)
def test_refused_input(tmp_path, base, message):
    path = unsupported_architecture(tmp_path) if base == "phi" else write_gptq_checkpoint(tmp_path / "b", **base).path
    with pytest.raises(ValueError, match=message):
        export_gguf(path, None, str(tmp_path / "out" / "model.gguf"), progressbar=False)
    assert not os.path.exists(tmp_path / "out")


def test_existing_output_and_interrupted_export(exported, tmp_path, monkeypatch):
    synthetic = exported[0]
    out = tmp_path / "model.gguf"
    out.write_text("keep me")
    with pytest.raises(ValueError, match="already exists; choose another path or pass overwrite=True"):
        export_gguf(synthetic.path, None, str(out), progressbar=False)
    assert out.read_text() == "keep me"

    packed = []
    real_pack = gguf_export.pack_q4_1

    def failing_pack(layer):
        if packed:
            raise OSError("disk full")
        packed.append(layer)
        return real_pack(layer)

    monkeypatch.setattr(gguf_export, "pack_q4_1", failing_pack)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(synthetic.path, None, str(out), overwrite=True, progressbar=False)
    assert out.read_text() == "keep me" and os.listdir(tmp_path) == ["model.gguf"]

    monkeypatch.setattr(gguf_export, "pack_q4_1", real_pack)
    export_gguf(synthetic.path, None, str(out), overwrite=True, progressbar=False)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama" and no_leftovers(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~mask  # not the private mode of a temporary file


def test_missing_tokenizer_is_refused(tmp_path):
    synthetic = write_gptq_checkpoint(tmp_path / "base")
    for name in os.listdir(synthetic.path):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(os.path.join(synthetic.path, name))
    with pytest.raises(ValueError, match="has no tokenizer"):
        export_gguf(synthetic.path, None, str(tmp_path / "model.gguf"), progressbar=False)
    assert os.listdir(tmp_path) == ["base"]


def test_bpe_tokenizer_without_merges_is_refused(tmp_path):
    """llama.cpp refuses a byte-level BPE vocabulary with no merges, and GGUF cannot store an empty list."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    synthetic = write_gptq_checkpoint(tmp_path / "base")
    vocab = {token: i for i, token in enumerate(["<unk>", *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(synthetic.path)
    with pytest.raises(ValueError, match="has no merges"):
        export_gguf(synthetic.path, None, str(tmp_path / "model.gguf"), progressbar=False)
    assert os.listdir(tmp_path) == ["base"]


def qwen2_checkpoint(path):
    """The tiny GPTQ checkpoint turned into a Qwen2 one: q/k/v biases (random), no o_proj bias, Qwen2 config."""
    from safetensors.torch import load_file, save_file

    config = {**tiny_llama_config(), "attention_bias": True}
    synthetic = write_gptq_checkpoint(path, config=config, group_size=32, sym=False)
    file = os.path.join(synthetic.path, "model.safetensors")
    tensors = load_file(file)
    generator = torch.Generator().manual_seed(2)
    for name in list(tensors):
        if name.endswith("o_proj.bias"):
            del tensors[name]
        elif name.endswith("_proj.bias"):
            tensors[name] = (torch.randn(tensors[name].shape, generator=generator) * 0.5).half()
    save_file(tensors, file, metadata={"format": "pt"})
    with open(os.path.join(synthetic.path, "config.json")) as f:
        config = json.load(f)
    config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False)
    del config["attention_bias"], config["head_dim"]
    with open(os.path.join(synthetic.path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return synthetic, tensors


def test_qwen2(tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    synthetic, tensors = qwen2_checkpoint(tmp_path / "base")
    export_gguf(synthetic.path, None, str(tmp_path / "qwen2.gguf"), progressbar=False)
    reader = gguf.GGUFReader(tmp_path / "qwen2.gguf")
    assert reader.fields["general.architecture"].contents() == "qwen2"
    gguf_tensors_ = gguf_tensors(reader)
    q = gguf_tensors_["blk.0.attn_q.weight"]  # Qwen2 uses llama.cpp's NEOX rope: rows are not permuted
    actual = gguf.quants.dequantize(q.data, q.tensor_type)
    assert np.array_equal(actual, synthetic.layers["model.layers.0.self_attn.q_proj"].dequantize().numpy())
    bias = gguf_tensors_["blk.0.attn_k.bias"]
    assert bias.tensor_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(bias.data, tensors["model.layers.0.self_attn.k_proj.bias"].float().numpy())

    expected = logits(load_gptq(synthetic.path), input_ids)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="qwen2.gguf", dtype=torch.float32).eval()
    assert (logits(model, input_ids) - expected).abs().max() < 1e-4
