"""Training: transformers.Trainer lowers the loss on the default kernel; a bf16 model with an fp32 adapter is exact.

Every GPTQ kernel, one by one: tests/test_kernels.py.
"""

import pytest
import torch
from conftest import load_gptq
from peft import get_peft_model
from reference import ExpandedDeltaLinear, assert_close
from torch import nn
from transformers import Trainer, TrainingArguments

from peft_qalora import QALoraConfig


def lm_loss(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids, labels=input_ids).loss.item()


def test_trainer_lowers_the_loss(gptq_checkpoint, tmp_path):
    synthetic = gptq_checkpoint(bits=4, act_order=True, sym=False)
    model = get_peft_model(load_gptq(synthetic.path), QALoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    # A few fixed sequences: a model that learns anything memorises them.
    sequences = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(2))
    dataset = [{"input_ids": s, "labels": s} for s in sequences]
    before = lm_loss(model, sequences)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=dataset).train()
    after = lm_loss(model, sequences)
    assert after < before - 0.5, (before, after)


@pytest.mark.parametrize("act_order", [False, True])
def test_half_precision_model_with_fp32_adapter_matches_reference(gptq_checkpoint, act_order):
    """A bf16 model with PEFT's default fp32 adapter weights takes the path that pools with fp32 accumulation and
    applies B in bf16: output and gradients against the dense fp32 reference, within bf16 rounding."""
    synthetic = gptq_checkpoint(bits=4, act_order=act_order)
    model = get_peft_model(
        load_gptq(synthetic.path, backend="gptq_torch", dtype=torch.bfloat16),
        QALoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False),
    )
    name = "model.layers.0.self_attn.q_proj"
    layer = model.get_base_model().get_submodule(name)
    A, B = layer.qalora_A["default"].weight, layer.qalora_B["default"].weight
    assert A.dtype == B.dtype == torch.float32
    with torch.no_grad():
        B.mul_(20)  # an adapter effect well above bf16 rounding, so a wrong scale or pooling cannot pass
    quantized = synthetic.layers[name]
    reference = ExpandedDeltaLinear(quantized.dequantize(), A, B, 8 / 4, quantized.g_idx)

    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0))
    x_half = x.bfloat16().requires_grad_()
    x_ref = x_half.detach().float().requires_grad_()
    out, ref = layer(x_half), reference(x_ref)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        effect = (ref - nn.functional.linear(x_ref, reference.weight)).abs().max().item()
    assert effect > 5 * 2e-2 * ref.abs().max().item()  # the adapter's effect is far above the tolerance below
    assert_close(out.float(), ref, atol=0, rtol=2e-2, what="output")

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad.bfloat16())
    ref.backward(grad.bfloat16().float())
    assert_close(x_half.grad.float(), x_ref.grad, atol=0, rtol=2e-2, what="input grad")
    assert_close(A.grad, reference.A.grad, atol=0, rtol=2e-2, what="dA")
    assert_close(B.grad, reference.B.grad, atol=0, rtol=2e-2, what="dB")
