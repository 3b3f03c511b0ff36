"""One-row decoding through torch's int4 matmul (kernels/int4_tinygemm.py).

The operands run through the CPU build of the same kernel (``_weight_int4pack_mm_for_cpu``, same formula and
``(scale, offset)`` layout; only the code packing differs, and the CUDA packing is checked on a GPU). References are
built from the test's own codes, scales and zeros in fp64, never from the package's dequantize.
"""

import pytest
import torch

from peft_qalora import FloatZeroGPTQLinear
from peft_qalora.gptq import pack_qweight
from peft_qalora.kernels import int4_tinygemm
from peft_qalora.kernels.int4_tinygemm import (
    set_tinygemm,
    tinygemm_keeps_shift,
    tinygemm_matmul,
    tinygemm_offset_error,
    tinygemm_supported,
)

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="torch has no CPU int4 matmul"
)


def merged_layer(in_features=256, out_features=64, group_size=32, zero_points=None, shift=0.01, seed=0):
    """A merged 4-bit layer: integer zeros (8: a symmetric base) minus an adapter's small real shift."""
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    codes = torch.randint(0, 16, (in_features, out_features), generator=generator)
    scales = (torch.rand(groups, out_features, generator=generator) * 0.02 + 0.001).half()
    base_zeros = torch.full((groups, out_features), 8.0) if zero_points is None else zero_points.float()
    zeros = base_zeros - shift * torch.randn(groups, out_features, generator=generator)
    layer = FloatZeroGPTQLinear(4, group_size, in_features, out_features)
    layer.qweight, layer.scales, layer.zeros = pack_qweight(codes, 4), scales, zeros
    layer.g_idx = (torch.arange(in_features) // group_size).int()
    g = torch.arange(in_features) // group_size
    return layer, codes, scales, zeros, g


def inputs(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """bf16 activations from their own generator: the bounds below must not depend on the tests run before."""
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)).bfloat16()


def test_tinygemm_matches_fp64_reference_of_its_arithmetic():
    """Output = x @ ((q - 8) * bf16(s) + bf16(s (8 - z'))) up to output rounding; the exact weight within bf16's."""
    layer, codes, scales, zeros, g = merged_layer()
    s = scales.double()
    tinygemm_weight = (codes.double() - 8) * s.bfloat16().double()[g] + (s * (8 - zeros.double())).bfloat16().double()[
        g
    ]
    exact_weight = (codes.double() - zeros.double()[g]) * s[g]
    for rows in (1, 3):
        x = inputs(rows, 256)
        out = tinygemm_matmul(layer, x)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 64)
        magnitude = x.double().abs() @ exact_weight.abs()
        # each weight rounds to bf16 once in the kernel's multiply-add, then the output rounds
        own = x.double() @ tinygemm_weight
        assert ((out.double() - own).abs() <= 2.0**-8 * own.abs() + 2.0**-8 * magnitude).all()
        exact = x.double() @ exact_weight
        assert (out.double() - exact).norm() / exact.norm() < 4e-3  # bf16 rounding of scale, weight and output


def test_tinygemm_keeps_the_adapter_shift():
    """The adapter's shift survives: nearer the merged layer's exact output than the base's output."""
    # a shift large enough that its effect on the outputs stands well above their bf16 rounding
    layer, codes, scales, zeros, g = merged_layer(in_features=1024, out_features=128, group_size=128, shift=0.2)
    x = inputs(8, 1024)
    out = tinygemm_matmul(layer, x).double()
    exact = x.double() @ ((codes.double() - zeros.double()[g]) * scales.double()[g])
    base = x.double() @ ((codes.double() - 8) * scales.double()[g])
    assert (out - exact).norm() < 0.25 * (base - exact).norm()


def test_offset_check_takes_symmetric_bases_and_refuses_others():
    """bf16 offsets keep a symmetric base's merge (2^-8 of the shift); other integer zeros lose more than a shift."""
    for shift in (0.01, 0.1):  # a trained adapter's size, and ten times it (still under half a step)
        symmetric, _, scales, zeros, _ = merged_layer(shift=shift)
        shift_steps = (8 - zeros.double()).abs()
        assert tinygemm_keeps_shift(symmetric)
        offsets = scales.double() * (8 - zeros.double())
        rounded = offsets.bfloat16().double()
        assert ((rounded - offsets).abs() / scales.double() <= 2.0**-8 * shift_steps + 1e-12).all()
        # the package's own measure of that rounding agrees with this fp64 reference
        assert abs(tinygemm_offset_error(symmetric) - float(((rounded - offsets).abs() / scales.double()).max())) < 1e-7
    zero_points = torch.randint(3, 13, (8, 64), generator=torch.Generator().manual_seed(1))
    asymmetric, *_ = merged_layer(zero_points=zero_points)
    assert not tinygemm_keeps_shift(asymmetric)
    assert tinygemm_offset_error(asymmetric) > 1e-3  # ten times a small trained shift's 0.4%
    assert int4_tinygemm._layout_fits(symmetric)
    act_order, *_ = merged_layer()
    act_order.g_idx = act_order.g_idx[torch.randperm(256)]
    assert not int4_tinygemm._layout_fits(act_order)
    odd_groups, *_ = merged_layer(in_features=288, group_size=48)
    assert not int4_tinygemm._layout_fits(odd_groups)


def test_tinygemm_is_off_by_default_and_never_takes_cpu_inputs():
    layer, *_ = merged_layer()
    x = inputs(1, 256)
    assert not int4_tinygemm._ENABLED
    try:
        set_tinygemm(True)
        assert not tinygemm_supported(layer, x)  # CUDA only: the CPU keeps its own paths
    finally:
        set_tinygemm(False)


def test_operands_follow_new_zeros():
    """The cached operands are rebuilt when the zeros are reassigned (a merge or unmerge on the same layer)."""
    layer, codes, scales, zeros, g = merged_layer()
    x = inputs(1, 256)
    before = tinygemm_matmul(layer, x)
    assert "tinygemm" in layer._kernel_cache
    layer.zeros = zeros + 0.5
    after = tinygemm_matmul(layer, x).double()
    exact = x.double() @ ((codes.double() - zeros.double()[g] - 0.5) * scales.double()[g])
    assert (after - exact).norm() / exact.norm() < 4e-3
    assert not torch.equal(before, after.bfloat16())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_tinygemm_on_cuda_through_the_layer():
    """On CUDA, with tinygemm on: one bf16 row of a symmetric merge runs it and matches fp64; others do not take it."""
    layer, codes, scales, zeros, g = merged_layer(in_features=1024, out_features=256, group_size=128)
    zero_points = torch.randint(3, 13, (8, 256), generator=torch.Generator().manual_seed(1))
    asymmetric, *_ = merged_layer(in_features=1024, out_features=256, group_size=128, zero_points=zero_points)
    layer, asymmetric = layer.cuda(), asymmetric.cuda()
    exact_weight = (codes.double() - zeros.double()[g]) * scales.double()[g]
    x = inputs(1, 1024).cuda()
    try:
        set_tinygemm(True)
        out = layer(x)
        assert "tinygemm" in layer._kernel_cache
        exact = x.double().cpu() @ exact_weight
        assert (out.double().cpu() - exact).norm() / exact.norm() < 4e-3
        asymmetric(x)
        assert asymmetric._kernel_cache.get("tinygemm_fits") is False and "tinygemm" not in asymmetric._kernel_cache
        layer(inputs(2, 1024).cuda())  # two rows: the fused kernel
    finally:
        set_tinygemm(False)
