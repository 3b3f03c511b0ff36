"""Merging into GPTQ zero points: exact with float zeros, measured and refused by default with integer zeros."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import load_gptq
from peft import get_peft_model
from reference import assert_close

from peft_qalora import FloatZeroGPTQLinear, QALoraConfig, QALoraLinear, RoundingLossError
from peft_qalora.gptq import is_gptq_layer, unpack_qzeros


def trained_model(synthetic, lora_alpha=8, seed=0, dtype=torch.float32):
    """A QA-LoRA model with random (non-zero) A and B on ``synthetic``'s checkpoint, in eval mode."""
    base = load_gptq(synthetic.path, dtype=dtype)
    torch.manual_seed(seed)
    config = QALoraConfig(r=4, lora_alpha=lora_alpha, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, config).eval()


def expected_float_zeros(synthetic, model, name):
    """``z - D / s`` from the codes the test wrote and the adapter's A and B, computed here independently."""
    layer = synthetic.layers[name]
    adapted = model.get_base_model().get_submodule(name)
    config = model.peft_config["default"]
    A = adapted.qalora_A["default"].weight.detach().double()
    B = adapted.qalora_B["default"].weight.detach().double()
    group_size = synthetic.config["quantization_config"]["group_size"]
    delta = (config.lora_alpha / config.r) * (B @ A).t() / group_size  # (groups, out)
    return (layer.zeros.double() - delta / layer.scales.double()).float()


def run_python(code, *args):
    """Run ``code`` in a fresh interpreter (nothing imported yet), as a user's new process would."""
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, env=env, timeout=300
    )


LOGITS_IN_FRESH_PROCESS = """
    import sys, torch
    {imports}
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def logits_in_fresh_process(folder, input_ids, tmp_path, plugin):
    torch.save(input_ids, tmp_path / "ids.pt")
    code = LOGITS_IN_FRESH_PROCESS.format(imports="import peft_qalora" if plugin else "")
    result = run_python(code, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt"))
    return result, (torch.load(tmp_path / "logits.pt") if result.returncode == 0 else None)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_float_merge_is_exact(gptq_checkpoint, input_ids, bits, act_order):
    synthetic = gptq_checkpoint(bits=bits, act_order=act_order, sym=False)
    model = trained_model(synthetic)
    with torch.no_grad():
        expected = model(input_ids).logits
        expected_one_row = model(input_ids[:1, :1]).logits
    originals = {n: m.base_layer for n, m in model.get_base_model().named_modules() if isinstance(m, QALoraLinear)}
    zeros = {name: expected_float_zeros(synthetic, model, name) for name in synthetic.layers}

    merged = model.merge_and_unload()
    assert not any(isinstance(m, QALoraLinear) for m in merged.modules())
    for name, original in originals.items():
        layer = merged.get_submodule(name)
        assert isinstance(layer, FloatZeroGPTQLinear)
        assert layer.qweight is original.qweight and layer.scales is original.scales and layer.g_idx is original.g_idx
        assert_close(layer.zeros, zeros[name], atol=1e-6, rtol=2e-7, what=f"{name} zeros")
        written = synthetic.layers[name]
        g = written.g_idx.long()
        dense = written.scales.float()[g] * (written.codes.float() - zeros[name][g])  # s * (q - z'), input order
        assert_close(layer.dequantize_weight(), dense, atol=1e-6, rtol=1e-5, what=f"{name} dequantized")
    with torch.no_grad():
        assert_close(merged(input_ids).logits, expected, atol=1e-4, what="logits")
        # One row takes the int4 kernel for 4-bit layers.
        assert_close(merged(input_ids[:1, :1]).logits, expected_one_row, atol=1e-4, what="one-row logits")


def test_merge_adapter_and_unmerge_restore_the_base_exactly(gptq_checkpoint, input_ids):
    synthetic = gptq_checkpoint(bits=4, act_order=True, sym=False)
    model = trained_model(synthetic)
    q_proj = model.get_base_model().get_submodule("model.layers.0.self_attn.q_proj")
    base, qzeros = q_proj.base_layer, q_proj.base_layer.qzeros.clone()
    with torch.no_grad():
        expected = model(input_ids).logits
        model.merge_adapter()
        assert q_proj.merged and isinstance(q_proj.base_layer, FloatZeroGPTQLinear)
        assert_close(model(input_ids).logits, expected, atol=1e-4, what="merged logits")
        model.unmerge_adapter()
        assert q_proj.base_layer is base and torch.equal(base.qzeros, qzeros)
        assert torch.equal(model(input_ids).logits, expected)
        with model.disable_adapter():
            model.merge_adapter(zero_format="int", max_rounding_loss=1.0)
            model.unmerge_adapter()
        assert torch.equal(base.qzeros, qzeros)


def test_merge_selected_adapters(gptq_checkpoint, input_ids):
    synthetic = gptq_checkpoint(bits=4)
    model = trained_model(synthetic)
    model.add_adapter("other", QALoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        expected = model(input_ids).logits  # the active adapter is still "default"
    merged = model.merge_and_unload(adapter_names=["default"])
    with torch.no_grad():
        assert_close(merged(input_ids).logits, expected, atol=1e-4, what="logits")


def test_float_merge_saves_and_reloads_only_with_the_plugin(gptq_checkpoint, input_ids, tmp_path):
    synthetic = gptq_checkpoint(bits=4, act_order=True, sym=False)
    merged = trained_model(synthetic).merge_and_unload()
    with torch.no_grad():
        expected = merged(input_ids).logits
    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "peft_qalora" and config["format"] == "gptq_float_zeros"
    assert len(config["modules"]) == len(synthetic.layers)

    result, logits = logits_in_fresh_process(tmp_path / "merged", input_ids, tmp_path, plugin=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(logits, expected)

    result, _ = logits_in_fresh_process(tmp_path / "merged", input_ids, tmp_path, plugin=False)
    assert result.returncode != 0
    assert "Unknown quantization type, got peft_qalora" in result.stderr
    assert "ignore_mismatched_sizes" in result.stderr


def test_integer_merge_report_matches_an_independent_computation(gptq_checkpoint):
    synthetic = gptq_checkpoint(bits=4, act_order=True, sym=True, checkpoint_format="gptq_v2")
    model = trained_model(synthetic, lora_alpha=2)  # moves many zeros by whole steps, none off the grid
    error_sq = delta_sq = 0.0
    max_error = 0.0
    clamped = 0
    for name, layer in synthetic.layers.items():
        folded = expected_float_zeros(synthetic, model, name).double()
        rounded = torch.round(folded)
        kept_in_range = rounded.clamp(0, 15)  # the grid of a v2 checkpoint
        clamped += int((kept_in_range != rounded).sum())
        s = layer.scales.double()
        delta_sq += float((s * (layer.zeros - folded)).square().sum())
        error_sq += float((s * (folded - kept_in_range)).square().sum())
        max_error = max(max_error, float((folded - kept_in_range).abs().max()))
    merged = model.merge_and_unload(zero_format="int", max_rounding_loss=1.0)
    report = merged.qalora_merge_report
    assert report.kept == pytest.approx(1 - (error_sq / delta_sq) ** 0.5, rel=1e-4)
    assert report.max_error_steps == pytest.approx(max_error, rel=1e-4)
    assert report.clamped_groups == clamped == 0
    assert len(report.layers) == len(synthetic.layers)
    assert 0 < report.kept < 1


def test_integer_merge_is_refused_by_default_and_changes_nothing(gptq_checkpoint, input_ids):
    synthetic = gptq_checkpoint(bits=4, sym=False)
    model = trained_model(synthetic)
    with torch.no_grad():
        expected = model(input_ids).logits
    with pytest.raises(RoundingLossError, match=r"would lose \d+\.\d% of the adapter's effect.*nothing was changed"):
        model.merge_and_unload(zero_format="int")
    assert sum(isinstance(m, QALoraLinear) and not m.merged for m in model.modules()) == len(synthetic.layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, expected)


def test_integer_merge_saves_a_standard_gptq_checkpoint(gptq_checkpoint, input_ids, tmp_path):
    synthetic = gptq_checkpoint(bits=4, sym=True, checkpoint_format="gptq")  # a v1 base: the resave trap
    merged = trained_model(synthetic, lora_alpha=2).merge_and_unload(zero_format="int", max_rounding_loss=1.0)
    with torch.no_grad():
        expected = merged(input_ids).logits
    q_proj = merged.get_submodule("model.layers.0.self_attn.q_proj")
    assert is_gptq_layer(q_proj) and not isinstance(q_proj, FloatZeroGPTQLinear)  # a stock GPTQModel layer
    merged.save_pretrained(tmp_path / "merged")
    synthetic_tokenizer = os.path.join(synthetic.path, "tokenizer.json")
    assert os.path.exists(synthetic_tokenizer)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(synthetic.path).save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["checkpoint_format"] == "gptq_v2" and config["sym"] is False
    from safetensors.torch import load_file

    stored = unpack_qzeros(
        load_file(tmp_path / "merged" / "model.safetensors")["model.layers.0.self_attn.q_proj.qzeros"], 4, 128
    )
    assert (stored != synthetic.layers["model.layers.0.self_attn.q_proj"].zeros).any()  # the merge moved zeros

    # Stock transformers, no plugin: the same model.
    result, logits = logits_in_fresh_process(tmp_path / "merged", input_ids, tmp_path, plugin=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close(logits, expected, atol=1e-4, what="stock transformers logits")

    # GPTQModel's own loader (its torch kernel runs in fp16 only).
    torch.save(input_ids, tmp_path / "ids.pt")
    result = run_python(
        """
        import sys, torch
        from gptqmodel import BACKEND, GPTQModel
        model = GPTQModel.load(sys.argv[1], device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        with torch.no_grad():
            torch.save(model.model(torch.load(sys.argv[2])).logits.float(), sys.argv[3])
        """,
        str(tmp_path / "merged"),
        str(tmp_path / "ids.pt"),
        str(tmp_path / "gptqmodel.pt"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    gptqmodel_error = (torch.load(tmp_path / "gptqmodel.pt") - expected).abs().max().item()
    with torch.no_grad():
        merge_effect = (synthetic.dense_model()(input_ids).logits - expected).abs().max().item()
    # fp16 rounding is far below what the merge changed; a misread zero format would not be.
    assert gptqmodel_error < 0.2 * merge_effect, (gptqmodel_error, merge_effect)


def test_non_finite_adapter_is_refused(gptq_checkpoint, input_ids):
    model = trained_model(gptq_checkpoint(bits=4))
    layer = model.get_base_model().get_submodule("model.layers.1.mlp.down_proj")
    with torch.no_grad():
        layer.qalora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"model.layers.1.mlp.down_proj: adapter\(s\) \['default'\] contain NaN or inf"
    ):
        model.merge_and_unload()
    assert not any(isinstance(m, QALoraLinear) and m.merged for m in model.modules())


def test_unknown_zero_format(gptq_checkpoint):
    with pytest.raises(ValueError, match="zero_format must be one of"):
        trained_model(gptq_checkpoint(bits=4)).merge_and_unload(zero_format="half")
