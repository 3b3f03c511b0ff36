"""Training: transformers.Trainer lowers the loss; no GPTQ kernel can make us train on a wrong gradient."""

import pytest
import torch
from conftest import load_gptq
from peft import get_peft_model
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


def _grads(model, input_ids):
    model.train()
    model.zero_grad()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_eval_in_bf16_during_training_keeps_gradients_exact(gptq_checkpoint, input_ids):
    """TorchAtenLinear switches for good to a no-grad kernel on its first bf16 eval forward; we pin it first."""
    synthetic = gptq_checkpoint(bits=4)
    config = QALoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    grads = []
    for evaluate_first in (False, True):
        base = load_gptq(synthetic.path, dtype=torch.bfloat16)
        torch.manual_seed(0)
        model = get_peft_model(base, config)
        q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        assert type(q_proj).__name__ == "TorchAtenLinear"
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids)  # an evaluation step, as Trainer.evaluate() runs it
            assert q_proj.linear_mode == "train"
        grads.append(_grads(model, input_ids))
    first_layer_A = "base_model.model.model.layers.0.self_attn.q_proj.qalora_A.default.weight"
    assert grads[1][first_layer_A].abs().sum() > 0
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[1][name], grads[0][name]), name

    unloaded = model.unload()
    assert unloaded.model.layers[0].self_attn.q_proj.linear_mode is None  # the kernel may pick its fast path again


def test_training_through_an_inference_only_kernel_raises(gptq_checkpoint, input_ids):
    synthetic = gptq_checkpoint(bits=4)
    base = load_gptq(synthetic.path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        base(input_ids)  # switches TorchAtenLinear to its inference-only kernel before the adapter exists
    assert base.model.layers[0].self_attn.q_proj.linear_mode == "inference"
    model = get_peft_model(base, QALoraConfig(r=4, target_modules="all-linear"))
    model.train()
    with pytest.raises(RuntimeError, match=r"inference-only path.*backend=\"gptq_torch\""):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
