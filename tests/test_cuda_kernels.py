"""The CUDA fast paths (src/peft_qalora/kernels), checked on CPU: Triton's interpreter runs the kernel itself."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from peft_qalora.kernels.gptq_cuda import _HAS_TRITON, _DequantMatmul

pytestmark = pytest.mark.skipif(not _HAS_TRITON, reason="Triton is not installed")


def test_float_zero_dequantize_kernel_matches_reference():
    """The merged layer's Triton dequantize equals ``s * (q - z')`` from the test's own codes, for 2/4/8 bits."""
    script = textwrap.dedent(
        """
        import os, types
        import torch
        from peft_qalora.gptq import pack_qweight
        from peft_qalora.kernels import dequantize_float_zeros

        torch.manual_seed(0)
        for bits in (2, 4, 8):
            K, N, group_size = 256, 192, 64
            codes = torch.randint(0, 2**bits, (K, N))
            scales = (torch.rand(K // group_size, N) + 0.01).half()
            zeros = torch.rand(K // group_size, N) * 2**bits  # real-valued, as after a merge
            layer = types.SimpleNamespace(
                in_features=K, out_features=N, bits=bits, group_size=group_size, qweight=pack_qweight(codes, bits),
                scales=scales, zeros=zeros,
            )
            g = torch.arange(K) // group_size
            reference = (codes.double() - zeros.double()[g]) * scales.double()[g]
            for dtype in (torch.float32, torch.bfloat16):
                weight = dequantize_float_zeros(layer, dtype)
                # fp32 arithmetic, then one conversion to dtype: within one ulp of dtype of the exact value (the
                # interpreter may truncate where the GPU rounds)
                bound = reference.abs() * (2**-22 if dtype == torch.float32 else 2**-7) + 1e-6
                assert ((weight.double() - reference).abs() <= bound).all(), (bits, dtype)
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "TORCHDYNAMO_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_dequantize_again_backward_matches_dense_matmul():
    """The recompute path's autograd function: same output and input gradient as ``x @ W`` with W kept."""
    torch.manual_seed(0)
    weight = torch.randn(64, 48, dtype=torch.float64)
    calls = []

    def dequant():
        calls.append(1)
        return weight

    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    dense = x.detach().clone().requires_grad_()
    grad = torch.randn(5, 48, dtype=torch.float64)
    out = _DequantMatmul.apply(x, dequant)
    out.backward(grad)
    (dense @ weight).backward(grad)
    assert torch.equal(out, dense.detach() @ weight)
    assert torch.allclose(x.grad, dense.grad, rtol=0, atol=1e-12)
    assert len(calls) == 2  # dequantized in the forward and again in the backward, never saved
