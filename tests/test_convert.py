"""Adapter conversion: every direction keeps the logits, the exports load in stock PEFT, and bad input is refused."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import load_gptq
from peft import LoraConfig, PeftModel, get_peft_model
from reference import assert_close
from safetensors.torch import load_file, save_file

from peft_qalora import QALoraConfig, QALoraLinear, convert_adapter
from peft_qalora.cli import main

IDS = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(1))
ATOL = 1e-4


def logits_of(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def run_python(code, *args):
    """Run ``code`` in a fresh interpreter, as a user's new process would (nothing of this package imported)."""
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


STOCK_PEFT_LOGITS = """
    import sys, torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    ids, out, pairs = torch.load(sys.argv[1]), sys.argv[2], sys.argv[3:]
    logits = []
    for base, adapter in zip(pairs[::2], pairs[1::2]):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
        assert any(isinstance(m, LoraLayer) for m in model.modules()), adapter
        with torch.no_grad():
            logits.append(model.eval()(ids).logits)
    assert not any(name.startswith("peft_qalora") for name in sys.modules), "the plugin was imported"
    torch.save(logits, out)
"""


def stock_peft_logits(pairs, tmp_path):
    """Logits of each ``(base_dir, adapter_dir)`` loaded by stock PEFT in one fresh process without the plugin."""
    torch.save(IDS, tmp_path / "ids.pt")
    args = [str(path) for pair in pairs for path in pair]
    result = run_python(STOCK_PEFT_LOGITS, str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt"), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt")


def read_config(folder):
    with open(os.path.join(folder, "adapter_config.json")) as f:
        return json.load(f)


def edit_config(folder, **changes):
    config = read_config(folder)
    config.update(changes)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f)


class Source:
    """A saved adapter, the base it was trained on, and its logits (and the base's) on ``IDS``."""

    def __init__(self, synthetic, folder, logits, base_logits):
        self.synthetic, self.folder, self.logits = synthetic, str(folder), logits
        assert (logits - base_logits).abs().max() > 0.05, "the adapter must change the logits to test anything"

    @property
    def base(self):
        return self.synthetic.path


def save_source(synthetic, folder, config):
    torch.manual_seed(0)
    model = get_peft_model(load_gptq(synthetic.path), config).eval()
    with model.disable_adapter():
        base_logits = logits_of(model)
    logits = logits_of(model)
    model.save_pretrained(folder)
    return Source(synthetic, folder, logits, base_logits)


@pytest.fixture(scope="module")
def qalora(gptq_checkpoint, tmp_path_factory):
    """QALORA adapters with random A and B: on a base without act-order (with rank and alpha patterns), and on an
    act-order base (with rank-stabilized scaling)."""
    folder = tmp_path_factory.mktemp("qalora")
    plain = QALoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
        rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 16},
    )  # fmt: skip
    act_order = QALoraConfig(r=4, lora_alpha=6, target_modules="all-linear", init_lora_weights=False, use_rslora=True)
    return {
        "plain": save_source(gptq_checkpoint(bits=4, sym=False), folder / "plain", plain),
        "act_order": save_source(gptq_checkpoint(bits=4, act_order=True, sym=False), folder / "act_order", act_order),
    }


@pytest.fixture(scope="module")
def peft_qalora(gptq_checkpoint, tmp_path_factory):
    """Stock PEFT ``LoraConfig(use_qalora=True)`` adapters with random A and B on a group-size-32 base, pooling over
    32 channels (the GPTQ group size) and over 64 (two whole groups)."""
    folder = tmp_path_factory.mktemp("peft_qalora")
    synthetic = gptq_checkpoint(bits=4, sym=False)
    sources = {}
    for pool in (32, 64):
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
            use_qalora=True, qalora_group_size=pool, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 16},
        )  # fmt: skip
        sources[pool] = save_source(synthetic, folder / f"pool{pool}", config)
    return sources


# ------------------------------------------------------------------------------------------ same function


def test_exports_give_the_same_logits_in_stock_peft(qalora, tmp_path):
    plain, act_order = qalora["plain"], qalora["act_order"]
    convert_adapter(plain.folder, tmp_path / "lora", "lora")  # groups from the recorded layer facts, no base read
    convert_adapter(plain.folder, tmp_path / "peft_lora", "peft-lora")
    convert_adapter(act_order.folder, tmp_path / "act_order_lora", "lora")  # g_idx from base_model_name_or_path

    lora, peft_lora = read_config(tmp_path / "lora"), read_config(tmp_path / "peft_lora")
    assert lora["peft_type"] == peft_lora["peft_type"] == "LORA"
    assert not lora["use_qalora"] and peft_lora["use_qalora"] and peft_lora["qalora_group_size"] == 32
    assert lora["rank_pattern"] == {"q_proj": 2} and lora["alpha_pattern"] == {"down_proj": 16}
    assert read_config(tmp_path / "act_order_lora")["use_rslora"]
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert load_file(tmp_path / "lora" / "adapter_model.safetensors")[q_proj].shape == (2, 128)
    assert load_file(tmp_path / "peft_lora" / "adapter_model.safetensors")[q_proj].shape == (2, 4)

    pairs = [
        (plain.base, tmp_path / "lora"),
        (plain.base, tmp_path / "peft_lora"),
        (act_order.base, tmp_path / "act_order_lora"),
    ]
    expected = [plain.logits, plain.logits, act_order.logits]
    for (_, adapter), actual, logits in zip(pairs, stock_peft_logits(pairs, tmp_path), expected):
        assert_close(actual, logits, atol=ATOL, what=adapter.name)


@pytest.mark.parametrize("pool", [32, 64], ids=["pool_is_group", "pool_is_two_groups"])
def test_peft_use_qalora_adapter_becomes_a_qalora_adapter(peft_qalora, qalora, tmp_path, pool):
    source = peft_qalora[pool]
    convert_adapter(source.folder, tmp_path / "qalora", "qalora")  # base from base_model_name_or_path

    config = read_config(tmp_path / "qalora")
    assert config["peft_type"] == "QALORA" and config["rank_pattern"] == {"v_proj": 2}
    # The same records the tuner writes when it creates an adapter on this base.
    recorded = read_config(qalora["plain"].folder)
    assert config["base_quantization"] == recorded["base_quantization"]
    assert config["base_layers"] == {name: recorded["base_layers"][name] for name in config["base_layers"]}
    assert len(config["base_layers"]) == 6

    model = PeftModel.from_pretrained(load_gptq(source.base), tmp_path / "qalora")
    assert sum(isinstance(m, QALoraLinear) for m in model.modules()) == 6
    assert_close(logits_of(model), source.logits, atol=ATOL, what="logits")


def test_qalora_to_peft_lora_and_back_is_the_same_adapter(qalora, tmp_path):
    source = qalora["plain"].folder
    convert_adapter(source, tmp_path / "peft_lora", "peft-lora")
    convert_adapter(tmp_path / "peft_lora", tmp_path / "back", "qalora")

    before, after = read_config(source), read_config(tmp_path / "back")
    for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "base_quantization", "base_layers"):
        assert after[key] == before[key], key
    expected = load_file(os.path.join(source, "adapter_model.safetensors"))
    actual = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name], expected[name], atol=0, rtol=1e-6, what=name)


def test_cli_convert(qalora, tmp_path, capsys):
    source = qalora["act_order"]
    args = ["convert", source.folder, str(tmp_path / "cli"), "--to", "lora", "--base", source.base, "-q"]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "peft_qalora.cli", *args], check=False, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    convert_adapter(source.folder, tmp_path / "api", "lora", base_model_dir=source.base)
    assert read_config(tmp_path / "cli") == read_config(tmp_path / "api")
    expected = load_file(tmp_path / "api" / "adapter_model.safetensors")
    for name, tensor in load_file(tmp_path / "cli" / "adapter_model.safetensors").items():
        assert torch.equal(tensor, expected[name]), name

    # Errors exit with code 2 and one line that names the problem (the same code path, in this process).
    assert main(args) == 2
    assert "peft-qalora convert: error: " in capsys.readouterr().err
    assert main(["convert", source.folder, str(tmp_path / "x"), "--to", "peft-lora", "-q"]) == 2
    assert "act-order" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- refused


def assert_refused(in_dir, out_dir, to, match, **kwargs):
    with pytest.raises(ValueError, match=match):
        convert_adapter(in_dir, out_dir, to, **kwargs)
    assert not os.path.exists(out_dir)
    assert not [name for name in os.listdir(os.path.dirname(out_dir)) if name.endswith((".partial", ".old"))]


def test_act_order_cannot_become_peft_use_qalora(qalora, tmp_path):
    assert_refused(
        qalora["act_order"].folder, tmp_path / "out", "peft-lora", r"uses act-order(.|\n)*Convert to 'lora' instead"
    )


def test_peft_use_qalora_on_act_order_base_is_refused(peft_qalora, qalora, tmp_path):
    # Same layer names and shapes, but the base's groups are scattered: PEFT's contiguous pooling is not per group.
    assert_refused(
        peft_qalora[32].folder,
        tmp_path / "out",
        "qalora",
        r"act-order(.|\n)*cannot be merged",
        base_model_dir=qalora["act_order"].base,
    )


def test_peft_pooling_that_is_not_whole_groups_is_refused(gptq_checkpoint, peft_qalora, tmp_path):
    base = gptq_checkpoint(bits=4, group_size=64, sym=False).path
    assert_refused(
        peft_qalora[32].folder,
        tmp_path / "out",
        "qalora",
        r"qalora_group_size=32 does not match the GPTQ group size 64(.|\n)*cannot be merged",
        base_model_dir=base,
    )


@pytest.mark.parametrize(
    "source,to,match",
    [
        ("peft", "lora", r"needs a QALORA adapter, but .* holds a LORA adapter(.|\n)*converts with to='qalora'"),
        ("peft", "peft-lora", r"needs a QALORA adapter, but .* holds a LORA adapter"),
        ("qalora", "qalora", r"needs a LORA adapter, but .* holds a QALORA adapter"),
        ("qalora", "gguf", r"Unknown conversion target 'gguf'"),
    ],
)
def test_wrong_input_type(peft_qalora, qalora, tmp_path, source, to, match):
    folder = peft_qalora[32].folder if source == "peft" else qalora["plain"].folder
    assert_refused(folder, tmp_path / "out", to, match)


def test_plain_lora_cannot_become_qalora(qalora, tmp_path):
    convert_adapter(qalora["plain"].folder, tmp_path / "lora", "lora")
    assert_refused(tmp_path / "lora", tmp_path / "out", "qalora", r"plain LoRA adapter \(use_qalora is false\)")


@pytest.mark.parametrize(
    "option",
    [{"use_dora": True}, {"bias": "all"}, {"lora_bias": True}, {"modules_to_save": ["lm_head"]}],
    ids=lambda o: next(iter(o)),
)
def test_lora_options_qalora_cannot_represent(peft_qalora, tmp_path, option):
    folder = shutil.copytree(peft_qalora[32].folder, tmp_path / "adapter")
    edit_config(folder, **option)
    name, value = next(iter(option.items()))
    assert_refused(folder, tmp_path / "out", "qalora", rf"cannot represent: {name}={value!r}".replace("[", r"\["))


def test_weights_the_output_cannot_hold(qalora, tmp_path):
    folder = shutil.copytree(qalora["plain"].folder, tmp_path / "adapter")
    weights = load_file(folder / "adapter_model.safetensors")
    weights["base_model.model.lm_head.modules_to_save.default.weight"] = torch.zeros(272, 128)
    save_file(weights, folder / "adapter_model.safetensors")
    assert_refused(
        folder, tmp_path / "out", "lora", r"holds weights other than qalora_A/qalora_B(.|\n)*modules_to_save"
    )


def test_act_order_to_lora_needs_the_base(qalora, tmp_path):
    folder = shutil.copytree(qalora["act_order"].folder, tmp_path / "adapter")
    edit_config(folder, base_model_name_or_path="someone/not-a-local-folder")
    assert_refused(
        folder, tmp_path / "out", "lora", r"does not record the quantization groups(.|\n)*act-order(.|\n)*--base"
    )


def test_adapter_and_base_that_do_not_match(qalora, tmp_path):
    assert_refused(
        qalora["plain"].folder,
        tmp_path / "out",
        "lora",
        r"different GPTQ base(.|\n)*act_order: adapter trained with False",
        base_model_dir=qalora["act_order"].base,
    )


def test_non_empty_output_folder(qalora, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        convert_adapter(qalora["plain"].folder, out, "lora")
    assert os.listdir(out) == ["keep.txt"]
    convert_adapter(qalora["plain"].folder, out, "lora", overwrite=True)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
