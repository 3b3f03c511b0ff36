"""Shared fixtures: tiny GPTQ checkpoints written by the tests themselves, loaded through transformers."""

import os

# Set before torch is imported: eager kernels are faster than compiling them for tiny models, and tests never
# reach the Hub.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import peft_qalora  # noqa: E402,F401  (registers QALORA)
from peft_qalora.testing import write_gptq_checkpoint  # noqa: E402

torch.manual_seed(0)


@pytest.fixture(scope="session")
def gptq_checkpoint(tmp_path_factory):
    """``gptq_checkpoint(bits=4, group_size=32, act_order=False, sym=True, checkpoint_format="gptq", seed=0)``.

    Writes (once per argument set) a tiny random Llama quantized to GPTQ and returns its ``SyntheticGPTQ``.
    """
    cache = {}

    def make(**kwargs):
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in cache:
            path = tmp_path_factory.mktemp("gptq")
            cache[key] = write_gptq_checkpoint(path, **kwargs)
        return cache[key]

    return make


def load_gptq(path, backend=None, dtype=torch.float32):
    """Load a GPTQ checkpoint the way users do: ``AutoModelForCausalLM.from_pretrained`` (optimum + gptqmodel)."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    kwargs = {}
    if backend is not None:
        import json

        with open(os.path.join(path, "config.json")) as f:
            bits = json.load(f)["quantization_config"]["bits"]
        kwargs["quantization_config"] = GPTQConfig(bits=bits, backend=backend)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)


@pytest.fixture
def input_ids():
    return torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(1))
