"""Data parallel training (DDP through transformers.Trainer under torchrun, gloo on CPU).

Every process holds the quantized model; only the adapter's gradients are all-reduced; rank 0 saves. After the same
steps on the same global batch, the 2-process adapter equals the 1-process one, and it reloads and merges as usual.
"""

import json
import os
import subprocess
import sys

import torch
from conftest import load_gptq
from peft import PeftModel
from reference import assert_close
from safetensors.torch import load_file

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_qalora.py")


def run(command, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def test_ddp_on_two_processes_equals_one_process(gptq_checkpoint, tmp_path, input_ids):
    synthetic = gptq_checkpoint(bits=4, act_order=True)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    # SGD: the update is the gradient itself, so the comparison measures the all-reduce, not Adam's amplification of
    # float noise in near-zero gradients.
    train = [SCRIPT, synthetic.path, "--optim", "sgd", "--lr", "0.5"]
    run([sys.executable, *train, str(single), "--batch-size", "4"], tmp_path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run([*launcher, *train, str(ddp), "--batch-size", "2"], tmp_path)
    assert (ddp / "world_size").read_text() == "2" and (single / "world_size").read_text() == "1"

    single_weights = load_file(single / "adapter" / "adapter_model.safetensors")
    ddp_weights = load_file(ddp / "adapter" / "adapter_model.safetensors")
    assert single_weights.keys() == ddp_weights.keys()
    moved = max((w.abs().max().item() for name, w in single_weights.items() if "qalora_B" in name))
    assert moved > 1e-3  # B starts at zero: training moved it, so agreeing is not trivial
    for name, weight in single_weights.items():
        assert_close(ddp_weights[name], weight, atol=1e-6, rtol=1e-4, what=name)

    model = PeftModel.from_pretrained(load_gptq(synthetic.path), ddp / "adapter").eval()
    with torch.no_grad():
        adapter_logits = model(input_ids).logits
        merged_logits = model.merge_and_unload()(input_ids).logits
    assert_close(merged_logits, adapter_logits, atol=1e-4, what="merged DDP adapter")


def fsdp_step(synthetic, tmp_path, *options):
    result = tmp_path / f"fsdp{'-'.join(options)}.json"
    script = os.path.join(os.path.dirname(__file__), "scripts", "fsdp_step.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run([*launcher, script, synthetic.path, str(result), *options], tmp_path)
    return json.loads(result.read_text())


def test_fsdp_shards_the_quantized_base(gptq_checkpoint, tmp_path):
    """FSDP2 replicates buffers; prepare_model_for_fsdp makes the GPTQ tensors frozen parameters, and they shard."""
    synthetic = gptq_checkpoint(bits=4)
    as_buffers = fsdp_step(synthetic, tmp_path, "--keep-buffers")
    assert as_buffers["gptq_bytes_after"] == as_buffers["gptq_bytes_before"]  # every rank holds the whole base
    sharded = fsdp_step(synthetic, tmp_path)
    assert sharded["world_size"] == 2
    assert sharded["gptq_bytes_after"] <= sharded["gptq_bytes_before"] / 2 + 1024  # half per rank
    assert sharded["loss_diff"] < 1e-5
    assert sharded["grad_diff"] <= 1e-5 * sharded["grad_max"] + 1e-7  # the same gradients as unsharded
