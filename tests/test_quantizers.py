"""Sanity checks of the quantizers against each other (issue 3), on the embedded tiny model's trained weights and
calibration windows from its held-out text, in fp32 so that no dtype rounding blurs the comparison; GPTQ's
algorithm, OWQ/QEFT's weak columns and QEFT's reordering; the config errors of these quantizers."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qpeft_bench import ASSETS, calibration, models, quant
from qpeft_bench.config import ConfigError
from qpeft_bench.quant import gptq, qeft
from qpeft_bench.quant.rtn import quantize_weight
from qpeft_bench.quant.weakcol import WeakColumnLinear
from qpeft_bench.spec import validate

NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = str(ASSETS / "tiny_llama")


@pytest.fixture(scope="module")
def windows():
    texts = calibration.read_text(str(ASSETS / "data" / "tiny_text.txt"))
    return calibration.token_windows(models.load_tokenizer(TINY), texts, samples=16, seq_len=128, seed=0)


def _errors(qname: str, windows, **knobs) -> dict:
    model = models.load_model(TINY, "float32", "cpu")
    qmod = quant.get(qname)
    cfg = qmod.Config(**{**quant.preset(qname), **knobs})
    targets = list(models.find_linears(model, NAMES))
    return quant.quantize_model(qname, model, targets, cfg, "float32", "cpu", windows=windows, probe=windows[:2])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_weight_error_is_below_rtn_at_equal_bits_and_group_size(windows, bits):
    hqq = _errors("hqq", windows, nbits=bits, group_size=64)
    rtn = _errors("rtn", windows, bits=bits, group_size=64)
    assert hqq["weight_rel_error"] < rtn["weight_rel_error"]
    # and layer by layer, not just on average
    worse = [n for n, e in hqq["layers"].items() if e["weight_rel_error"] >= rtn["layers"][n]["weight_rel_error"]]
    assert len(worse) <= len(hqq["layers"]) // 10, worse


@pytest.mark.parametrize("bits, act_order", [(3, True), (3, False), (4, True), (4, False)])
def test_gptq_output_error_is_below_rtn_on_calibration_data(windows, bits, act_order):
    # act_order needs static groups (the storage keeps a group's columns contiguous)
    g = _errors("gptq", windows, bits=bits, group_size=64, act_order=act_order, static_groups=act_order)
    r = _errors("rtn", windows, bits=bits, group_size=64)
    assert g["output_rel_error"] < 0.8 * r["output_rel_error"]
    for name, e in g["layers"].items():
        assert e["output_rel_error"] < r["layers"][name]["output_rel_error"], name
    # GPTQ trades weight error for output error: it does not minimise ||dW|| and should not look as if it did
    assert g["weight_rel_error"] > r["weight_rel_error"]


@pytest.mark.parametrize("qname", ["owq", "qeft"])
def test_weak_columns_lower_the_output_error(windows, qname):
    # min-max group fits, so that k = 0 is GPTQ's own grid
    without = _errors(qname, windows, bits=3, group_size=64, k=0, tuning="minmax")
    with_k = _errors(qname, windows, bits=3, group_size=64, k=16, tuning="minmax")
    assert with_k["output_rel_error"] < without["output_rel_error"]
    assert with_k["weight_rel_error"] < without["weight_rel_error"]
    # k = 0 is plain GPTQ at the same grid
    plain = _errors("gptq", windows, bits=3, group_size=64)
    assert without["output_rel_error"] == pytest.approx(plain["output_rel_error"], rel=1e-6)


FIT3 = gptq.group_fit(gptq.Config(bits=3))
FIT4 = gptq.group_fit(gptq.Config(bits=4))


def test_gptq_minimises_the_hessian_weighted_error_of_one_layer():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen)  # correlated inputs
    w = torch.randn(32, 64, generator=gen)
    H = 2 * x.T @ x / x.shape[0]

    def loss(deq):
        d = deq - w
        return float(torch.trace(d @ H @ d.T))

    order = torch.argsort(torch.diagonal(H), descending=True)
    codes, scale, zero, _ = gptq.gptq(w, H, 3, 32, 0.01, FIT3, order=order, static_groups=True)
    deq_gptq = (codes.float().reshape(32, 2, 32) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    c, s, z = quantize_weight(w, 3, 32, symmetric=False)
    deq_rtn = (c.float().reshape(32, 2, 32) - z.unsqueeze(-1)) * s.unsqueeze(-1)
    assert loss(deq_gptq.reshape(32, 64)) < 0.7 * loss(deq_rtn.reshape(32, 64))
    assert int(codes.max()) <= 7


def test_gptq_keeps_requested_columns_and_handles_dead_inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=gen)
    x[:, 5] = 0  # an input that is never active
    w = torch.randn(8, 32, generator=gen)
    H = x.T @ x
    keep = torch.tensor([3, 17])
    rest = torch.tensor([j for j in range(32) if j not in (3, 17)])
    codes, scale, zero, kept = gptq.gptq(w, H, 4, 16, 0.01, FIT4, order=torch.cat([rest, keep]), n_quant=30)
    assert kept.shape == (8, 2)
    # the kept columns are the originals plus the error feedback of every other column: close, not identical
    assert not torch.equal(kept, w[:, keep]) and torch.allclose(kept, w[:, keep], atol=1.0)
    assert torch.isfinite(scale).all() and torch.isfinite(kept).all()


def _random_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).float().eval()


@pytest.mark.parametrize("tied", [False, True])
def test_qeft_offline_reordering_leaves_the_function_unchanged(tied):
    model = _random_llama(tied)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    targets = list(models.find_linears(model, NAMES))
    cfg = qeft.Config(k=8, group_size=32)

    def capture(ts, reduce):
        return calibration.capture_inputs(model, ts, ids, reduce, "cpu")

    qeft.prepare_global(model, targets, cfg, capture, "cpu")
    stats = qeft.prepare(model, targets, cfg, capture, "cpu")
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).norm() / before.norm() < 1e-5
    # the weak hidden channels now come first, with the Hessians permuted to match
    q = "model.layers.0.self_attn.q_proj"
    H, weak = stats[q]
    assert torch.equal(weak, torch.arange(8))
    lam = torch.diagonal(H)
    assert lam[:8].mean() > lam[8:].mean()


def test_qeft_layers_share_one_contiguous_set_and_o_proj_keeps_indices():
    model = _random_llama(False)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(4))
    targets = list(models.find_linears(model, NAMES))
    quant.quantize_model("qeft", model, targets, qeft.Config(k=8, group_size=32), "float32", "cpu", windows=ids)
    layers = {t: model.get_submodule(t) for t in targets}
    assert all(isinstance(m, WeakColumnLinear) for m in layers.values())
    for t, m in layers.items():
        assert m.weak_idx.numel() == 8
        assert m.contiguous == (not t.endswith("o_proj")), t  # o_proj: per-layer indices, picked from its lambda


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["quant=gptq", "calib=none"], "needs calibration data"),
        (["quant=smoothquant", "calib=none"], "needs calibration data"),
        (
            ["quant=owq", "quant.k=256"],
            r"quant.k=256 weak columns leave no column to quantize in model.layers.0.self_attn.q_proj",
        ),
        (["quant=gptq", "quant.group_size=96"], r"group_size=96 does not divide in_features=256 of model.layers.0"),
        (["quant=gptq", "quant.bits=5"], r"quant.bits=5 has the wrong type: expected 2 \| 3 \| 4 \| 8"),
        (["quant=qeft", "quant.damp_percent=0"], "damp_percent=0"),
        (
            ["quant=qeft", "model=opt_1_3b", "mode=plan"],
            "supports model families llama, mistral, qwen2, qwen3 .*; this model is 'opt'",
        ),
        (["calib=text", "calib.path=/no/such/file.txt"], "does not exist"),
        (["quant=gptq", "calib.seq_len=4096"], "calib.seq_len=4096 exceeds the context length 512"),
        (["model.dtype=float16", "peft.adapter_dtype=bfloat16"], "fp16 loss scaling cannot unscale"),
    ],
)
def test_impossible_quantizer_settings_fail_before_loading(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


def test_a_cuda_only_quantizer_is_refused_on_the_cpu_before_loading():
    # none of our quantizers is CUDA-only today; the check exists for kernels that are (and for the next one)
    import types

    fake = types.SimpleNamespace(CUDA_ONLY=True)
    with pytest.raises(ConfigError, match="quant=fused runs only on CUDA; train.device resolves to 'cpu'"):
        quant.check_runnable("fused", fake, "llama", "cpu", has_calibration=True)
    quant.check_runnable("fused", fake, "llama", "cuda:0", has_calibration=True)  # fine there
    quant.check_runnable("fused", fake, "llama", None, has_calibration=True)  # plan mode: no device involved
