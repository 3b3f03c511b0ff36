"""Every GPTQ kernel GPTQModel offers on the machine: QA-LoRA trains exactly through it, or refuses it up front.

``from_pretrained`` picks the kernel by machine (on x86 CPUs ``TorchCpuAvx512Linear``, inference-only, where the CPU has
AVX-512 BF16, else ``TorchAtenLinear``; on NVIDIA GPUs Marlin), so these tests name each kernel, and the default, and
check behaviour against the dense reference, never a class name. A kernel the machine cannot run is skipped with
GPTQModel's reason.
"""

import pytest
import torch
from conftest import load_gptq
from peft import get_peft_model
from reference import assert_close, assert_trains_like_reference, loss_of, reference_model

from peft_qalora import QALoraConfig, QALoraLinear
from peft_qalora.gptq_kernels import gptq_layout_problem

DEFAULT = None  # what from_pretrained picks on this machine
CPU_KERNELS = [DEFAULT, "auto_trainable", "gptq_torch", "gptq_torch_aten", "gptq_torch_fused", "gptq_torch_cpu_avx512"]
NEEDS_CPU_FEATURES = {"gptq_torch_cpu_avx512"}  # AVX-512 BF16


def load_kernel(path, backend, dtype=torch.float32):
    try:
        return load_gptq(path, backend=backend, dtype=dtype)
    except ValueError as exc:  # GPTQModel refuses a kernel the machine cannot run, at load
        if backend not in NEEDS_CPU_FEATURES:
            raise
        pytest.skip(f"GPTQModel has no {backend} kernel on this machine: {exc}")


def config(**kwargs):
    return QALoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kwargs)


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_training_through_each_kernel_matches_the_dense_reference(gptq_checkpoint, input_ids, backend):
    synthetic = gptq_checkpoint(bits=4, act_order=True, sym=False)
    model = get_peft_model(load_kernel(synthetic.path, backend), config())
    model.eval()
    with torch.no_grad():
        model(input_ids)  # an evaluation step first: kernels with a one-way inference switch would take it here
    model.train()  # GPTQModel's inference-only kernels raise here unless QA-LoRA keeps them out of it
    ref_logits = assert_trains_like_reference(synthetic, model, input_ids)

    merged = model.merge_and_unload()
    with torch.no_grad():
        assert_close(merged(input_ids).logits, ref_logits, atol=1e-4, what="merged logits")


def _grads(model, input_ids):
    model.train()
    model.zero_grad()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_eval_in_bf16_during_training_keeps_gradients_exact(gptq_checkpoint, input_ids, backend):
    """TorchAtenLinear, TorchCpuAvx512Linear and TorchFusedLinear repack for good on an eval forward; not here."""
    synthetic = gptq_checkpoint(bits=4)
    grads = []
    for evaluate_first in (False, True):
        base = load_kernel(synthetic.path, backend, dtype=torch.bfloat16)
        torch.manual_seed(0)
        model = get_peft_model(base, config())
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids)  # an evaluation step, as Trainer.evaluate() runs it
        grads.append(_grads(model, input_ids))
        q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        assert gptq_layout_problem(q_proj) is None
    first_layer_A = "base_model.model.model.layers.0.self_attn.q_proj.qalora_A.default.weight"
    assert grads[1][first_layer_A].abs().sum() > 0
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[1][name], grads[0][name]), name

    unloaded = model.unload()
    assert getattr(unloaded.model.layers[0].self_attn.q_proj, "linear_mode", None) is None  # its own choice again


REPACKING_ON_FIRST_EVAL = [
    ("gptq_torch_aten", torch.bfloat16),
    ("gptq_torch_fused", torch.float32),
    ("gptq_torch_cpu_avx512", torch.bfloat16),
]


@pytest.mark.parametrize("backend,dtype", REPACKING_ON_FIRST_EVAL)
def test_a_kernel_that_repacked_its_weights_is_refused(gptq_checkpoint, input_ids, backend, dtype):
    base = load_kernel(gptq_checkpoint(bits=4).path, backend, dtype=dtype).eval()
    with torch.no_grad():
        base(input_ids)  # inference before the adapter exists: the kernel repacks its GPTQ tensors
    assert gptq_layout_problem(base.model.layers[0].self_attn.q_proj) is not None
    refusal = r"nothing was changed(.|\n)*repacked the weights(.|\n)*backend=\"auto_trainable\""
    with pytest.raises(ValueError, match=refusal):
        get_peft_model(base, config())
    assert not any(isinstance(m, QALoraLinear) for m in base.modules())


def test_unadapted_layers_on_an_inference_only_kernel(gptq_checkpoint):
    """Adapted layers train on any kernel; ``model.train()`` also reaches the others, which GPTQModel refuses there."""
    path = gptq_checkpoint(bits=4).path
    partial = QALoraConfig(r=4, target_modules=["q_proj"])
    base = load_kernel(path, "gptq_torch_cpu_avx512")
    with pytest.raises(ValueError, match=r"k_proj \(TorchCpuAvx512Linear\)(.|\n)*backend=\"auto_trainable\""):
        get_peft_model(base, partial)
    assert not any(isinstance(m, QALoraLinear) for m in base.modules())
    # For inference nothing calls train(): the same adapter loads.
    model = get_peft_model(base, QALoraConfig(r=4, target_modules=["q_proj"], inference_mode=True))
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj, QALoraLinear)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Marlin and Triton kernels need an NVIDIA GPU")
def test_cuda_kernels(gptq_checkpoint, input_ids):
    """Marlin repacks at load: refused before anything changes. Triton and torch kernels train exactly."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    def load_cuda(backend, dtype):
        quantization = GPTQConfig(bits=4, backend=backend)
        return AutoModelForCausalLM.from_pretrained(
            synthetic.path, dtype=dtype, quantization_config=quantization, device_map="cuda"
        )

    synthetic = gptq_checkpoint(bits=4, act_order=False, sym=True)
    marlin = load_cuda("gptq_marlin", torch.float16)
    with pytest.raises(ValueError, match=r"MarlinLinear repacks the GPTQ weights at load(.|\n)*auto_trainable"):
        get_peft_model(marlin, config())
    assert not any(isinstance(m, QALoraLinear) for m in marlin.modules())
    for backend in ("gptq_triton", "gptq_torch"):
        model = get_peft_model(load_cuda(backend, torch.float32), config())
        model.train()
        reference, ref_layers = reference_model(synthetic, model)
        ids = input_ids.cuda()
        logits = model(ids).logits
        ref_logits = reference.cuda()(ids).logits
        assert_close(logits, ref_logits, atol=1e-3, what=f"{backend} logits")
        loss_of(logits, ids).backward()
        loss_of(ref_logits, ids).backward()
        for name, ref in ref_layers.items():
            layer = model.get_base_model().get_submodule(name)
            assert_close(layer.qalora_A["default"].weight.grad, ref.A.grad, atol=1e-5, rtol=1e-3, what=f"{name} dA")
