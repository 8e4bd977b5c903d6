"""SmoothQuant W8A8: smoothing preserves the function and balances activation and weight ranges, it beats plain
W8A8 on outlier channels, the layer equals an int8 GEMM, and LoRA trains through it like through a plain-torch
reference of the same arithmetic."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from qpeft_bench import adapters, calibration, models, quant
from qpeft_bench.config import ConfigError
from qpeft_bench.quant import smoothquant as sq
from qpeft_bench.spec import validate

VOCAB = 256
NAMES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}
# written out here rather than taken from the module under test: (attention norm, MLP norm), MLP readers
NORMS = {"llama": ("input_layernorm", "post_attention_layernorm"), "opt": ("self_attn_layer_norm", "final_layer_norm")}
MLP_READERS = {"llama": ("gate_proj", "up_proj"), "opt": ("fc1",)}
OUTLIERS = [3, 17, 40]  # hidden channels made large in test (b)


def _tiny(family: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                **extra,
            )
        )
    else:
        model = OPTForCausalLM(
            OPTConfig(
                hidden_size=64,
                ffn_dim=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                word_embed_proj_dim=64,
                **extra,
            )
        )
    # norms initialised to ones (and zero bias) would hide a wrong fold: give them values of their own
    with torch.no_grad():
        for mod in _norms(model, family).values():
            mod.weight.uniform_(0.5, 1.5)
            if getattr(mod, "bias", None) is not None:
                mod.bias.normal_(0, 0.1)
    return model.float().eval()


def _norms(model, family: str) -> dict[str, torch.nn.Module]:
    """The norms inside the decoder layers (not the decoder's final norm)."""
    return {n: m for n, m in model.named_modules() if ".layers." in n and n.rsplit(".", 1)[-1] in NORMS[family]}


def _windows(samples=8, seq_len=32, seed=0):
    return calibration.random_windows(VOCAB, samples, seq_len, seed)


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


def _rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# --------------------------------------------------------------------------------------------------------------
# (a) smoothing alone
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_smoothing_preserves_the_function_and_rescales_every_reader(family):
    model = _tiny(family)
    # k_proj is not a target but reads a smoothed norm: it must be folded too, or the logits would move.
    # The MLP readers are no target at all: their norm is left alone.
    skip = {"k_proj", *MLP_READERS[family]}
    targets = [t for t in models.find_linears(model, NAMES[family]) if t.rsplit(".", 1)[-1] not in skip]
    ids = _windows(2, 24, seed=5)
    before = _logits(model, ids)
    original = copy.deepcopy(model)

    assert sq.prepare(model, targets, sq.Config(), _windows(), "cpu") == {}
    assert _rel(_logits(model, ids), before) < 1e-5

    for name, norm in _norms(model, family).items():
        old = original.get_submodule(name)
        if name.endswith(NORMS[family][1]):  # no target reads it
            assert torch.equal(norm.weight, old.weight), name
            continue
        s = old.weight / norm.weight  # the smoothing factor, recovered from the fold
        assert (s - 1).abs().max() > 0.1, name  # really smoothed (otherwise the test proves nothing)
        if family == "opt":
            torch.testing.assert_close(norm.bias, old.bias / s)
        layer = name.rsplit(".", 1)[0]
        for proj in ("q_proj", "k_proj", "v_proj"):
            lin = f"{layer}.self_attn.{proj}"
            torch.testing.assert_close(model.get_submodule(lin).weight, original.get_submodule(lin).weight * s)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_alpha_one_half_equalises_activation_and_weight_maxima(family):
    # s = sqrt(max|X| / max|W|) makes max|X/s| = max|W s| = sqrt(max|X| max|W|) in every channel, where max|W|
    # is over the columns of *all* readers of the norm (q, k and v together).
    model = _tiny(family)
    targets = list(models.find_linears(model, NAMES[family]))
    windows = _windows()
    sq.prepare(model, targets, sq.Config(alpha=0.5), windows, "cpu")
    attn_norm_readers = [t for t in targets if t.endswith("q_proj")]
    act_max = calibration.capture_inputs(model, attn_norm_readers, windows, calibration.absmax, "cpu")
    for q in attn_norm_readers:
        layer = q.rsplit(".", 1)[0]
        w = torch.cat([model.get_submodule(f"{layer}.{p}").weight for p in ("q_proj", "k_proj", "v_proj")])
        torch.testing.assert_close(act_max[q], w.abs().amax(0), rtol=1e-4, atol=0)


# --------------------------------------------------------------------------------------------------------------
# (b) smoothing against plain W8A8 on outlier channels
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_smoothing_beats_plain_w8a8_on_outlier_channels(family):
    model = _tiny(family)
    with torch.no_grad():
        for norm in _norms(model, family).values():
            norm.weight[OUTLIERS] *= 50  # those channels of every norm output now dwarf the others
    targets = list(models.find_linears(model, NAMES[family]))
    windows, probe = _windows(), _windows(2, 32, seed=9)
    reference = _logits(model, probe)

    runs = {}
    for smooth in (True, False):  # smooth=False: the same W8A8 layers, no folding at all
        qmodel = copy.deepcopy(model)
        record = quant.quantize_model(
            "smoothquant",
            qmodel,
            targets,
            sq.Config(alpha=0.5, smooth=smooth),
            "float32",
            "cpu",
            windows=windows,
            probe=probe,
        )
        runs[smooth] = (record["layers"], _rel(_logits(qmodel, probe), reference))
    (smoothed, logits_smoothed), (plain, logits_plain) = runs[True], runs[False]

    readers = ("q_proj", "k_proj", "v_proj", *MLP_READERS[family])
    for name in targets:
        e_s, e_p = smoothed[name]["output_rel_error"], plain[name]["output_rel_error"]
        if name.rsplit(".", 1)[-1] in readers:
            assert e_s < e_p / 2, (name, e_s, e_p)
        else:  # o_proj/out_proj, down_proj/fc2: quantized the same way in both runs, on the same inputs up to
            # float rounding (which may flip a few int8 codes)
            assert e_s == pytest.approx(e_p, rel=0.02), name
    assert logits_smoothed < logits_plain / 1.5


# --------------------------------------------------------------------------------------------------------------
# The W8A8 layer
# --------------------------------------------------------------------------------------------------------------


def test_weight_codes_are_symmetric_int8_per_output_channel():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    w[5] = 0  # an all-zero row must survive
    codes, scale = sq.quantize_weight(w, torch.bfloat16)
    assert codes.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (48,)
    nonzero = torch.arange(48) != 5
    assert (codes.abs().amax(1)[nonzero] >= sq.QMAX - 1).all()  # the largest weight uses (nearly) the full range
    assert codes.abs().max() <= sq.QMAX
    deq = codes.float() * scale.float().unsqueeze(1)
    step = scale.float().unsqueeze(1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()  # round to nearest on the stored scale's grid
    assert torch.equal(deq[5], w[5])


def test_w8a8_layer_equals_an_int8_gemm_with_integer_accumulation():
    lin = torch.nn.Linear(96, 40, bias=True)
    with torch.no_grad():
        lin.bias.normal_()
    layer = sq.quantize_linear(lin, sq.Config(), "float32", "cpu")
    assert layer.qweight.dtype == torch.int8
    x = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(1))
    x[..., 10] *= 40  # an outlier channel, so token scales differ a lot
    # the integer computation, written independently: int64 codes, exact integer products and sums
    x_scale = x.abs().amax(-1, keepdim=True).double() / 127
    x_codes = torch.round(x.double() / x_scale).clamp(-127, 127).long()
    acc = x_codes @ layer.qweight.long().T  # what an int8 GEMM accumulates in int32
    expected = acc.double() * x_scale * layer.scales.double() + lin.bias.double()
    got = layer(x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # and the activation quantization is really there: a plain matmul with the int8 weights differs
    assert _rel(F.linear(x, layer.dequantize(), lin.bias), got) > 1e-3


def test_storage_formula_matches_the_layer():
    lin = torch.nn.Linear(64, 24, bias=True).to(torch.bfloat16)
    layer = sq.quantize_linear(lin, sq.Config(), "bfloat16", "cpu")
    stored = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
    assert sq.linear_storage(64, 24, True, sq.Config(), "bfloat16") == (stored, 0)


# --------------------------------------------------------------------------------------------------------------
# (c) LoRA through the W8A8 base
# --------------------------------------------------------------------------------------------------------------


class _ReferenceW8A8(torch.nn.Linear):
    """Plain torch: a dequantized fp32 weight, and per-token int8 activations through torch's own fake quantizer
    (whose gradient is the straight-through estimator)."""

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        scale = flat.detach().abs().amax(1) / 127
        zero = torch.zeros(flat.shape[0], dtype=torch.int32)
        xq = torch.fake_quantize_per_channel_affine(flat, scale, zero, 0, -127, 127).reshape(x.shape)
        return F.linear(xq, self.weight, self.bias)


def _swap(qmodel, targets, cls):
    ref = copy.deepcopy(qmodel)
    for name in targets:
        mod = ref.get_submodule(name)
        lin = cls(mod.in_features, mod.out_features, bias=mod.bias is not None)
        lin.weight.data = sq.dequantize(mod).float()
        if mod.bias is not None:
            lin.bias.data = mod.bias.data.float()
        lin.requires_grad_(False)
        ref.set_submodule(name, lin)
    return ref


def _lora_grads(model, targets, ids) -> dict[str, torch.Tensor]:
    lora = adapters.get("lora")
    with models.seeded(1):
        peft_model = lora.attach(model, targets, lora.Config(r=4, alpha=8, dropout=0.0, adapter_dtype="float32"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave every A without gradient
            p.data.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def test_lora_gradients_through_w8a8_match_a_plain_torch_reference():
    family = "llama"
    model = _tiny(family)
    targets = list(models.find_linears(model, NAMES[family]))
    quant.quantize_model("smoothquant", model, targets, sq.Config(), "float32", "cpu", windows=_windows())
    reference = _swap(model, targets, _ReferenceW8A8)
    no_act_quant = _swap(model, targets, torch.nn.Linear)

    ids = _windows(2, 24, seed=2)
    got, want = _lora_grads(model, targets, ids), _lora_grads(reference, targets, ids)
    assert len(got) == 2 * len(targets)
    for name, g in want.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # the comparison can tell: without the activation quantization the gradients are measurably different
    plain = _lora_grads(no_act_quant, targets, ids)
    assert max(_rel(plain[n], g) for n, g in want.items()) > 1e-3
    # gradients reach the first layer's adapters only through the inputs of the W8A8 layers above them
    assert any(".layers.0." in n and g.abs().sum() > 0 for n, g in got.items() if "lora_A" in n)


# --------------------------------------------------------------------------------------------------------------
# (d) what cannot run is refused early
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["quant=smoothquant", "calib=none"], "quant=smoothquant needs calibration data"),
        (["quant=smoothquant", "quant.alpha=1.5"], "quant.alpha=1.5 must lie in [0, 1]"),
        (["quant=smoothquant", "quant.alpha=-0.1"], "quant.alpha=-0.1 must lie in [0, 1]"),
    ],
)
def test_config_errors_before_loading(compose, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    assert message in str(err.value)


def test_opt_card_validates_and_other_families_are_refused(compose):
    spec = validate(compose(["quant=smoothquant", "model=opt_1_3b", "quant.alpha=0.8"]))
    assert spec.quant.alpha == 0.8 and spec.quant.smooth is True
    with pytest.raises(ConfigError, match="supports model families llama, opt"):
        quant.check_runnable("smoothquant", sq, "mistral", None, True)


def test_post_norm_opt_is_refused():
    model = _tiny("opt", do_layer_norm_before=False)
    targets = list(models.find_linears(model, NAMES["opt"]))
    with pytest.raises(ValueError, match="do_layer_norm_before=false"):
        sq.prepare(model, targets, sq.Config(), _windows(), "cpu")
