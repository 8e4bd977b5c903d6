"""LLM.int8 (bitsandbytes Linear8bitLt) against an independent reference written here in plain torch.

bitsandbytes runs two different forwards (qpeft_bench/quant/bnb8bit.py says why): MatMul8bitLt, which quantizes
the activations per token and splits out outlier features (CUDA always, CPU in eval mode), and MatMul8bitFp,
a weight-only int8 layer (CPU in train mode). Each is checked against its own reference, the gradients of LoRA
adapters through each of them as well, with an eval-mode forward first (the trap of docs/design.md §7).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_quant_gradients import NAMES, _dequantized_copy, _lora_grads, _tiny_random_llama

from qpeft_bench import accounting, adapters, calibration, models, quant
from qpeft_bench.config import ConfigError
from qpeft_bench.quant import bnb8bit
from qpeft_bench.spec import validate

OUTLIER_CHANNELS = [5, 77]  # input features made large on purpose (the "systematic outlier features" of LLM.int8)
FEEDS_PLANTED_NORMS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # their input is a planted norm
THRESHOLD = 6.0  # LLM.int8's default
# bitsandbytes' CPU kernel (int8_mm_dequant, 0.50.2) rescales the int32 product by 6.200124e-05, where
# 1/127^2 = 6.2000124e-05: 1.8e-5 too much, a dropped digit. Harmless next to 8-bit rounding, but across layers it
# moves activations by enough to flip a few int8 codes, so the whole-model reference copies it.
BNB_RESCALE = 6.200124e-05


def llm_int8(
    x: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, threshold: float, bias=None, rescale: float = 1 / 127**2
):
    """LLM.int8's forward (Dettmers et al. 2022) as bitsandbytes defines it; returns (output, outlier mask).

    Activations are cast to fp16 and rounded per token to int8 against the token's absmax; elements with
    |x| >= threshold do not count for that absmax, and every feature holding one is left out of the int8 product
    and multiplied in the input's dtype with the dequantized weight columns instead."""
    flat = x.reshape(-1, x.shape[-1])
    h = flat.to(torch.float16).float()
    big = h.abs() >= threshold if threshold > 0 else torch.zeros_like(h, dtype=torch.bool)
    outliers = big.any(0)
    token_absmax = h.masked_fill(big, 0).abs().amax(1, keepdim=True)
    xq = torch.round(h * (127.0 / token_absmax)).masked_fill(outliers, 0)
    # int8 x int8 products summed exactly (float64 holds these integers exactly), then rescaled
    out = (xq.double() @ codes.double().T) * (token_absmax.double() * scb.double()) * rescale
    deq = (codes.double() * scb.double().unsqueeze(1) / 127).to(x.dtype)
    out = out.to(x.dtype) + flat[:, outliers] @ deq[:, outliers].T
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], -1), outliers


class Int8Reference(torch.nn.Linear):
    """`llm_int8` as a layer: the forward as above, the backward straight through the activation rounding
    (grad @ dequantized weight), which is what LLM.int8 intends and MatMul8bitLt computes."""

    def __init__(self, codes: torch.Tensor, scb: torch.Tensor, threshold: float):
        super().__init__(codes.shape[1], codes.shape[0], bias=False)
        self.codes, self.scb, self.threshold = codes, scb, threshold
        self.weight = torch.nn.Parameter(codes.float() * scb.unsqueeze(1) / 127, requires_grad=False)

    def forward(self, x):
        exact = F.linear(x, self.weight)
        int8 = llm_int8(x, self.codes, self.scb, self.threshold, rescale=BNB_RESCALE)[0]
        return exact + (int8 - exact).detach()


def _int8_reference_copy(qmodel, targets: list[str]) -> torch.nn.Module:
    ref = copy.deepcopy(qmodel)
    for name in targets:
        mod = ref.get_submodule(name)
        ref.set_submodule(
            name, Int8Reference(mod.weight.data.clone(), bnb8bit.row_absmax(mod).clone(), mod.state.threshold)
        )
    return ref


def _plant_outliers(model, gain: float = 20.0) -> None:
    """Scale a few channels of every RMSNorm: the features feeding q/k/v and gate/up then reach |x| >= 6 on
    some tokens while all others stay far below (|x| ~ 1 / RMS)."""
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data[OUTLIER_CHANNELS] *= gain


def _quantized_llama(threshold: float, probe=None):
    model = _tiny_random_llama()
    _plant_outliers(model)
    targets = list(models.find_linears(model, NAMES))
    record = quant.quantize_model(
        "int8", model, targets, bnb8bit.Config(threshold=threshold), "float32", "cpu", probe=probe
    )
    return model, targets, record


def _attach_same_lora(*nets, targets: list[str]):
    """The same LoRA adapters on every net, with a non-zero B (B = 0 would leave A without gradient)."""
    lora = adapters.get("lora")
    cfg = lora.Config(r=4, alpha=8, dropout=0.0, adapter_dtype="float32")
    peft_nets = []
    for net in nets:
        with models.seeded(1):
            peft_nets.append(lora.attach(net, targets, cfg))
    gen = torch.Generator().manual_seed(3)
    first, *others = peft_nets
    for name, param in first.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02, generator=gen)
    for other in others:
        mine = dict(other.named_parameters())
        for name, param in first.named_parameters():
            if "lora_" in name:
                mine[name].data.copy_(param.data)
    return peft_nets


def _eval_forward_first(model, ids, targets) -> dict[str, torch.Tensor | None]:
    """An eval-mode forward (what armed bitsandbytes' autograd-less 4-bit kernel); returns each layer's outlier
    features as bitsandbytes found them."""
    with torch.no_grad():
        model.eval()
        model(input_ids=ids)
    base = model.get_base_model()
    return {t: base.get_submodule(t).base_layer.state.idx for t in targets}


def _assert_outliers_split(idx: dict, threshold: float) -> None:
    for name, found in idx.items():
        if threshold == 0:
            assert found is None, name  # no decomposition at all
        elif name.endswith(FEEDS_PLANTED_NORMS):
            assert found.tolist() == OUTLIER_CHANNELS, name  # exactly the planted features, nothing else
        else:  # o_proj, down_proj: inputs far below the threshold
            assert found.numel() == 0, name


def _ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))


# ---------------------------------------------------------------------------------------------------------------
# One layer: storage format and both forwards
# ---------------------------------------------------------------------------------------------------------------


def _layer(threshold: float, dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=bias).to(dtype).requires_grad_(False)
    return lin, bnb8bit.quantize_linear(lin, bnb8bit.Config(threshold=threshold), "float32", "cpu")


def _input_with_outliers():
    x = torch.randn(2, 10, 128, generator=torch.Generator().manual_seed(1))
    x[:, ::3, OUTLIER_CHANNELS] *= 30  # every third token: |x| >> 6 in the planted features
    return x


def test_weights_are_int8_rows_with_an_fp32_absmax_each():
    lin, layer = _layer(THRESHOLD)
    w16 = lin.weight.data.half().float()  # bitsandbytes rounds the fp16 weight
    scb = bnb8bit.row_absmax(layer)
    assert layer.weight.dtype == torch.int8 and scb.dtype == torch.float32
    torch.testing.assert_close(scb, w16.abs().amax(1), rtol=0, atol=0)
    assert int(layer.weight.data.abs().max()) == 127
    err = (bnb8bit.dequantize(layer) - lin.weight.data).abs()
    # round to nearest on a grid of step absmax/127 per row, after the fp16 cast (relative error <= 2^-11)
    assert (err <= scb.unsqueeze(1) / 254 * (1 + 1e-6) + lin.weight.data.abs() * 2**-11).all()


@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
def test_eval_forward_is_llm_int8_and_cpu_train_forward_is_weight_only(threshold):
    lin, layer = _layer(threshold)
    x = _input_with_outliers()
    layer.eval()
    with torch.no_grad():
        got = layer(x)
    expected, outliers = llm_int8(x, layer.weight.data, bnb8bit.row_absmax(layer), threshold, lin.bias)
    # rtol 3e-5 covers BNB_RESCALE's 1.8e-5; atol, fp32 sums in another order. One int8 code off would move an
    # output by ~(absmax/127)|w| ~ 1e-3, far above both.
    torch.testing.assert_close(got, expected, rtol=3e-5, atol=1e-5 * float(expected.abs().max()))
    if threshold:
        assert outliers.nonzero().flatten().tolist() == OUTLIER_CHANNELS == layer.state.idx.tolist()
    else:
        assert not outliers.any() and layer.state.idx is None

    # bitsandbytes' CPU training path: dequantized weight, activations untouched (bit for bit)
    layer.train()
    with torch.no_grad():
        trained = layer(x)
    assert torch.equal(trained, F.linear(x, bnb8bit.dequantize(layer), lin.bias))
    assert not torch.allclose(trained, got, rtol=1e-4, atol=1e-4)  # so the two forwards really differ on the CPU


def test_outlier_decomposition_removes_most_of_the_activation_error():
    x = _input_with_outliers()
    errors = {}
    for threshold in (0.0, THRESHOLD):
        lin, layer = _layer(threshold)
        layer.eval()
        with torch.no_grad():
            exact = lin(x)
            errors[threshold] = float((layer(x) - exact).norm() / exact.norm())
    # Without the split, a 30x outlier sets the scale of its whole token and the other features of that token
    # keep only a few bits (measured: 0.023 without, 0.005 with the split; a third of the tokens carry outliers).
    assert errors[THRESHOLD] < errors[0.0] / 3, errors


def test_storage_counts_scb_outside_parameters_wherever_bitsandbytes_keeps_it():
    lin, layer = _layer(THRESHOLD, dtype=torch.bfloat16)
    planned = bnb8bit.linear_storage(128, 48, True, bnb8bit.Config(), "bfloat16")
    scb = bnb8bit.row_absmax(layer)
    assert all(t is not scb for t in (*layer.parameters(), *layer.buffers()))
    assert planned == (accounting.param_buffer_bytes(layer), bnb8bit.state_bytes(layer))
    assert planned[1] == 48 * torch.finfo(torch.float32).bits // 8
    for train in (False, True):  # the first forward moves SCB from the parameter to `layer.state`
        layer.train(train)
        with torch.no_grad():
            layer(_input_with_outliers().bfloat16())
        assert layer.weight.SCB is None and layer.state.SCB is scb
        assert planned == (accounting.param_buffer_bytes(layer), bnb8bit.state_bytes(layer))


def test_negative_threshold_is_a_config_error(compose):
    assert validate(compose(["quant=int8", "quant.threshold=0"])).quant.threshold == 0
    with pytest.raises(ConfigError, match=r"quant.threshold=-1.0 must be >= 0"):
        validate(compose(["quant=int8", "quant.threshold=-1.0"]))


# ---------------------------------------------------------------------------------------------------------------
# LoRA gradients through a whole quantized model, after an eval-mode forward
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
def test_lora_gradients_on_the_cpu_training_path_match_dequantized_fp32(threshold):
    model, targets, _ = _quantized_llama(threshold)
    reference = _dequantized_copy(model, targets, bnb8bit)
    qpeft, rpeft = _attach_same_lora(model, reference, targets=targets)
    _assert_outliers_split(_eval_forward_first(qpeft, _ids(), targets), threshold)

    grads_q, grads_r = _lora_grads(qpeft, _ids()), _lora_grads(rpeft, _ids())
    assert len(grads_q) == 2 * len(targets)
    for name, g in grads_r.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads_q[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
def test_lora_gradients_on_the_llm_int8_training_path_match_the_plain_torch_reference(threshold, monkeypatch):
    # CUDA trains through MatMul8bitLt (int8 activations, outlier split). bitsandbytes sends CPU training to
    # MatMul8bitFp instead; pointing that name at MatMul8bitLt runs the CUDA algorithm on the CPU.
    import bitsandbytes.autograd._functions as bnb_functions

    monkeypatch.setattr(bnb_functions, "MatMul8bitFp", bnb_functions.MatMul8bitLt)
    model, targets, _ = _quantized_llama(threshold)
    reference, weight_only = _int8_reference_copy(model, targets), _dequantized_copy(model, targets, bnb8bit)
    qpeft, rpeft, wpeft = _attach_same_lora(model, reference, weight_only, targets=targets)
    _assert_outliers_split(_eval_forward_first(qpeft, _ids(), targets), threshold)

    losses = {}
    for key, net in (("int8", qpeft), ("reference", rpeft), ("weight_only", wpeft)):
        net.train()
        with torch.no_grad():
            losses[key] = float(net(input_ids=_ids(), labels=_ids()).loss)
    assert losses["int8"] == pytest.approx(losses["reference"], rel=1e-6, abs=0)
    # the activation rounding really is in this loss: the dequantized-weight model computes another one
    assert abs(losses["weight_only"] - losses["reference"]) > 1e-5, losses

    grads_q, grads_r, grads_w = _lora_grads(qpeft, _ids()), _lora_grads(rpeft, _ids()), _lora_grads(wpeft, _ids())
    for name, g in grads_r.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads_q[name], g, rtol=1e-4, atol=1e-6, msg=name)  # measured: 1.4e-6 apart
        # and the test can tell: without the activation rounding every gradient moves by 0.8 % or more (measured)
        assert (grads_w[name] - g).norm() > 2e-3 * g.norm(), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_trains_through_llm_int8_after_an_eval_forward():
    """What the monkeypatched test above assumes about CUDA, on CUDA: weights quantized where they were loaded,
    training through int8 activations with the outlier split, the input gradient through the dequantized weight."""
    lin, cpu_layer = _layer(THRESHOLD, dtype=torch.bfloat16)
    lin = lin.cuda()  # a model loaded on the GPU: Int8Params.to() alone would leave this weight unquantized
    layer = bnb8bit.quantize_linear(lin, bnb8bit.Config(threshold=THRESHOLD), "bfloat16", "cuda")
    assert layer.weight.device.type == "cuda" and layer.weight.dtype == torch.int8
    torch.testing.assert_close(bnb8bit.row_absmax(layer).cpu(), bnb8bit.row_absmax(cpu_layer), rtol=0, atol=0)
    assert (layer.weight.data.cpu().int() - cpu_layer.weight.data.int()).abs().max() <= 1  # kernel rounding ties

    x = _input_with_outliers().cuda()
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    xg = x.clone().requires_grad_()
    y = layer(xg)
    assert layer.state.idx.tolist() == OUTLIER_CHANNELS
    expected, _ = llm_int8(x, layer.weight.data, bnb8bit.row_absmax(layer), THRESHOLD, lin.bias)
    weight_only = F.linear(x, bnb8bit.dequantize(layer), lin.bias.float())

    def rel(ref):
        return float((y.detach() - ref).norm() / ref.norm())

    # the CUDA kernel rounds its output through fp16; the activation rounding is far larger (measured on the
    # H100: 1.5e-4 from the reference, 3.5e-3 from the weight-only product)
    assert rel(expected) < 1e-3 < rel(weight_only), (rel(expected), rel(weight_only))
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(xg.grad, grad @ bnb8bit.dequantize(layer), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The error quantize_model records
# ---------------------------------------------------------------------------------------------------------------


def test_recorded_output_error_is_that_of_8_bit_rounding_and_below_rtn_4bit():
    probe = calibration.random_windows(256, 2, 24, 5)
    fp = _tiny_random_llama()
    _plant_outliers(fp)
    targets = list(models.find_linears(fp, NAMES))
    inputs = calibration.capture_inputs(fp, targets, probe, calibration.keep, "cpu")
    weights = {t: fp.get_submodule(t).weight.detach().clone() for t in targets}

    model, _, record = _quantized_llama(THRESHOLD, probe=probe)
    rtn = _tiny_random_llama()
    _plant_outliers(rtn)
    rtn4 = quant.quantize_model(
        "rtn", rtn, targets, quant.get("rtn").Config(bits=4, group_size=64), "float32", "cpu", probe=probe
    )
    for t in targets:
        x, w, layer = inputs[t], weights[t], model.get_submodule(t)
        # Uniform rounding noise of variance step^2/12 on each weight (step SCB_i/127 in row i) and on each
        # activation outside the outlier features (step absmax_t/127 in token t), propagated through the product.
        w_step = bnb8bit.row_absmax(layer) / 127
        big = x.abs() >= THRESHOLD
        x_step = x.masked_fill(big, 0).abs().amax(1) / 127
        kept = ~big.any(0)
        noise = x.pow(2).sum() * w_step.pow(2).sum() / 12 + x_step.pow(2).sum() * w[:, kept].pow(2).sum() / 12
        predicted = float(noise.sqrt() / F.linear(x, w).norm())
        measured = record["layers"][t]["output_rel_error"]
        # Measured on the tiny model: ratios 0.95-1.06 over all layers. Outside [0.8, 1.25] something else is at
        # work: an outlier feature rounded to int8 (several times the prediction), or no activation rounding at
        # all (the weight term alone is 0.68 of the prediction on o_proj, 0.45 on down_proj).
        assert 0.8 * predicted < measured < 1.25 * predicted, (t, measured, predicted)
        assert measured < 0.025  # 8 bits: measured 0.0066-0.019 (down_proj, whose inputs are heavy-tailed, highest)
        assert measured < rtn4["layers"][t]["output_rel_error"] / 4, t
    assert record["output_rel_error"] < rtn4["output_rel_error"] / 4
