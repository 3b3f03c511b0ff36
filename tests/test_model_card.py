"""Model cards of adapters, merged checkpoints and exports, and uploads exercised up to the huggingface_hub calls."""

import copy
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
import yaml
from conftest import load_gptq
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from peft import LoraConfig, PeftModel, get_peft_model

from peft_qalora import QALoraConfig, merge_checkpoint, write_model_card
from peft_qalora.cli import main as cli_main
from peft_qalora.model_card import SECTION_BEGIN
from peft_qalora.testing import tiny_llama_config

QUANTIZATION = {
    "quant_method": "gptq",
    "bits": 4,
    "group_size": 32,
    "desc_act": True,
    "sym": False,
    "checkpoint_format": "gptq",
}
TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def metadata_of(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def card_of(folder):
    text = open(os.path.join(folder, "README.md")).read()
    return metadata_of(text), text


@pytest.fixture
def base(gptq_checkpoint, tmp_path):
    """A 4-bit act-order asymmetric GPTQ checkpoint in its own folder, with a base model card holding a license."""
    folder = tmp_path / "base"
    shutil.copytree(gptq_checkpoint(bits=4, act_order=True, sym=False).path, folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n\n# The base\n")
    return str(folder)


@pytest.fixture
def adapter_model(base):
    torch.manual_seed(0)
    return get_peft_model(
        load_gptq(base, dtype=torch.float16),
        QALoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )


@pytest.fixture
def hub(monkeypatch):
    """Intercepts the huggingface_hub calls: what would be created and uploaded is recorded, nothing leaves."""
    calls = types.SimpleNamespace(repos=[], uploads=[], branches=[], remote_card=None)
    real_load = ModelCard.load.__func__

    def create_repo(self, repo_id, **kwargs):
        calls.repos.append((repo_id, kwargs))
        return types.SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kwargs):
        calls.branches.append((repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {}
        for root, _, names in os.walk(folder_path):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, folder_path)] = f.read()
        calls.uploads.append({"repo_id": repo_id, "files": files, **kwargs})
        return types.SimpleNamespace(repo_url=f"https://huggingface.co/{repo_id}")

    def load(cls, repo_id_or_path, *args, **kwargs):
        if os.path.exists(repo_id_or_path):
            return real_load(cls, repo_id_or_path, *args, **kwargs)
        if calls.remote_card is None:
            raise EntryNotFoundError(f"{repo_id_or_path} has no README.md")
        return cls(calls.remote_card)

    def no_commit(self, *args, **kwargs):
        raise AssertionError("QA-LoRA uploads go through upload_folder")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "create_commit", no_commit)
    monkeypatch.setattr(ModelCard, "load", classmethod(load))
    return calls


def test_adapter_card(adapter_model, base, tmp_path):
    adapter_model.save_pretrained(tmp_path / "adapter")
    metadata, text = card_of(tmp_path / "adapter")
    assert metadata["library_name"] == "peft"
    assert metadata["base_model"] == base
    assert {"qalora", "gptq"} <= set(metadata["tags"])
    assert metadata["pipeline_tag"] == "text-generation"
    assert metadata["license"] == "apache-2.0" and metadata["language"] == "en"  # from the base's card
    qalora = metadata["qalora"]
    assert qalora["kind"] == "adapter"
    assert qalora["quantization"] == QUANTIZATION
    assert qalora["adapters"] == {"default": {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "layers": 14}}
    assert "merge" not in qalora
    for needed in ("pip install peft-qalora", "import peft_qalora", "KeyError: 'QALORA'", "| group size | 32 |"):
        assert needed in text
    assert "## Model Details" in text  # PEFT's own card is kept around our section

    # Saving again updates the card in place: user text stays, our section is replaced, not repeated.
    (tmp_path / "adapter" / "README.md").write_text(text.replace("## Model Details", "My notes.\n\n## Model Details"))
    adapter_model.save_pretrained(tmp_path / "adapter")
    again = (tmp_path / "adapter" / "README.md").read_text()
    assert again.count(SECTION_BEGIN) == 1 and "My notes." in again
    assert metadata_of(again) == metadata


def test_push_to_hub_uploads_the_qalora_card(adapter_model, base, hub):
    commit = adapter_model.push_to_hub("me/my-qalora", private=True, tags=["my-tag"], token="hf_dummy")
    assert hub.repos == [("me/my-qalora", {"private": True, "token": "hf_dummy", "exist_ok": True})]
    (upload,) = hub.uploads
    assert commit.repo_url == "https://huggingface.co/me/my-qalora"
    assert upload["repo_id"] == "me/my-qalora" and upload["commit_message"] == "Upload QA-LoRA adapter"
    files = upload["files"]
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert json.loads(files["adapter_config.json"])["peft_type"] == "QALORA"
    text = files["README.md"].decode()
    metadata = metadata_of(text)
    assert metadata["library_name"] == "peft" and metadata["base_model"] == base
    assert {"qalora", "gptq", "my-tag"} <= set(metadata["tags"])
    assert metadata["qalora"]["quantization"] == QUANTIZATION
    assert 'PeftModel.from_pretrained(base, "me/my-qalora")' in text


def test_push_to_hub_updates_the_card_already_on_the_hub(adapter_model, hub):
    hub.remote_card = "---\nlicense: mit\ntags:\n- mine\n---\n\n# My adapter\n\nHow I trained it.\n"
    adapter_model.push_to_hub("me/my-qalora")
    text = hub.uploads[0]["files"]["README.md"].decode()
    metadata = metadata_of(text)
    assert metadata["license"] == "mit" and {"mine", "qalora"} <= set(metadata["tags"])
    assert "How I trained it." in text and text.count(SECTION_BEGIN) == 1
    assert text.index("# My adapter") < text.index(SECTION_BEGIN) < text.index("How I trained it.")


def test_other_peft_models_are_untouched(tmp_path, hub, monkeypatch):
    """A LoRA model's card and push go through PEFT's and transformers' code as if peft_qalora were not there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in tiny_llama_config().items() if k != "architectures"})
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "hooked")
    os.makedirs(tmp_path / "stock")
    PeftModel.create_or_update_model_card.__wrapped__(model, str(tmp_path / "stock"))
    assert (tmp_path / "hooked" / "README.md").read_text() == (tmp_path / "stock" / "README.md").read_text()

    commits = []

    def create_commit(self, repo_id, operations, **kwargs):  # transformers' push: create_repo, then create_commit
        commits.append({op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations})

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    model.push_to_hub("me/lora")
    assert hub.uploads == [] and len(commits) == 1
    assert metadata_of(commits[0]["README.md"].decode())["library_name"] == "transformers"  # the stock card


@pytest.mark.parametrize("zero_format", ["float", "int"])
def test_merged_card_is_the_same_from_memory_and_offline(adapter_model, base, tmp_path, zero_format):
    adapter_model.save_pretrained(tmp_path / "adapter")
    kwargs = {"zero_format": zero_format, "max_rounding_loss": 1.0}
    merged = PeftModel.from_pretrained(load_gptq(base, dtype=torch.float16), tmp_path / "adapter").merge_and_unload(
        **kwargs
    )
    merged.save_pretrained(tmp_path / "in_memory")
    merge_checkpoint(base, str(tmp_path / "adapter"), str(tmp_path / "offline"), progressbar=False, **kwargs)

    metadata, text = card_of(tmp_path / "offline")
    assert (tmp_path / "in_memory" / "README.md").read_text() == text
    assert metadata["library_name"] == "transformers" and metadata["base_model"] == base
    assert metadata["base_model_relation"] == "finetune"
    assert {"qalora", "gptq", "merged"} <= set(metadata["tags"]) and metadata["pipeline_tag"] == "text-generation"
    assert metadata["license"] == "apache-2.0"
    qalora = metadata["qalora"]
    assert qalora["kind"] == "merged" and qalora["quantization"] == QUANTIZATION
    assert qalora["adapters"]["default"]["r"] == 4 and qalora["adapters"]["default"]["target_modules"] == TARGETS
    merge = qalora["merge"]
    assert merge["zero_format"] == zero_format
    if zero_format == "float":
        assert merge == {
            "zero_format": "float",
            "exact": True,
            "quant_method": "peft_qalora",
            "format": "gptq_float_zeros",
        }
        assert "pip install peft-qalora" in text and "import peft_qalora" in text
    else:
        report = merged.qalora_merge_report
        assert merge["format"] == "gptq_v2" and merge["exact"] is False
        assert merge["kept"] == round(report.kept, 4) and merge["layers"] == len(report.layers) == 14
        assert merge["max_error_steps"] == round(report.max_error_steps, 4) and merge["clamped_zero_points"] == 0
        assert "no plugin" in text and "import peft_qalora" not in text
    assert f"{merge['kept']:.2%}" in text if zero_format == "int" else "real-valued (fp32)" in text

    # The card travels with copies of the merged model.
    copy.deepcopy(merged).save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "README.md").read_text() == text


def test_merged_model_push_to_hub(adapter_model, hub):
    merged = adapter_model.merge_and_unload()
    merged.push_to_hub("me/merged", commit_message="merged!")
    (upload,) = hub.uploads
    assert upload["commit_message"] == "merged!"
    assert {"config.json", "model.safetensors", "README.md"} <= set(upload["files"])
    text = upload["files"]["README.md"].decode()
    assert metadata_of(text)["qalora"]["merge"]["zero_format"] == "float"
    assert 'AutoModelForCausalLM.from_pretrained("me/merged")' in text
    assert json.loads(upload["files"]["config.json"])["quantization_config"]["quant_method"] == "peft_qalora"


def test_cli_merge_push_to_hub(adapter_model, base, tmp_path, hub, capsys, monkeypatch):
    adapter_model.save_pretrained(tmp_path / "adapter")
    out = str(tmp_path / "out")
    merge = ["merge", base, str(tmp_path / "adapter"), out, "-q"]
    assert cli_main(merge + ["--private"]) == 2 and "--push-to-hub" in capsys.readouterr().err
    assert not os.path.exists(out) and hub.repos == []

    assert cli_main(merge + ["--push-to-hub", "me/merged", "--private"]) == 0
    assert hub.repos == [("me/merged", {"private": True, "token": None, "exist_ok": True})]
    (upload,) = hub.uploads
    assert set(upload["files"]) == set(os.listdir(out))
    text = upload["files"]["README.md"].decode()
    assert text == open(os.path.join(out, "README.md")).read()
    assert 'from_pretrained("me/merged")' in text and metadata_of(text)["qalora"]["kind"] == "merged"
    assert "Uploaded" in capsys.readouterr().out

    def offline(self, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(HfApi, "upload_folder", offline)
    assert cli_main(merge + ["--overwrite", "--push-to-hub", "me/merged"]) == 1
    err = capsys.readouterr().err
    assert "is complete, but uploading it to me/merged failed: no network" in err and "hf upload me/merged" in err
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_write_model_card_for_an_export(adapter_model, base, tmp_path):
    adapter_model.save_pretrained(tmp_path / "adapter")
    os.makedirs(tmp_path / "mlx")
    write_model_card(
        tmp_path / "mlx",
        kind="mlx",
        base_dir=base,
        adapter_dir=tmp_path / "adapter",
        export={"format": "mlx affine", "bits": 4, "group_size": 32},
    )
    metadata, text = card_of(tmp_path / "mlx")
    assert metadata["library_name"] == "mlx" and {"mlx", "qalora"} <= set(metadata["tags"])
    assert metadata["base_model"] == base and metadata["pipeline_tag"] == "text-generation"
    assert metadata["qalora"]["export"] == {"format": "mlx affine", "bits": 4, "group_size": 32}
    assert metadata["qalora"]["merge"]["exact"] is True and metadata["qalora"]["quantization"] == QUANTIZATION
    assert "from mlx_lm import" in text

    os.makedirs(tmp_path / "gguf")
    write_model_card(tmp_path / "gguf", kind="gguf", base_dir=base, export={"file": "model-Q4_1.gguf"})
    metadata, text = card_of(tmp_path / "gguf")
    assert metadata["library_name"] == "gguf" and metadata["base_model"] == base
    assert "adapters" not in metadata["qalora"] and "merge" not in metadata["qalora"]
    assert metadata["qalora"]["quantization"]["bits"] == 4 and "llama-cli -m model-Q4_1.gguf" in text

    with pytest.raises(ValueError, match="kind must be one of"):
        write_model_card(tmp_path / "gguf", kind="onnx")
    LoraConfig(r=2, target_modules=["q_proj"]).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="holds a LORA adapter, not a QALORA one"):
        write_model_card(tmp_path / "gguf", kind="gguf", adapter_dir=tmp_path / "lora")


def test_importing_peft_does_not_import_peft_qalora(adapter_model, tmp_path):
    """No import hook: PEFT alone is unchanged, and fails on a QALORA adapter with the KeyError the card explains."""
    adapter_model.save_pretrained(tmp_path / "adapter")
    code = (
        "import sys, peft\n"
        "assert 'peft_qalora' not in sys.modules\n"
        "try:\n"
        f"    peft.PeftConfig.from_pretrained({str(tmp_path / 'adapter')!r})\n"
        "except KeyError as exc:\n"
        "    print('KeyError', exc)\n"
        "assert 'peft_qalora' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "KeyError 'QALORA'"
    assert "KeyError: 'QALORA'" in (tmp_path / "adapter" / "README.md").read_text()
