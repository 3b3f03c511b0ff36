"""An independent dense reference for a QA-LoRA model.

It never calls the adapter's pooling: each projection is a plain fp32 linear layer whose weight is the
dequantized GPTQ weight (from the codes the test itself wrote) plus the group-constant delta expanded to every
input channel, ``dW[n, k] = scaling * (B @ A)[n, g_idx[k]] / count(g_idx[k])``, where ``count(g)`` is the number of
channels of group ``g`` (``group_size``, or fewer in a partial last group).
"""

import torch
from torch import nn


class ExpandedDeltaLinear(nn.Module):
    def __init__(self, weight, A, B, scaling, g_idx):
        super().__init__()
        self.register_buffer("weight", weight)
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(B.detach().clone())
        self.scaling = scaling
        self.register_buffer("g_idx", g_idx.long())
        # channels per group, counted here from the test's own g_idx
        self.register_buffer("channel_count", torch.bincount(self.g_idx).float()[self.g_idx])

    def forward(self, x):
        delta = self.scaling * (self.B @ self.A)[:, self.g_idx] / self.channel_count
        return nn.functional.linear(x, self.weight + delta)


def reference_model(synthetic, peft_model, adapter="default"):
    """The dense fp32 model equivalent to ``peft_model`` (a QA-LoRA model on ``synthetic``'s checkpoint).

    Returns the model and ``{layer_name: ExpandedDeltaLinear}`` to read gradients from.
    """
    config = peft_model.peft_config[adapter]
    scaling = config.lora_alpha / config.r
    model = synthetic.dense_model()
    replaced = {}
    for name, layer in synthetic.layers.items():
        adapted = peft_model.get_base_model().get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        module = ExpandedDeltaLinear(
            layer.dequantize(),
            adapted.qalora_A[adapter].weight,
            adapted.qalora_B[adapter].weight,
            scaling,
            layer.g_idx,
        )
        setattr(model.get_submodule(parent_name), child, module)
        replaced[name] = module
    return model, replaced


def loss_of(logits, input_ids):
    """Next-token cross entropy, written here rather than taken from transformers."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def assert_trains_like_reference(synthetic, peft_model, input_ids):
    """``peft_model``'s logits and adapter gradients equal the dense reference's; returns the reference logits."""
    reference, ref_layers = reference_model(synthetic, peft_model)
    logits = peft_model(input_ids).logits
    ref_logits = reference(input_ids).logits
    assert_close(logits, ref_logits, atol=1e-4, what="logits")
    loss_of(logits, input_ids).backward()
    loss_of(ref_logits, input_ids).backward()
    for name, ref in ref_layers.items():
        layer = peft_model.get_base_model().get_submodule(name)
        assert_close(layer.qalora_A["default"].weight.grad, ref.A.grad, atol=1e-6, rtol=1e-4, what=f"{name} dA")
        assert_close(layer.qalora_B["default"].weight.grad, ref.B.grad, atol=1e-6, rtol=1e-4, what=f"{name} dB")
    return ref_logits.detach()


def assert_close(actual, expected, atol, rtol=0.0, what=""):
    diff = (actual - expected).abs().max().item()
    bound = atol + rtol * expected.abs().max().item()
    assert diff <= bound, f"{what}: max abs difference {diff:.3g} > {bound:.3g}"
