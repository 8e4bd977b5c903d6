"""ICQ (IR-QLoRA's Information Calibration Quantization).

The defaults are pinned against an independent restatement of the authors' code (htqin/IR-QLoRA, utils.py:
`search`, `nf4_quant`, `evaluate_entropy`, `IRQLoraLinear4bit.forward`) written here the way that code computes:
every candidate codes every weight, the entropy is counted code by code as a (16, blocks, 1) tensor, the absmax
double quantization follows bitsandbytes' kernel (binary search in the dynamic map) element by element in Python.
Our implementation sorts each block once and counts codes by searchsorted instead; the two must agree bit for bit.
The opt-in knobs (`tau_grid=median_std`, `double_quant=false`, `tau_8bit=false`) are pinned against a restatement
of our earlier search. Also: NF4 and dynamic-map tables against bitsandbytes, storage bytes == linear_storage,
config errors. (LoRA gradients: tests/test_quant_gradients.py -k icq; plan == real bytes:
tests/test_accounting.py -k icq.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qpeft_bench import ASSETS
from qpeft_bench.config import ConfigError
from qpeft_bench.quant import icq
from qpeft_bench.quant.qlinear import QuantLinear
from qpeft_bench.spec import validate

bf = pytest.importorskip("bitsandbytes.functional")

OLD = {"tau_grid": "median_std", "double_quant": False, "tau_8bit": False}


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


# ---------------------------------------------------------------- the reference, restated


def _nf4_table():
    return bf.get_4bit_type("nf4", device="cpu").float()


def _nf4_decision_points():
    # bitsandbytes' NF4 decision tree compares x with the fp32 midpoints of neighbouring levels
    table = _nf4_table().tolist()
    return torch.tensor([(a + b) / 2 for a, b in zip(table[:-1], table[1:], strict=True)], dtype=torch.float32)


def _bnb_nf4(shifted):
    """bitsandbytes' kQuantizeBlockwise(NF4) on rows of 64: x = value * (1 / absmax), code = #midpoints below x."""
    shifted = shifted.float()
    absmax = shifted.abs().max(dim=1, keepdim=True)[0]
    x = shifted * (1.0 / absmax)
    return (x.unsqueeze(-1) > _nf4_decision_points()).sum(-1), absmax.squeeze(1)


def _evaluate_entropy(codes, blocksize):
    """evaluate_entropy: counts of each of the 16 values as a (16, blocks, 1) tensor, fp32 frequencies, NaN -> 0."""
    values = torch.arange(16).reshape(16, 1, 1)
    freqs = (codes.reshape(1, -1, blocksize).repeat(16, 1, 1) == values).sum(dim=-1, keepdim=True) / blocksize
    entropy = -freqs * torch.log2(freqs)
    return torch.where(torch.isnan(entropy), 0, entropy).sum(dim=0)


def _sigma():
    # scipy's norm.ppf of the fp32 probability, as `sigma` in utils.py (scipy evaluates a float32 array in fp32)
    from scipy.stats import norm

    return 1 / norm.ppf(torch.linspace(0.9677083, 0.5, 9)[:-1]).tolist()[0]


def _reference_search(w, tau_range, tau_points, blocksize=64):
    """utils.py `search`: f over np.linspace(+-tau_range*sigma), tau = f * absmax(w - median) + median, ties keep
    the first; then the final coding with the fp32 tau. Returns codes, absmax (fp32), tau (fp32), f."""
    blocks = w.reshape(-1, blocksize)
    tau0 = blocks.median(1, keepdim=True)[0]
    spread = (blocks - tau0).abs().max(1, keepdim=True)[0]
    best_e = best_f = None
    for f in np.linspace(-tau_range * _sigma(), tau_range * _sigma(), tau_points):
        codes, _ = _bnb_nf4(blocks - (f * spread + tau0))  # np.float64 times a tensor: the tensor's dtype
        e = _evaluate_entropy(codes, blocksize)
        if best_e is None:
            best_e, best_f = e, torch.full_like(e, f)
        else:
            best_f = torch.where(e > best_e, f, best_f)
            best_e = torch.max(best_e, e)
    tau = best_f * spread + tau0
    codes, absmax = _bnb_nf4(blocks - tau)
    return codes.to(torch.uint8), absmax, tau.squeeze(1), best_f.squeeze(1)


def _kernel_quantize_8bit(x, table):
    """bitsandbytes' dQuantize<0>: binary search from pivot 127 over the sorted 256 values, then the midpoint
    between the last pivot and its bracket; one Python float at a time."""
    pivot, lower_pivot, upper_pivot, lower, upper = 127, 0, 255, -1.0, 1.0
    val = table[pivot]
    step = 64
    while step > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + step
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - step
        val = table[pivot]
        step //= 2
    if upper_pivot == 255:
        upper = table[255]
    if lower_pivot == 0:
        lower = table[0]
    f32 = lambda v: float(np.float32(v))  # noqa: E731  (the kernel's midpoints are fp32 sums times 0.5f)
    if x > val:
        return upper_pivot if x > f32(f32(upper + val) * 0.5) else pivot
    return lower_pivot if x < f32(f32(lower + val) * 0.5) else pivot


def _reference_storage(absmax, tau):
    """bitsandbytes' quantize_4bit(compress_statistics=True) for the absmax, utils.py nf4_quant for tau."""
    table = bf.create_dynamic_map()
    offset = absmax.mean()
    centred = absmax - offset
    q_absmax, scale_absmax = [], []
    for g in range(0, centred.shape[0], 256):
        part = centred[g : g + 256]
        m = part.abs().max()
        scale_absmax.append(m)
        inv = 1.0 / m
        q_absmax += [_kernel_quantize_8bit(float(v), table.tolist()) for v in (part * inv)]
    tau_scale = tau.reshape(-1, 256).abs().max(dim=1, keepdim=True)[0]
    x = (tau.reshape(-1, 256) / tau_scale).reshape(-1, 1)
    q_tau = torch.argmin((x - table.reshape(1, -1)).abs(), dim=-1)
    return (
        torch.tensor(q_absmax, dtype=torch.uint8),
        torch.stack(scale_absmax),
        offset,
        q_tau.to(torch.uint8),
        tau_scale.squeeze(1),
    )


def _reference_forward_weight(codes, absmax, tau, compute_dtype):
    """IRQLoraLinear4bit.forward: dequantize_4bit (fp32 level * absmax) cast to the compute dtype, + tau in fp32,
    cast again."""
    nf4 = (_nf4_table()[codes.long()] * absmax.unsqueeze(-1)).to(compute_dtype)
    return (nf4.float() + tau.unsqueeze(-1)).to(compute_dtype)


# ---------------------------------------------------------------- tables


def test_tables_equal_bitsandbytes():
    assert torch.equal(icq.nf4_levels(), _nf4_table())
    assert torch.equal(icq.dynamic_map(), bf.create_dynamic_map())
    assert torch.equal(icq.nf4_thresholds(icq.nf4_levels()), _nf4_decision_points())


def test_sigma_is_the_references():
    pytest.importorskip("scipy")
    assert icq._sigma() == _sigma()


def test_tau_zero_is_plain_nf4_as_bitsandbytes_codes_it():
    w = _normal(8, 128, seed=3)
    packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    bnb_codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], dim=-1).reshape(-1, 64)  # high first
    codes, absmax = icq.nf4_codes(w.reshape(-1, 64), icq.nf4_thresholds(icq.nf4_levels()))
    assert torch.equal(codes, bnb_codes)
    assert torch.equal(absmax, state.absmax.float())


# ---------------------------------------------------------------- the reference search and storage, bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "make, shape, points",
    [(_normal, (32, 512), 21), (_skewed, (64, 512), 21), (_skewed, (16, 1024), 201)],
    ids=["normal-1group", "skewed-2groups", "skewed-201points"],
)
def test_reference_search_and_storage_match_the_restatement(make, shape, points, dtype):
    pytest.importorskip("scipy")
    w = make(*shape, seed=5).to(dtype)
    codes, absmax, tau, f = _reference_search(w, 0.1, points)
    q_a, s_a, off, q_t, s_t = _reference_storage(absmax, tau)

    cfg = icq.Config(tau_points=points)
    best_f, _, _ = icq.search_factor(w.reshape(-1, 64), 0.1, points, icq.nf4_thresholds(icq.nf4_levels()))
    assert torch.equal(best_f, f)
    stored = icq.quantize_weight(w, cfg)
    blocks = (shape[0], shape[1] // 64)
    assert torch.equal(stored["qweight"], codes.reshape(shape))
    assert torch.equal(stored["absmax_code"], q_a.reshape(blocks))
    assert torch.equal(stored["absmax_scale"], s_a) and torch.equal(stored["absmax_offset"], off.reshape(1))
    assert torch.equal(stored["tau_code"], q_t.reshape(blocks)) and torch.equal(stored["tau_scale"], s_t)
    assert (tau != 0).all()  # the reference never tries tau = 0

    # the layer computes with what the stored format gives, rounded as the reference's forward rounds it
    absmax_hat = bf.create_dynamic_map()[q_a.long()] * s_a.repeat_interleave(256)[: q_a.shape[0]] + off
    tau_hat = bf.create_dynamic_map()[q_t.long()] * s_t.repeat_interleave(256)
    for compute in ("float32", "bfloat16"):
        lin = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=dtype)
        lin.weight.data = w.clone()
        layer = icq.quantize_linear(lin, cfg, compute, "cpu")
        expected = _reference_forward_weight(codes, absmax_hat, tau_hat, getattr(torch, compute)).reshape(shape)
        assert torch.equal(layer.dequantize(), expected.float())
        x = torch.randn(3, shape[1], dtype=getattr(torch, compute))
        assert torch.equal(layer(x), F.linear(x, expected))


def test_reference_tie_rule_keeps_the_first_factor_and_ours_keeps_plain_nf4():
    # a block of two values: every candidate codes them to two distinct levels, so all entropies are 1 bit
    block = torch.tensor([-1.0] * 32 + [1.0] * 32).repeat(256, 1).reshape(256, 64) * 0.01
    w = block.reshape(16, 1024)
    stored = icq.quantize_weight(w, icq.Config(tau_points=11, tau_8bit=False))
    first = np.float32(np.linspace(-0.1 * icq._sigma(), 0.1 * icq._sigma(), 11)[0])
    median, spread = torch.tensor(-0.01), torch.tensor(0.02)
    assert torch.equal(stored["tau"], (torch.tensor(first) * spread + median).expand_as(stored["tau"]))
    old = icq.quantize_weight(w, icq.Config(tau_points=11, **OLD))
    assert (old["tau"] == 0).all()  # our earlier rule: tau = 0 first, kept on equal entropy


def test_reference_allows_a_partial_last_group():
    # 384 blocks of 32: one full group of 256 and one of 128 (the reference would need a multiple of 256)
    w = _skewed(48, 256, seed=7)
    cfg = icq.Config(blocksize=32, tau_points=5)
    stored = icq.quantize_weight(w, cfg)
    assert stored["absmax_scale"].shape == (2,) and stored["tau_scale"].shape == (2,)
    tau = icq.ICQLinear(256, 48, 32, None, stored).block_tau().reshape(-1)
    assert torch.equal(stored["tau_scale"][1], tau[256:].abs().max())  # the short group's scale from its own taus


# ---------------------------------------------------------------- our earlier behaviour behind the knobs


def _old_search(w, blocksize, tau_range, tau_points, dtype):
    """Our earlier ICQ: tau = 0 tried first, then median + s * tau_range * std (s on linspace(-1, 1), nearest the
    median first), each rounded to `dtype`; a candidate replaces the best only with strictly higher entropy;
    codes = #(w > tau + absmax * midpoint), absmax = max(hi - tau, tau - lo)."""
    levels = icq.nf4_levels()
    mids = (levels[1:] + levels[:-1]) / 2
    blocks = w.float().reshape(-1, blocksize)
    lo, hi = blocks.min(1).values, blocks.max(1).values
    median, std = blocks.median(1).values, blocks.std(1, correction=0)

    def code(tau):
        absmax = torch.maximum(hi - tau, tau - lo).clamp(min=1e-12)
        cuts = tau[:, None] + absmax[:, None] * mids
        return (blocks[:, :, None] > cuts[:, None, :]).sum(-1), absmax

    def entropy(codes):
        counts = F.one_hot(codes, 16).sum(1).float()
        p = counts / blocksize
        return -(torch.special.xlogy(p, p)).sum(-1) / math.log(2)

    steps = sorted(np.linspace(-1, 1, tau_points).tolist(), key=abs)
    best = torch.zeros(blocks.shape[0])
    best_h = entropy(code(best)[0])
    for s in steps:
        tau = (median + s * tau_range * std).to(dtype).float()
        h = entropy(code(tau)[0])
        best, best_h = torch.where(h > best_h, tau, best), torch.where(h > best_h, h, best_h)
    codes, absmax = code(best)
    return codes.to(torch.uint8), absmax, best


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [_normal, _skewed], ids=["normal", "skewed"])
def test_old_knobs_give_the_old_results(make, dtype):
    w = make(32, 256, seed=11).to(dtype)
    codes, absmax, tau = _old_search(w, 32, 0.1, 21, dtype)
    stored = icq.quantize_weight(w, icq.Config(blocksize=32, tau_points=21, **OLD))
    assert set(stored) == {"qweight", "absmax", "tau"}
    assert torch.equal(stored["qweight"], codes.reshape(32, 256))
    assert torch.equal(stored["absmax"], absmax.reshape(32, 8))
    assert stored["tau"].dtype == dtype and torch.equal(stored["tau"].float(), tau.reshape(32, 8))


@pytest.mark.parametrize("make", [_normal, _skewed], ids=["normal", "skewed"])
def test_median_std_entropy_is_never_below_nf4_block_by_block(make):
    w = make()
    stored = icq.quantize_weight(w, icq.Config(**OLD))
    h_icq = icq.block_entropy(stored["qweight"].reshape(-1, 64))
    h_nf4 = icq.block_entropy(icq.encode(w.reshape(-1, 64), torch.zeros(w.numel() // 64), icq.nf4_levels())[0])
    assert (h_icq >= h_nf4).all()
    assert h_icq.max() <= 4


def test_both_grids_gain_entropy_over_nf4_on_skewed_and_real_weights():
    thresholds = icq.nf4_thresholds(icq.nf4_levels())
    for w in [_skewed(), *_tiny_model_weights()]:
        blocks = w.float().reshape(-1, 64)
        h_nf4 = icq.block_entropy(icq.nf4_codes(blocks, thresholds)[0]).mean()
        for grid in ("reference", "median_std"):
            stored = icq.quantize_weight(w, icq.Config(tau_grid=grid, tau_points=51))
            assert icq.block_entropy(stored["qweight"].reshape(-1, 64)).mean() > h_nf4


# ---------------------------------------------------------------- storage, accounting, config


@pytest.mark.parametrize(
    "knobs", [{}, OLD, {"double_quant": False}, {"tau_8bit": False}], ids=["ref", "old", "fp32absmax", "dtype-tau"]
)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64])
def test_storage_format_is_what_linear_storage_counts(knobs, dtype, bias, blocksize):
    from qpeft_bench.models import DTYPE

    in_f, out_f = 256, 48  # 384 or 192 blocks: a partial group of 256 either way
    cfg = icq.Config(blocksize=blocksize, tau_points=3, **knobs)
    lin = torch.nn.Linear(in_f, out_f, bias=bias, dtype=DTYPE[dtype])
    layer = icq.quantize_linear(lin, cfg, dtype, "cpu")
    assert isinstance(layer, QuantLinear)
    real = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
    planned, outside = icq.linear_storage(in_f, out_f, bias, cfg, dtype)
    assert (real, 0) == (planned, outside) and icq.state_bytes(layer) == 0

    # bits per weight on a large layer, where the per-layer tables vanish
    n = 4096 * 4096
    bits = 8 * (icq.linear_storage(4096, 4096, False, cfg, dtype)[0] - 4 * (16 + 256)) / n
    elem = DTYPE[dtype].itemsize
    absmax_bits = (8 + 32 / 256) / blocksize if cfg.double_quant else 32 / blocksize
    tau_bits = (8 + 32 / 256) / blocksize if cfg.tau_8bit else 8 * elem / blocksize
    tables = 0 if (cfg.double_quant or cfg.tau_8bit) else -8 * 4 * 256 / n
    assert bits == pytest.approx(4 + absmax_bits + tau_bits + tables + (32 / n if cfg.double_quant else 0))


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
        (["quant.tau_grid=mean"], "tau_grid"),
    ],
)
def test_bad_icq_config_fails_before_any_model_is_loaded(compose, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(["quant=icq", *overrides]))
    assert message in str(err.value)
