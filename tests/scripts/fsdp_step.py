"""One FSDP2 (``fully_shard``) forward and backward of a QA-LoRA model on CPU (gloo), against an unsharded copy.

    torchrun --standalone --nproc_per_node 2 fsdp_step.py CHECKPOINT RESULT.json [--keep-buffers]

Rank 0 writes the bytes of GPTQ tensors each rank holds, before and after sharding, and the largest difference of the
loss and of the adapter gradients between the sharded model and the same model unsharded.
"""

import argparse
import json
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers import AutoModelForCausalLM, GPTQConfig  # noqa: E402

from peft_qalora import QALoraConfig, prepare_model_for_fsdp  # noqa: E402
from peft_qalora.fsdp import GPTQ_TENSORS  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("result")
parser.add_argument("--keep-buffers", action="store_true", help="skip prepare_model_for_fsdp")
args = parser.parse_args()
dist.init_process_group("gloo")


def adapted():
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, dtype=torch.float32, quantization_config=GPTQConfig(bits=4, backend="gptq_torch")
    )
    torch.manual_seed(0)
    return get_peft_model(model, QALoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def gptq_bytes(model):
    total = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.rsplit(".", 1)[-1] in GPTQ_TENSORS:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            total += local.numel() * local.element_size()
    return total


ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(1))
reference = adapted()
ref_loss = reference(input_ids=ids, labels=ids).loss
ref_loss.backward()
ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}

model = adapted()
if not args.keep_buffers:
    prepare_model_for_fsdp(model)
before = gptq_bytes(model)
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
after = gptq_bytes(model)
loss = model(input_ids=ids, labels=ids).loss  # the same batch on every rank: the averaged gradient is the same
loss.backward()
grad_diff = max(
    (p.grad.full_tensor() - ref_grads[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad
)
if dist.get_rank() == 0:
    with open(args.result, "w") as f:
        json.dump(
            {
                "world_size": dist.get_world_size(),
                "gptq_bytes_before": before,
                "gptq_bytes_after": after,
                "loss_diff": abs(loss.item() - ref_loss.item()),
                "grad_diff": grad_diff,
                "grad_max": max(g.abs().max().item() for g in ref_grads.values()),
            },
            f,
        )
dist.destroy_process_group()
