"""The calibrated integer merge: codes and zero points chosen on calibration data, a standard GPTQ checkpoint out.

References are computed here, independently of the code under test: dense fp32 weights from the codes the test
wrote, the adapter's delta expanded per channel (tests/reference.py), the layer inputs captured from that dense model,
and the merged checkpoint's own tensors unpacked.
"""

import copy
import json

import pytest
import torch
from conftest import load_gptq
from peft import get_peft_model
from reference import assert_close, reference_model
from safetensors.torch import load_file
from test_merge import run_python

from peft_qalora import QALoraConfig, RoundingLossError, merge_checkpoint
from peft_qalora.calibrated_merge import solve_layer
from peft_qalora.calibration import CalibrationError, calibration_blocks
from peft_qalora.cli import main as cli_main
from peft_qalora.gptq import unpack_qweight, unpack_qzeros
from peft_qalora.sequential_calibration import outside_blocks, repeated_blocks, sequential_calibrated_folds
from peft_qalora.testing import byte_level_tokenizer, quantize_rtn

CALIBRATION = torch.randint(3, 259, (4, 192), generator=torch.Generator().manual_seed(7))  # 768 tokens >= 2 x 256


def adapter_model(synthetic, seed=0):
    """A QA-LoRA model with random A and B (large enough to move codes by whole steps), in eval mode."""
    base = load_gptq(synthetic.path, backend="gptq_torch")
    torch.manual_seed(seed)
    config = QALoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, config).eval()


def dense_weights(qweight, qzeros, scales, g_idx, bits, zero_format):
    """``s * (q - z)`` (out x in, fp64) from a layer's packed tensors."""
    g = g_idx.long()
    codes = unpack_qweight(qweight, bits, g.numel()).double()
    zeros = unpack_qzeros(qzeros, bits, scales.shape[1], zero_format).double()
    return (scales.double()[g] * (codes - zeros[g])).t()


def captured_inputs(model, names, ids):
    """Every named layer's inputs (tokens x in, fp64) when ``model`` runs on ``ids``."""
    inputs = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: inputs[name].append(args[0].reshape(-1, args[0].shape[-1]).double())
        )
        for name in names
    ]
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for handle in handles:
        handle.remove()
    return {name: torch.cat(chunks) for name, chunks in inputs.items()}


def captured_outputs(model, names, ids):
    """Every named layer's outputs (tokens x out, fp64) when ``model`` runs on ``ids``."""
    outputs = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: outputs[name].append(out.reshape(-1, out.shape[-1]).double())
        )
        for name in names
    ]
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for handle in handles:
        handle.remove()
    return {name: torch.cat(chunks) for name, chunks in outputs.items()}


def dense_merged_model(synthetic, tensors):
    """The dense fp32 model computing a merged checkpoint's integer codes and zeros (read from ``tensors``)."""
    dense = synthetic.dense_model()
    for name, written in synthetic.layers.items():
        weight = dense_weights(
            tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], written.scales, written.g_idx, 4, "gptq_v2"
        )
        dense.get_submodule(name).weight.data = weight.float()
    return dense


@pytest.fixture(scope="module")
def merged_v1(tmp_path_factory):
    """A 4-bit act-order asymmetric v1 base, its adapter, and the in-memory sequential calibrated merge (saved)."""
    from peft_qalora.testing import write_gptq_checkpoint

    root = tmp_path_factory.mktemp("calibrated")
    synthetic = write_gptq_checkpoint(root / "base", bits=4, act_order=True, sym=False, checkpoint_format="gptq")
    model = adapter_model(synthetic)
    model.save_pretrained(root / "adapter")
    reference, replaced = reference_model(synthetic, model)
    inputs = captured_inputs(reference, list(synthetic.layers), CALIBRATION)
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(3))
    merged = model.merge_and_unload(
        zero_format="int", calibration=CALIBRATION, max_rounding_loss=1.0, calibration_method="sequential"
    )
    with torch.no_grad():
        logits = merged(ids).logits
    merged.save_pretrained(root / "merged")
    byte_level_tokenizer().save_pretrained(root / "merged")  # GPTQModel.load wants one
    return dict(
        root=root,
        synthetic=synthetic,
        merged=merged,
        report=merged.qalora_merge_report,
        reference=replaced,
        reference_model=reference,
        inputs=inputs,
        ids=ids,
        logits=logits,
    )


@pytest.fixture(scope="module")
def greedy_v1(merged_v1):
    """The one-shot greedy calibrated merge (every layer on the adapter model's inputs), same base and adapter."""
    model = adapter_model(merged_v1["synthetic"])
    merged = model.merge_and_unload(
        zero_format="int", calibration=CALIBRATION, max_rounding_loss=1.0, calibration_method="greedy"
    )
    merged.save_pretrained(merged_v1["root"] / "merged-greedy")
    return dict(merged_v1, report=merged.qalora_merge_report, folder=merged_v1["root"] / "merged-greedy")


def test_sequential_report_matches_an_independent_layer_by_layer_reference(merged_v1):
    """Sequential: each layer's error on the merged model's own inputs against the adapter model's outputs.

    The reference runs the dense merged model (built from the checkpoint's codes and zeros) and the dense adapter
    model in fp64 and compares every layer there: no row may be worse than its base codes, and the report's kept
    share is ``1 - sqrt(error / base error)``.
    """
    synthetic, report = merged_v1["synthetic"], merged_v1["report"]
    tensors = load_file(merged_v1["root"] / "merged" / "model.safetensors")
    names = list(synthetic.layers)
    merged_dense = dense_merged_model(synthetic, tensors).double()
    merged_inputs = captured_inputs(merged_dense, names, CALIBRATION)
    adapter_outputs = captured_outputs(copy.deepcopy(merged_v1["reference_model"]).double(), names, CALIBRATION)
    by_name = {layer.name: layer for layer in report.layers}
    base_total = error_total = 0.0
    for name, written in synthetic.layers.items():
        x, wanted = merged_inputs[name], adapter_outputs[name]
        new = dense_weights(
            tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], written.scales, written.g_idx, 4, "gptq_v2"
        )
        base_error = ((x @ written.dequantize().double().t() - wanted) ** 2).sum(0)
        error = ((x @ new.t() - wanted) ** 2).sum(0)
        assert bool((error <= base_error * (1 + 1e-4) + 1e-9).all()), f"{name}: a row got worse than its base codes"
        layer = by_name[name]
        assert layer.sequential
        assert layer.kept == pytest.approx(1 - (error.sum() / base_error.sum()).sqrt().item(), abs=2e-3), name
        base_total += base_error.sum().item()
        error_total += error.sum().item()
    assert report.kept == pytest.approx(1 - (error_total / base_total) ** 0.5, abs=2e-3)
    assert report.kept > 0.2 and report.codes_changed > 0
    assert "sequential" in report.summary()


def test_sequential_merge_is_closer_to_the_adapter_model_than_one_shot(merged_v1, greedy_v1):
    """What the sequential calibration is for: the merged model's outputs, not each layer alone, match the adapter's.

    Measured on the calibration data: the tiny model's layers see 3 calibration tokens per input, too few for either
    merge to carry over to other text.
    """
    ids = CALIBRATION
    with torch.no_grad():
        wanted = merged_v1["reference_model"](ids).logits
        errors = {}
        for key, folder in (("sequential", merged_v1["root"] / "merged"), ("greedy", greedy_v1["folder"])):
            tensors = load_file(folder / "model.safetensors")
            errors[key] = (dense_merged_model(merged_v1["synthetic"], tensors)(ids).logits - wanted).norm().item()
        base = (merged_v1["synthetic"].dense_model()(ids).logits - wanted).norm().item()
    assert errors["sequential"] < errors["greedy"] < base, errors


def test_report_matches_the_layer_outputs_of_an_independent_reference(greedy_v1):
    synthetic, report = greedy_v1["synthetic"], greedy_v1["report"]
    effect_total = error_total = 0.0
    by_name = {layer.name: layer for layer in report.layers}
    tensors = load_file(greedy_v1["folder"] / "model.safetensors")
    for name, written in synthetic.layers.items():
        x = greedy_v1["inputs"][name]
        adapted = greedy_v1["reference"][name]
        with torch.no_grad():
            delta = (adapted.scaling * (adapted.B @ adapted.A)[:, adapted.g_idx] / 32).double()
        new = dense_weights(
            tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], written.scales, written.g_idx, 4, "gptq_v2"
        )
        base = written.dequantize().double()
        error = ((x @ (new - base - delta).t()) ** 2).sum(0)  # per output row
        effect = ((x @ delta.t()) ** 2).sum(0)
        assert bool((error <= effect * (1 + 1e-4) + 1e-9).all()), f"{name}: a row got worse than the base"
        layer = by_name[name]
        assert layer.kept == pytest.approx(1 - (error.sum() / effect.sum()).sqrt().item(), abs=2e-3), name
        codes = unpack_qweight(tensors[f"{name}.qweight"], 4, written.codes.shape[0])
        zeros = unpack_qzeros(tensors[f"{name}.qzeros"], 4, written.zeros.shape[1], "gptq_v2")
        assert layer.codes_changed == int((codes != written.codes).sum())
        assert layer.zeros_changed == int((zeros != written.zeros).sum())
        effect_total += effect.sum().item()
        error_total += error.sum().item()
    assert report.kept == pytest.approx(1 - (error_total / effect_total) ** 0.5, abs=2e-3)
    assert 0.3 < report.kept < 1.0  # random adapters move weights by whole steps; much of it is kept
    assert report.codes_changed > 0


def test_merged_model_computes_its_dense_integer_weights(merged_v1):
    """The in-memory merged model equals a dense model built from the checkpoint's integer codes and zeros."""
    synthetic = merged_v1["synthetic"]
    tensors = load_file(merged_v1["root"] / "merged" / "model.safetensors")
    dense = synthetic.dense_model()
    for name, written in synthetic.layers.items():
        weight = dense_weights(
            tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], written.scales, written.g_idx, 4, "gptq_v2"
        )
        dense.get_submodule(name).weight.data = weight.float()
    with torch.no_grad():
        assert_close(merged_v1["logits"], dense(merged_v1["ids"]).logits, atol=2e-4, what="logits")


LOGITS = """
    import sys, torch
    from transformers import AutoModelForCausalLM
    if sys.argv[4] == "gptqmodel":  # its torch kernel runs in fp16 only
        from gptqmodel import BACKEND, GPTQModel
        model = GPTQModel.load(sys.argv[1], device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
    else:
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    assert "peft_qalora" not in sys.modules
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[2])).logits.float(), sys.argv[3])
"""


@pytest.mark.parametrize("loader", ["transformers", "gptqmodel"])
def test_checkpoint_loads_without_the_plugin(merged_v1, loader, tmp_path):
    folder = merged_v1["root"] / "merged"
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["checkpoint_format"] == "gptq_v2" and config["desc_act"]
    torch.save(merged_v1["ids"], tmp_path / "ids.pt")
    result = run_python(LOGITS, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt"), loader)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt")
    if loader == "transformers":
        assert_close(logits, merged_v1["logits"], atol=2e-4, what="stock transformers logits")
    else:
        with torch.no_grad():
            merge_effect = (merged_v1["synthetic"].dense_model()(merged_v1["ids"]).logits - merged_v1["logits"]).abs()
        # fp16 rounding is far below what the merge changed; misread codes or zeros would not be.
        assert (logits - merged_v1["logits"]).abs().max() < 0.2 * merge_effect.max()


def test_offline_merge_and_cli_write_the_in_memory_result(merged_v1, tmp_path):
    root = merged_v1["root"]
    ids_file = tmp_path / "calibration.json"
    ids_file.write_text(json.dumps(CALIBRATION.tolist()))
    report = merge_checkpoint(
        str(root / "base"),
        str(root / "adapter"),
        str(tmp_path / "offline"),
        zero_format="int",
        max_rounding_loss=1.0,
        calibration=ids_file,
        calibration_method="sequential",
        progressbar=False,
    )
    assert report.kept == pytest.approx(merged_v1["report"].kept, abs=1e-6)
    expected = load_file(root / "merged" / "model.safetensors")
    written = load_file(tmp_path / "offline" / "model.safetensors")
    for name in merged_v1["synthetic"].layers:
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(written[f"{name}.{part}"], expected[f"{name}.{part}"]), f"{name}.{part}"

    code = cli_main(
        [
            "merge",
            str(root / "base"),
            str(root / "adapter"),
            str(tmp_path / "cli"),
            "--zero-format",
            "int",
            "--calibration-data",
            str(ids_file),
            "--max-rounding-loss",
            "1",
            "-q",  # the default method: sequential
        ]
    )
    assert code == 0
    cli_written = load_file(tmp_path / "cli" / "model.safetensors")
    assert all(torch.equal(cli_written[name], tensor) for name, tensor in written.items())


def test_default_refuses_a_lossy_calibrated_merge(gptq_checkpoint):
    synthetic = gptq_checkpoint(bits=3, sym=False, checkpoint_format="gptq_v2")
    model = adapter_model(synthetic)
    q_proj = model.get_base_model().get_submodule("model.layers.0.self_attn.q_proj")
    qweight, qzeros = q_proj.base_layer.qweight.clone(), q_proj.base_layer.qzeros.clone()
    with pytest.raises(RoundingLossError, match="whole quantization steps") as caught:
        model.merge_and_unload(zero_format="int", calibration=CALIBRATION)
    assert caught.value.report.lost > 0.05
    assert torch.equal(q_proj.base_layer.qweight, qweight) and torch.equal(q_proj.base_layer.qzeros, qzeros)
    assert not q_proj.merged


@pytest.mark.parametrize(
    "calibration, message",
    [
        ("", "holds no tokens"),
        (CALIBRATION[:1, :100], "too few"),
        (torch.tensor([[1, 2, 99999]]), "outside the model's vocabulary"),
        (torch.rand(2, 300), "integer tensor"),
    ],
)
def test_bad_calibration_data_is_refused_before_the_model_changes(gptq_checkpoint, calibration, message):
    model = adapter_model(gptq_checkpoint(bits=4))
    with pytest.raises(CalibrationError, match=message):
        model.merge_and_unload(zero_format="int", calibration=calibration, max_rounding_loss=1.0)
    assert all(layer.merged is False for layer in model.modules() if hasattr(layer, "merged_adapters"))


def test_bad_calibration_file_writes_nothing(merged_v1, tmp_path, capsys):
    root = merged_v1["root"]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Emma Woodhouse, handsome, clever \xe9".encode("latin-1"))
    few = tmp_path / "few.txt"
    few.write_text("Too short to calibrate anything.")
    for path, message in [(bad, "not UTF-8 text"), (few, "too few"), (tmp_path / "missing.txt", "not a file")]:
        out = tmp_path / f"out-{path.stem}"
        code = cli_main(
            [
                "merge",
                str(root / "base"),
                str(root / "adapter"),
                str(out),
                "--zero-format",
                "int",
                "--calibration-data",
                str(path),
                "-q",
            ]
        )
        assert code == 2 and message in capsys.readouterr().err
        assert not out.exists() and not any(p.name.startswith(f".{out.name}") for p in tmp_path.iterdir())
    assert (
        cli_main(
            [
                "merge",
                str(root / "base"),
                str(root / "adapter"),
                str(tmp_path / "x"),
                "--calibration-data",
                str(few),
                "-q",
            ]
        )
        == 2
    )
    assert "add --zero-format int" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["greedy", "codes", "zeros", "both"])
def test_solve_layer_on_partial_act_order_groups(method):
    """Any g_idx map, partial last group included: the report is the dense layer-output error, rows never worse."""
    generator = torch.Generator().manual_seed(0)
    in_features, out_features, bits = 80, 24, 3  # groups of 32, 32 and 16, scattered over the row
    g_idx = (torch.arange(in_features) // 32)[torch.randperm(in_features, generator=generator)].int()
    layer = quantize_rtn(torch.randn(out_features, in_features, generator=generator), bits, g_idx, sym=False)
    x = torch.randn(512, 8, generator=generator) @ torch.randn(8, in_features, generator=generator)
    x += 0.3 * torch.randn(512, in_features, generator=generator)
    delta = 0.4 * layer.scales.float() * torch.randn(layer.scales.shape, generator=generator)
    solution = solve_layer("l", layer.codes, layer.zeros, layer.scales, g_idx, delta, x.t() @ x, bits, 1, method)
    maxq = (1 << bits) - 1
    assert solution.codes.min() >= 0 and solution.codes.max() <= maxq
    assert solution.zeros.min() >= 1 and solution.zeros.max() <= maxq
    g = g_idx.long()
    new = (layer.scales.double()[g] * (solution.codes - solution.zeros[g]).double()).t()
    target = layer.dequantize().double() + delta.double()[g].t()
    error = ((x.double() @ (new - target).t()) ** 2).sum(0)
    effect = ((x.double() @ delta.double()[g]) ** 2).sum(0)
    assert bool((error <= effect * (1 + 1e-4)).all())
    assert solution.report.kept == pytest.approx(1 - (error.sum() / effect.sum()).sqrt().item(), abs=1e-3)
    assert solution.report.kept > 0.2


@pytest.mark.parametrize("method", ["greedy", "codes", "zeros", "both"])
def test_solve_layer_with_a_linear_term_minimises_the_error_against_other_inputs(method):
    """``linear``/``start_energy``: the objective ``||X_m W'^T - X_a (W + dW)^T||^2``, inputs differing."""
    generator = torch.Generator().manual_seed(1)
    in_features, out_features, bits = 64, 16, 4
    g_idx = (torch.arange(in_features) // 16).int()
    layer = quantize_rtn(torch.randn(out_features, in_features, generator=generator), bits, g_idx, sym=False)
    x_adapter = torch.randn(400, 6, generator=generator) @ torch.randn(6, in_features, generator=generator)
    x_adapter += 0.3 * torch.randn(400, in_features, generator=generator)
    x_merged = x_adapter + 0.05 * torch.randn(400, in_features, generator=generator)  # upstream error
    delta = 0.3 * layer.scales.float() * torch.randn(layer.scales.shape, generator=generator)
    g = g_idx.long()
    base = layer.dequantize().double()
    wanted = x_adapter.double() @ (base + delta.double()[g].t()).t()  # the adapter model's output
    residual = wanted - x_merged.double() @ base.t()
    linear = (residual.t() @ x_merged.double()).float()
    solution = solve_layer(
        "l",
        layer.codes,
        layer.zeros,
        layer.scales,
        g_idx,
        delta,
        x_merged.t() @ x_merged,
        bits,
        0,
        method,
        linear=linear,
        start_energy=(residual**2).sum(0),
    )
    new = (layer.scales.double()[g] * (solution.codes - solution.zeros[g]).double()).t()
    error = ((x_merged.double() @ new.t() - wanted) ** 2).sum(0)
    base_error = (residual**2).sum(0)
    assert bool((error <= base_error * (1 + 1e-4)).all())
    assert solution.report.sequential
    assert solution.report.kept == pytest.approx(1 - (error.sum() / base_error.sum()).sqrt().item(), abs=1e-3)
    assert solution.report.kept > 0.2
    with pytest.raises(ValueError, match="give both or neither"):
        solve_layer(
            "l",
            layer.codes,
            layer.zeros,
            layer.scales,
            g_idx,
            delta,
            x_merged.t() @ x_merged,
            bits,
            0,
            method,
            linear=linear,
        )


def test_sequential_calibration_refuses_layers_outside_the_decoder_blocks():
    """The sequential merge runs block by block; an adapted layer elsewhere is named before anything runs."""
    blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4)) for _ in range(3))
    model = torch.nn.ModuleDict({"layers": blocks, "head": torch.nn.Linear(4, 4)})
    layers = {f"layers.{i}.0": blocks[i][0] for i in range(3)}
    assert repeated_blocks(model, layers) is blocks and outside_blocks(model, layers) == []
    layers["head"] = model["head"]
    assert repeated_blocks(model, layers) is None and outside_blocks(model, layers) == ["head"]
    with pytest.raises(ValueError, match=r"outside its decoder blocks: \['head'\]"):
        sequential_calibrated_folds(model, {name: (layer, ["default"]) for name, layer in layers.items()}, CALIBRATION)


def test_calibration_files_and_texts_become_the_same_blocks(tmp_path):
    tokenizer = byte_level_tokenizer()
    text = "It is a truth universally acknowledged. " * 20
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = [torch.tensor(ids[i : i + 64]) for i in range(0, len(ids), 64)]
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({"input_ids": ids}))
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": text}) + "\n\n" + json.dumps({"input_ids": ids}) + "\n")
    for data in (text, [text], ids, torch.tensor(ids), tmp_path / "a.txt", tmp_path / "b.json"):
        blocks = calibration_blocks(data, tokenizer, seq_len=64, vocab_size=len(tokenizer))
        assert [b.tolist() for b in blocks] == [b.tolist() for b in expected], type(data)
    blocks = calibration_blocks(tmp_path / "c.jsonl", tokenizer, seq_len=64, max_tokens=len(ids) + 10)
    assert [b.tolist() for b in blocks] == [b.tolist() for b in expected] + [ids[:10]]
    with pytest.raises(CalibrationError, match="pass `tokenizer=`"):
        calibration_blocks(text, None)
