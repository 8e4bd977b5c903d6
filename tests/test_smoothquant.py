"""SmoothQuant W8A8: smoothing preserves the function and balances activation and weight ranges, it beats plain
W8A8 on outlier channels, the layer equals an int8 GEMM, the whole quantized model equals a restatement of the
authors' evaluation (mit-han-lab/smoothquant: smooth.py + fake_quant.py with quantize_bmm_input=True, as ppl_eval.py
runs it) bit for bit, and LoRA trains through it like through a plain-torch reference of the same arithmetic."""

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


def _capture(model, windows):
    """The quantizer protocol's capture(targets, reduce) over `windows`, one pass (quant.quantize_model's)."""
    return lambda ts, reduce: calibration.capture_inputs(model, ts, windows, reduce, "cpu")


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

    settings = sq.prepare(model, targets, sq.Config(), _capture(model, _windows()), "cpu")
    # what prepare hands the layers: q/k/v round their outputs; v reads the norm output q rounded in place (k is no
    # target here, so only one earlier rounding)
    assert {n.rsplit(".", 1)[-1] for n in settings} == {"q_proj", "v_proj"}
    assert all(s["quantize_output"] for s in settings.values())
    assert [s.get("input_roundings", 1) for n, s in sorted(settings.items()) if n.endswith("v_proj")] == [2, 2]
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
    sq.prepare(model, targets, sq.Config(alpha=0.5), _capture(model, windows), "cpu")
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
    # fp32: the quotient w / s is exact enough that the largest weight is code 127 and every weight goes to its
    # nearest grid point (bf16, where the reference's quotient is itself rounded, is pinned further down)
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    w[5] = 0  # an all-zero row must survive
    codes, scale = sq.quantize_weight(w, torch.float32)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (48,)
    nonzero = torch.arange(48) != 5
    assert (codes.int().abs().amax(1)[nonzero] == sq.QMAX).all()
    assert (scale > 0).all()  # no row needed storing negated
    deq = codes.float() * scale.unsqueeze(1)
    step = scale.unsqueeze(1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()  # round to nearest on the stored scale's grid
    assert torch.equal(deq[5], w[5])
    assert scale[5] == pytest.approx(1e-5 / 127)  # the reference's clamp of max|w| at 1e-5


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


def _torch_fake_quant_tokens(x):
    """Per-token symmetric int8 through torch's own fake quantizer (whose gradient is the straight-through
    estimator)."""
    flat = x.reshape(-1, x.shape[-1])
    scale = flat.detach().abs().amax(1) / 127
    zero = torch.zeros(flat.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(flat, scale, zero, 0, -127, 127).reshape(x.shape)


class _ReferenceW8A8(torch.nn.Linear):
    """Plain torch: a dequantized fp32 weight, per-token int8 activations, and (q/k/v, `round_output`) per-token
    int8 outputs. In fp32 rounding a rounded tensor again changes nothing, so the in-place re-rounding of shared
    inputs needs no restating here."""

    round_output = False

    def forward(self, x):
        y = F.linear(_torch_fake_quant_tokens(x), self.weight, self.bias)
        return _torch_fake_quant_tokens(y) if self.round_output else y


def _swap(qmodel, targets, cls):
    ref = copy.deepcopy(qmodel)
    for name in targets:
        mod = ref.get_submodule(name)
        lin = cls(mod.in_features, mod.out_features, bias=mod.bias is not None)
        lin.round_output = name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")
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
    with pytest.raises(ConfigError, match=r"supports model families llama, mistral, qwen2, qwen3, opt \(.*Gemma"):
        quant.check_runnable("smoothquant", sq, "gemma2", None, True)


def test_post_norm_opt_is_refused():
    model = _tiny("opt", do_layer_norm_before=False)
    targets = list(models.find_linears(model, NAMES["opt"]))
    with pytest.raises(ValueError, match="do_layer_norm_before=false"):
        sq.prepare(model, targets, sq.Config(), _capture(model, _windows()), "cpu")


# --------------------------------------------------------------------------------------------------------------
# (e) the authors' evaluation, restated: smooth_lm + quantize_model(per_channel, per_token, quantize_bmm_input)
# --------------------------------------------------------------------------------------------------------------
# Facts of mit-han-lab/smoothquant carried over (the code below is ours): the statistics are per-channel max|x| of
# the q_proj / gate_proj / fc1 input, one sample per forward; s = clamp(a^alpha / clamp(max|W_j|, 1e-5)^(1-alpha),
# 1e-5) with every step in the linear weights' dtype; the norm weight (and bias) is divided by s in place and
# the readers' columns multiplied; a weight row and a token are rounded as round(t / (clamp(max|t|, 1e-5) / 127))
# times that scale, in the tensor's dtype, with no clamp of the codes; the activation rounding is done IN PLACE on
# the layer's input, so the readers of one norm output after the first see it already rounded; q/k/v round
# their outputs the same way. Every decoder linear is quantized, the lm_head is not.

BMM = ("q_proj", "k_proj", "v_proj")


def _round_tokens_(t: torch.Tensor) -> torch.Tensor:
    """In place, like the reference's activation quantizer (so a tensor shared by several readers changes)."""
    step = torch.clamp(t.abs().max(dim=-1, keepdim=True).values, min=1e-5).div(127)
    return t.copy_(torch.round(t.div(step)).mul(step))


class _PaperW8A8(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, round_output: bool, in_place: bool = True):
        super().__init__()
        w = linear.weight.detach().clone()
        step = torch.clamp(w.abs().max(dim=-1, keepdim=True).values, min=1e-5).div(127)
        codes = torch.round(w.div(step))
        # the one thing int8 storage cannot hold: a row whose codes reach both +128 and -128 (bf16 only; one in
        # ~2000 rows) keeps +128 as 127. Restated here so that the rest is compared bit for bit.
        both = (codes == 128).any(-1, keepdim=True) & (codes == -128).any(-1, keepdim=True)
        self.int8_clamped = int((both & (codes == 128)).sum())
        self.register_buffer("w", torch.where(both & (codes == 128), 127.0, codes).to(w.dtype).mul(step))
        self.b = None if linear.bias is None else linear.bias.detach().clone()
        self.round_output, self.in_place = round_output, in_place

    def forward(self, x):
        x = _round_tokens_(x if self.in_place else x.clone())
        y = F.linear(x, self.w, self.b)
        return _round_tokens_(y) if self.round_output else y


def _paper_smooth(model, family: str, windows, alpha: float) -> None:
    norms = _norms(model, family)
    act_max: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args, out):
            m = out.detach().reshape(-1, out.shape[-1]).abs().max(dim=0).values.float()
            act_max[name] = m if name not in act_max else torch.maximum(act_max[name], m)

        return fn

    handles = [mod.register_forward_hook(hook(n)) for n, mod in norms.items()]
    with torch.no_grad():
        for window in windows:  # one sample per forward, as the reference's calibration
            model(input_ids=window[None])
    for h in handles:
        h.remove()
    readers = {NORMS[family][0]: ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    readers[NORMS[family][1]] = tuple(("mlp." if family == "llama" else "") + r for r in MLP_READERS[family])
    with torch.no_grad():
        for name, norm in norms.items():
            layer, kind = name.rsplit(".", 1)
            fcs = [model.get_submodule(f"{layer}.{r}") for r in readers[kind]]
            dtype = fcs[0].weight.dtype
            w_max = torch.stack([fc.weight.abs().max(dim=0).values for fc in fcs]).max(dim=0).values
            s = torch.clamp(act_max[name].to(dtype).pow(alpha) / torch.clamp(w_max, min=1e-5).pow(1 - alpha), min=1e-5)
            norm.weight.div_(s)
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(s)
            for fc in fcs:
                fc.weight.mul_(s.view(1, -1))


def _paper_model(model, family: str, windows, alpha=0.5, bmm=True, in_place=True):
    ref = copy.deepcopy(model)
    _paper_smooth(ref, family, windows, alpha)
    for name in models.find_linears(ref, NAMES[family]):
        leaf = name.rsplit(".", 1)[-1]
        ref.set_submodule(name, _PaperW8A8(ref.get_submodule(name), bmm and leaf in BMM, in_place))
    return ref


def _ours(model, family: str, windows, dtype: str, **knobs):
    qmodel = copy.deepcopy(model)
    targets = list(models.find_linears(qmodel, NAMES[family]))
    quant.quantize_model("smoothquant", qmodel, targets, sq.Config(**knobs), dtype, "cpu", windows=windows)
    return qmodel


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_default_equals_the_reference_evaluation_bit_for_bit(family, dtype):
    model = _tiny(family).to(models.DTYPE[dtype])
    windows, ids = _windows(), _windows(2, 24, seed=5)
    ours = _ours(model, family, windows, dtype)
    reference = _logits(_paper_model(model, family, windows), ids)
    assert torch.equal(_logits(ours, ids), reference)
    # the comparison can tell: without the q/k/v output rounding the logits move
    assert _rel(_logits(_paper_model(model, family, windows, bmm=False), ids).float(), reference.float()) > 1e-3
    if dtype == "bfloat16":
        # bf16 exercises the two reference artefacts we reproduce: codes of +128 (rows stored negated, since int8
        # has no +128) and the re-rounding of a shared input by its later readers (not idempotent in bf16)
        layers = [m for m in ours.modules() if isinstance(m, sq.W8A8Linear)]
        assert any((m.scales < 0).any() for m in layers)
        paper = [m for m in _paper_model(model, family, windows).modules() if isinstance(m, _PaperW8A8)]
        assert sum(m.int8_clamped for m in paper) <= 1e-4 * sum(m.w.numel() for m in paper)
        once = _logits(_paper_model(model, family, windows, in_place=False), ids)
        assert not torch.equal(once, reference)
        assert torch.equal(_logits(_ours(model, family, windows, dtype, requantize_shared_inputs=False), ids), once)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_knob_off_gives_the_old_w8a8_without_output_rounding(family):
    # fp32: the reference arithmetic and our earlier fp32 arithmetic coincide, so the knob off is the layer as it
    # was (inputs and weights rounded, outputs not), and fp32_arithmetic changes nothing
    model = _tiny(family)
    windows, ids = _windows(), _windows(2, 24, seed=5)
    off = _logits(_ours(model, family, windows, "float32", quantize_bmm_input=False), ids)
    assert torch.equal(off, _logits(_paper_model(model, family, windows, bmm=False), ids))
    old = _ours(model, family, windows, "float32", quantize_bmm_input=False, fp32_arithmetic=True)
    assert torch.equal(_logits(old, ids), off)
    assert not any(m.quantize_output for m in old.modules() if isinstance(m, sq.W8A8Linear))


def test_qkv_outputs_are_on_the_per_token_int8_grid_and_nothing_else_is():
    family = "llama"
    qmodel = _ours(_tiny(family), family, _windows(), "float32")
    outputs = {}
    handles = [
        m.register_forward_hook(lambda mod, args, out, n=n: outputs.__setitem__(n, out))
        for n, m in qmodel.named_modules()
        if isinstance(m, sq.W8A8Linear)
    ]
    _logits(qmodel, _windows(2, 24, seed=5))
    for h in handles:
        h.remove()
    assert len(outputs) == 2 * len(NAMES[family])
    for name, y in outputs.items():
        step = y.abs().amax(-1, keepdim=True) / 127
        codes = y / step
        on_grid = bool(((codes - codes.round()).abs() < 1e-3).all())
        assert on_grid == (name.rsplit(".", 1)[-1] in BMM), name


def test_bf16_weight_codes_reach_128_and_are_stored_exactly():
    # a bf16 quotient w / s has 8 significant bits, so max|w| / s can round to 127.5 and then to 128
    w = (torch.randn(512, 256, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    step = torch.clamp(w.abs().max(dim=-1, keepdim=True).values, min=1e-5).div(127)
    codes = torch.round(w.div(step))
    expected = codes.mul(step)
    plus, minus = (codes == 128).any(1), (codes == -128).any(1)
    assert plus.any() and minus.any()
    q, scale = sq.quantize_weight(w, torch.bfloat16)
    deq = q.to(torch.bfloat16) * scale.unsqueeze(1)
    exact = ~(plus & minus)  # a row reaching both +128 and -128 cannot be held in int8 either way
    assert torch.equal(deq[exact], expected[exact])
    assert ((deq[~exact] - expected[~exact]).abs() <= step[~exact]).all()
    assert torch.equal(scale < 0, (plus & ~minus))  # only rows with +128 and no -128 are stored negated


def test_lora_adds_to_the_rounded_base_output_and_is_not_rounded():
    # peft's LoRA returns base(x) + s B A x: the rounding belongs to the SmoothQuant base, the adapter path stays
    # in full precision (the reference has no adapter; a fine-tuned W8A8 base means exactly this)
    family = "llama"
    qmodel = _ours(_tiny(family), family, _windows(), "float32")
    targets = list(models.find_linears(qmodel, NAMES[family]))
    lora = adapters.get("lora")
    with models.seeded(1):
        peft_model = lora.attach(qmodel, targets, lora.Config(r=4, alpha=8, dropout=0.0, adapter_dtype="float32"))
    layer = next(m for n, m in peft_model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
        x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4))
        base_out = layer.get_base_layer()(x)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(layer(x), base_out + layer.scaling["default"] * (x @ a.T) @ b.T)
        assert torch.equal(base_out, sq.fake_quantize_tokens(base_out))  # the base output is on the int8 grid
        assert not torch.equal(layer(x), sq.fake_quantize_tokens(layer(x)))  # the sum is not rounded again
