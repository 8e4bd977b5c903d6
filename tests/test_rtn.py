"""Our own group-wise integer format: packing, and RTN's rounding error against its definition."""

from __future__ import annotations

import pytest
import torch

from qpeft_bench.quant import rtn
from qpeft_bench.quant.qlinear import GroupQuantLinear, pack, unpack


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (6, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (6, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rtn_error_is_bounded_by_the_group_step(bits, symmetric):
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    codes, scale, zero = rtn.quantize_weight(w, bits, 64, symmetric)
    layer = GroupQuantLinear(256, 16, bits, 64, None, codes, scale, zero)
    err = (layer.dequantize() - w).abs().reshape(16, 4, 64)
    # round-to-nearest on a grid of step `scale`: at most half a step inside the range, one step at a clamped end
    assert (err <= scale.unsqueeze(-1) * (1.0 + 1e-5)).all()
    assert err.mean() < 0.5 * scale.mean()
    assert int(codes.max()) <= 2**bits - 1


def test_rtn_error_falls_with_bits():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))

    def rel_error(bits):
        codes, scale, zero = rtn.quantize_weight(w, bits, 64, False)
        return float((GroupQuantLinear(256, 32, bits, 64, None, codes, scale, zero).dequantize() - w).norm() / w.norm())

    e2, e4, e8 = rel_error(2), rel_error(4), rel_error(8)
    assert e8 < e4 < e2 < 1
    assert e8 < 0.01
