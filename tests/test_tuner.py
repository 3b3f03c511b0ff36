"""QA-LoRA on real GPTQ models loaded through transformers: forward and gradients against a dense reference."""

import itertools

import pytest
import torch
from conftest import load_gptq
from peft import get_peft_model
from reference import assert_close, assert_trains_like_reference, loss_of

from peft_qalora import QALoraConfig, QALoraLinear

COMBINATIONS = list(itertools.product((2, 3, 4, 8), (False, True), (True, False), ("gptq", "gptq_v2")))


def adapted(model, **kwargs):
    config = QALoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kwargs)
    return get_peft_model(model, config)


@pytest.mark.parametrize("bits,act_order,sym,checkpoint_format", COMBINATIONS)
def test_logits_and_gradients_match_dense_reference(
    gptq_checkpoint, input_ids, bits, act_order, sym, checkpoint_format
):
    synthetic = gptq_checkpoint(bits=bits, act_order=act_order, sym=sym, checkpoint_format=checkpoint_format)
    model = adapted(load_gptq(synthetic.path))
    assert all(type(m).__name__ != "Linear" or "lm_head" in n for n, m in model.named_modules() if "qalora_" not in n)
    assert_trains_like_reference(synthetic, model, input_ids)


@pytest.mark.parametrize("backend", [None, "gptq_torch"])
def test_every_gptq_layer_but_the_head_is_adapted(gptq_checkpoint, backend):
    synthetic = gptq_checkpoint(bits=4)
    model = adapted(load_gptq(synthetic.path, backend=backend))
    wrapped = {n for n, m in model.get_base_model().named_modules() if isinstance(m, QALoraLinear)}
    assert wrapped == set(synthetic.layers)
    layer = model.get_base_model().get_submodule("model.layers.0.self_attn.q_proj")
    groups = 128 // 32
    assert layer.qalora_A["default"].weight.shape == (4, groups)
    assert layer.qalora_B["default"].weight.shape == (128, 4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("qalora_A" in n or "qalora_B" in n for n in trainable)


def test_default_targets_for_llama(gptq_checkpoint):
    model = get_peft_model(load_gptq(gptq_checkpoint(bits=4).path), QALoraConfig(r=2))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, QALoraLinear)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_fresh_adapter_is_a_no_op(gptq_checkpoint, input_ids):
    synthetic = gptq_checkpoint(bits=4, act_order=True)
    base = load_gptq(synthetic.path)
    with torch.no_grad():
        before = base(input_ids).logits
    model = get_peft_model(base, QALoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, before)


def test_patterns_dropout_and_rslora(gptq_checkpoint, input_ids):
    synthetic = gptq_checkpoint(bits=4)
    config = QALoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=[1],
        rank_pattern={"v_proj": 2},
        use_rslora=True,
        lora_dropout=0.5,
    )
    # Trains with layers left unadapted: an inference-only default kernel would refuse that (tests/test_kernels.py).
    model = get_peft_model(load_gptq(synthetic.path, backend="gptq_torch"), config)
    wrapped = {n for n, m in model.get_base_model().named_modules() if isinstance(m, QALoraLinear)}
    assert wrapped == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    v_proj = model.get_base_model().get_submodule("model.layers.1.self_attn.v_proj")
    assert v_proj.r["default"] == 2 and v_proj.scaling["default"] == pytest.approx(8 / 2**0.5)
    torch.nn.init.normal_(v_proj.qalora_B["default"].weight)
    model.train()
    assert not torch.equal(model(input_ids).logits, model(input_ids).logits)  # dropout is active
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, model(input_ids).logits)


def test_gradient_checkpointing_gives_the_same_gradients(gptq_checkpoint, input_ids):
    synthetic = gptq_checkpoint(bits=4, act_order=True)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        base = load_gptq(synthetic.path)
        if checkpointing:
            # The QLoRA recipe: checkpointing (reentrant) and input gradients enabled before the adapter is added.
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model = adapted(base)
        model.train()
        loss_of(model(input_ids).logits, input_ids).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, what=name)
