"""GPTQ bit packing and zero-point formats, checked against GPTQModel's own packer."""

import pytest
import torch
from gptqmodel.nn_modules.qlinear.torch import TorchLinear

from peft_qalora.gptq import pack_int32, pack_qweight, pack_qzeros, unpack_int32, unpack_qweight, unpack_qzeros

BITS = (2, 3, 4, 8)


@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_gptqmodel(bits):
    in_features, out_features, group_size = 64, 96, 16
    maxq = (1 << bits) - 1
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, maxq + 1, (in_features, out_features), generator=generator)
    zeros = torch.randint(0, maxq + 1, (in_features // group_size, out_features), generator=generator)
    scales = torch.rand(in_features // group_size, out_features, generator=generator).half() + 0.5
    g_idx = (torch.arange(in_features) // group_size).to(torch.int32)
    # A dense weight whose round-to-nearest codes on these scales and zeros are exactly `codes`.
    weight = (scales[g_idx.long()].float() * (codes - zeros[g_idx.long()]).float()).t()
    reference = TorchLinear(
        bits=bits,
        group_size=group_size,
        sym=False,
        desc_act=False,
        in_features=in_features,
        out_features=out_features,
        bias=False,
    )
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = weight
    reference.pack_original(linear, scales.t().float(), zeros.t(), g_idx)  # gptqmodel packs zeros as z (v2)

    assert torch.equal(pack_qweight(codes, bits), reference.qweight)
    assert torch.equal(pack_qzeros(zeros, bits, "gptq_v2"), reference.qzeros)
    assert torch.equal(unpack_qweight(reference.qweight, bits, in_features), codes.to(torch.int32))
    assert torch.equal(unpack_qzeros(reference.qzeros, bits, out_features), zeros.to(torch.int32))


@pytest.mark.parametrize("bits", BITS)
def test_unpack_inverts_pack_with_padding(bits):
    codes = torch.randint(0, 1 << bits, (3, 64))
    words = pack_int32(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (3, 64 * bits // 32)
    assert torch.equal(unpack_int32(words, bits, 64), codes.to(torch.int32))
    assert torch.equal(unpack_int32(words, bits, 50), codes[:, :50].to(torch.int32))


@pytest.mark.parametrize("bits", BITS)
def test_v1_zeros_store_z_minus_one(bits):
    maxq = (1 << bits) - 1
    zeros = torch.randint(1, maxq + 1, (4, 32))
    v1 = pack_qzeros(zeros, bits, "gptq")
    assert torch.equal(unpack_int32(v1, bits, 32), (zeros - 1).to(torch.int32))
    assert torch.equal(unpack_qzeros(v1, bits, 32, "gptq"), zeros.to(torch.int32))
    with pytest.raises(ValueError, match=r"cannot hold zero points outside \[1, \d+\].*gptq_v2"):
        pack_qzeros(torch.zeros(4, 32, dtype=torch.int64), bits, "gptq")


def test_unknown_bits_and_formats():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_int32(torch.zeros(2, 32, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="Unknown GPTQ zero-point format"):
        pack_qzeros(torch.ones(1, 32, dtype=torch.int64), 4, "awq")
