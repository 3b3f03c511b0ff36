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


def assert_close(actual, expected, atol, rtol=0.0, what=""):
    diff = (actual - expected).abs().max().item()
    bound = atol + rtol * expected.abs().max().item()
    assert diff <= bound, f"{what}: max abs difference {diff:.3g} > {bound:.3g}"
