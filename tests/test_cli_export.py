"""`peft-qalora export`: the three formats through the command line, and its refusals (exit status 2)."""

import os

import gguf
import pytest
from test_merge_checkpoint import save_adapter

from peft_qalora.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from peft_qalora.testing import write_gptq_checkpoint

    root = tmp_path_factory.mktemp("cli-export")
    synthetic = write_gptq_checkpoint(root / "base", bits=4, group_size=32)
    return synthetic.path, str(save_adapter(synthetic, root / "adapter"))


def test_export_formats(inputs, tmp_path, capsys):
    base, adapter = inputs
    assert main(["export", base, adapter, str(tmp_path / "merged.gguf"), "--format", "gguf", "-q"]) == 0
    assert "Q4_1 tensors" in capsys.readouterr().out
    assert main(["export", base, "-", str(tmp_path / "base.gguf"), "--format", "gguf", "-q"]) == 0
    assert main(["export", base, adapter, str(tmp_path / "adapter.gguf"), "--format", "gguf-lora", "-q"]) == 0
    assert "--lora" in capsys.readouterr().out
    assert main(["export", base, adapter, str(tmp_path / "mlx"), "--format", "mlx", "-q"]) == 0
    assert "4-bit layers" in capsys.readouterr().out

    merged, plain = gguf.GGUFReader(tmp_path / "merged.gguf"), gguf.GGUFReader(tmp_path / "base.gguf")
    lora = gguf.GGUFReader(tmp_path / "adapter.gguf")
    name = "blk.0.attn_v.weight"
    merged_blocks = next(t for t in merged.tensors if t.name == name).data
    plain_blocks = next(t for t in plain.tensors if t.name == name).data
    assert (merged_blocks != plain_blocks).any()  # the adapter moved the offsets of the merged file only
    assert lora.fields["general.type"].contents() == "adapter"
    assert {f"{name}.lora_a", f"{name}.lora_b"} <= {t.name for t in lora.tensors}
    assert os.path.isfile(tmp_path / "mlx" / "config.json")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["-", "{out}/a.gguf", "--format", "gguf-lora"], "give ADAPTER_DIR"),
        (["{adapter}", "{out}/m.gguf", "--format", "gguf", "--private"], "--push-to-hub"),
        (["{adapter}", "{out}", "--format", "gguf"], "is a folder"),
    ],
)
def test_export_refusals(inputs, tmp_path, capsys, argv, message):
    base, adapter = inputs
    argv = [arg.format(adapter=adapter, out=tmp_path) for arg in argv]
    before = sorted(os.listdir(tmp_path))
    assert main(["export", base, *argv, "-q"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("peft-qalora export: error:") and message in error, error
    assert sorted(os.listdir(tmp_path)) == before
