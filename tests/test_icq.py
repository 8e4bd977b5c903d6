"""ICQ (IR-QLoRA's Information Calibration Quantization): NF4 levels and plain-NF4 codes against bitsandbytes, the
entropy guarantee over plain NF4, the dequantization against its definition, the storage format, config errors.
(LoRA gradients: tests/test_quant_gradients.py -k icq; plan == real bytes: tests/test_accounting.py -k icq.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qpeft_bench import ASSETS
from qpeft_bench.config import ConfigError
from qpeft_bench.quant import icq
from qpeft_bench.quant.qlinear import QuantLinear
from qpeft_bench.spec import validate


def _normal(out_f=64, in_f=256, seed=0):
    return 0.02 * torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


def _skewed(out_f=64, in_f=256, seed=0):
    # a heavy right tail (squared normals) on top of a normal body: the mass sits left of the block's centre
    g = torch.Generator().manual_seed(seed)
    return 0.02 * (torch.randn(out_f, in_f, generator=g) + 0.8 * torch.randn(out_f, in_f, generator=g) ** 2)


def _tiny_model_weights():
    from safetensors.torch import load_file

    tensors = load_file(str(ASSETS / "tiny_llama" / "model.safetensors"))
    # three shapes of the first block (q 256->256, v 256->128, down 768->256): more would only cost time
    return [tensors[f"model.layers.0.{n}.weight"] for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]


def _entropies(weight: torch.Tensor, cfg: icq.Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(ICQ's, plain NF4's) code entropy of every block of `weight`."""
    codes, _, _ = icq.quantize_weight(weight, cfg.blocksize, cfg.tau_range, cfg.tau_points, weight.dtype)
    blocks = weight.float().reshape(-1, cfg.blocksize)
    nf4_codes, _ = icq.encode(blocks, torch.zeros(blocks.shape[0]), icq.nf4_levels())
    return icq.block_entropy(codes.reshape(-1, cfg.blocksize)), icq.block_entropy(nf4_codes)


def test_nf4_levels_from_their_definition_equal_bitsandbytes_table():
    bf = pytest.importorskip("bitsandbytes.functional")
    levels = icq.nf4_levels()
    assert levels.shape == (icq.LEVELS,) and levels[0] == -1 and levels[-1] == 1 and (levels == 0).any()
    torch.testing.assert_close(levels, bf.get_4bit_type("nf4", device="cpu").float(), rtol=0, atol=1e-6)


def test_tau_zero_is_plain_nf4_as_bitsandbytes_codes_it():
    bf = pytest.importorskip("bitsandbytes.functional")
    w = _normal(8, 128, seed=3)
    packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    bnb_codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], dim=-1).reshape(-1, 64)  # high first
    blocks = w.reshape(-1, 64)
    codes, absmax = icq.encode(blocks, torch.zeros(blocks.shape[0]), icq.nf4_levels())
    assert torch.equal(codes, bnb_codes)
    torch.testing.assert_close(absmax, state.absmax.float())


@pytest.mark.parametrize("make", [_normal, _skewed], ids=["normal", "skewed"])
def test_icq_entropy_is_never_below_nf4_block_by_block(make):
    cfg = icq.Config()
    h_icq, h_nf4 = _entropies(make(), cfg)
    assert (h_icq >= h_nf4).all()
    assert h_icq.max() <= torch.log2(torch.tensor(float(icq.LEVELS)))  # at most 4 bits per code


def test_icq_entropy_on_the_tiny_models_real_weights():
    cfg = icq.Config()
    for weight in _tiny_model_weights():
        h_icq, h_nf4 = _entropies(weight, cfg)
        assert (h_icq >= h_nf4).all()
        assert h_icq.mean() > h_nf4.mean()  # the search finds more information somewhere in every layer


def test_icq_entropy_is_strictly_higher_on_skewed_weights():
    h_icq, h_nf4 = _entropies(_skewed(), icq.Config())
    assert (h_icq > h_nf4).float().mean() > 0.5  # most blocks gain, not a lucky few
    assert h_icq.mean() > h_nf4.mean() + 0.1  # bits per weight of information, on average


def test_chosen_tau_is_zero_or_on_the_grid_around_the_median():
    cfg = icq.Config(blocksize=32, tau_range=0.5, tau_points=11)
    w = _skewed(16, 128, seed=1)
    _, _, tau = icq.quantize_weight(w, cfg.blocksize, cfg.tau_range, cfg.tau_points, torch.float32)
    blocks = w.reshape(-1, cfg.blocksize)
    median, std = blocks.median(-1).values, blocks.std(-1, correction=0)
    grid = median.unsqueeze(-1) + torch.linspace(-1, 1, cfg.tau_points) * cfg.tau_range * std.unsqueeze(-1)
    on_grid = (tau.reshape(-1, 1) - grid).abs().amin(-1) <= 1e-7
    assert (on_grid | (tau.reshape(-1) == 0)).all()
    assert on_grid.any()  # on skewed weights the search does move off plain NF4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantization_equals_its_definition(dtype):
    cfg = icq.Config(blocksize=32)
    w = _skewed(24, 96, seed=2).to(dtype)
    bias = torch.randn(24, dtype=dtype)
    lin = torch.nn.Linear(96, 24, dtype=dtype)
    lin.weight.data, lin.bias.data = w.clone(), bias.clone()
    layer = icq.quantize_linear(lin, cfg, "float32", "cpu")
    assert isinstance(layer, QuantLinear) and (layer.in_features, layer.out_features) == (96, 24)
    assert layer.tau.dtype == dtype and layer.absmax.dtype == torch.float32 and layer.qweight.dtype == torch.uint8

    codes, absmax, tau = icq.quantize_weight(w, cfg.blocksize, cfg.tau_range, cfg.tau_points, dtype)
    levels = icq.nf4_levels()
    per_weight = lambda t: t.float().repeat_interleave(cfg.blocksize, dim=1)  # noqa: E731
    expected = levels[codes.long()] * per_weight(absmax) + per_weight(tau)
    assert torch.equal(layer.dequantize(), expected)
    assert torch.equal(icq.dequantize(layer), expected)

    # the codes are the nearest levels of (w - tau) / absmax(w - tau), with the tau that is stored
    shifted = w.float() - per_weight(tau)
    torch.testing.assert_close(absmax, shifted.reshape(-1, cfg.blocksize).abs().amax(-1).reshape(absmax.shape))
    x = shifted / per_weight(absmax)
    distance = (x.unsqueeze(-1) - levels).abs()
    assert (distance.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1) <= distance.amin(-1) + 1e-6).all()

    inputs = torch.randn(5, 96, dtype=dtype)
    torch.testing.assert_close(layer(inputs), F.linear(inputs, expected.to(dtype), bias))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64])
def test_storage_format_is_what_linear_storage_counts(dtype, bias, blocksize):
    from qpeft_bench.models import DTYPE

    in_f, out_f = 256, 48
    cfg = icq.Config(blocksize=blocksize, tau_points=3)
    lin = torch.nn.Linear(in_f, out_f, bias=bias, dtype=DTYPE[dtype])
    layer = icq.quantize_linear(lin, cfg, dtype, "cpu")
    real = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
    planned, outside = icq.linear_storage(in_f, out_f, bias, cfg, dtype)
    assert (real, 0) == (planned, outside) and icq.state_bytes(layer) == 0

    # bits per weight: 4-bit codes + an fp32 absmax and a tau in the model's dtype per block (+ the code book)
    elem = torch.tensor([], dtype=DTYPE[dtype]).element_size()
    bias_bytes = out_f * elem if bias else 0
    code_book = icq.LEVELS * torch.tensor([], dtype=torch.float32).element_size()
    bits = 8 * (planned - bias_bytes - code_book) / (in_f * out_f)
    assert bits == pytest.approx(icq.BITS + 8 * (4 + elem) / blocksize)


def test_config_errors_name_the_layer_sizes_and_knob():
    shapes = {"model.layers.0.mlp.down_proj": (768, 256), "model.layers.0.self_attn.q_proj": (256, 256)}
    icq.check_against_arch(icq.Config(blocksize=128), shapes)  # divides both
    with pytest.raises(ConfigError) as err:
        icq.check_against_arch(icq.Config(blocksize=96), shapes)
    assert "quant.blocksize=96 does not divide in_features=256 of model.layers.0.self_attn.q_proj" in str(err.value)
    with pytest.raises(ConfigError, match="tau grid empty"):
        icq.check_against_arch(icq.Config(tau_points=0), shapes)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["quant.blocksize=100"], "quant.blocksize=100 does not divide in_features=256 of model.layers.0"),
        (["quant.blocksize=33"], "quant.blocksize=33 must be a positive even number"),
        (["quant.tau_points=0"], "quant.tau_points=0 leaves the tau grid empty"),
        (["quant.tau_range=-0.1"], "quant.tau_range=-0.1 must be a finite number >= 0"),
    ],
)
def test_bad_icq_config_fails_before_any_model_is_loaded(compose, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(["quant=icq", *overrides]))
    assert message in str(err.value)
