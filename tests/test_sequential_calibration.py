"""Block-by-block calibration (calib.sequential): each block calibrated on the outputs of the quantized blocks
before it, one block's statistics held at a time."""

from __future__ import annotations

import weakref

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qpeft_bench import ASSETS, calibration, models, quant

NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = str(ASSETS / "tiny_llama")


def _random_llama(blocks=4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).float().eval()


def _quantize(model, qname, windows, sequential, **knobs):
    targets = list(models.find_linears(model, NAMES))
    cfg = quant.get(qname).Config(**knobs)
    return quant.quantize_model(
        qname, model, targets, cfg, "float32", "cpu", windows=windows, probe=windows[:1], sequential=sequential
    )


class LiveHessians:
    """Counts the bytes of Hessian accumulators alive at any moment (a weak reference on each one created), and
    the most ever alive at once."""

    def __init__(self, monkeypatch):
        self.live: weakref.WeakSet = weakref.WeakSet()
        self.peak = 0
        real = calibration.hessian

        def counting(state, x):
            new = state is None
            state = real(state, x)
            if new:
                self.live.add(state[0])
                self.peak = max(self.peak, sum(t.numel() * t.element_size() for t in self.live))
            return state

        monkeypatch.setattr(calibration, "hessian", counting)
        import qpeft_bench.quant.gptq as gptq

        monkeypatch.setattr(gptq, "hessian", counting)


@pytest.mark.parametrize("sequential", [True, False])
def test_calibration_statistics_held_are_one_blocks_when_sequential(monkeypatch, sequential):
    model = _random_llama(blocks=4)
    c = model.config
    windows = calibration.random_windows(c.vocab_size, 6, 32, seed=1)
    live = LiveHessians(monkeypatch)
    record = _quantize(model, "gptq", windows, sequential, bits=4, group_size=32)
    # one fp32 Hessian per distinct layer input of a block: q/k/v share the block input, gate/up the MLP input,
    # o_proj reads the heads' values and down_proj the MLP's intermediate activations
    attn_out = c.num_attention_heads * (c.hidden_size // c.num_attention_heads)
    one_block = 4 * (2 * c.hidden_size**2 + attn_out**2 + c.intermediate_size**2)
    expected = one_block if sequential else c.num_hidden_layers * one_block
    assert live.peak == expected  # measured on the tensors really alive
    assert record["calibration_stats_peak_bytes"] == expected  # and reported so in the record
    assert record["sequential"] is sequential


def test_the_first_block_is_the_same_in_both_modes_and_later_blocks_see_the_quantized_ones():
    windows = calibration.random_windows(128, 6, 32, seed=2)
    one = _random_llama(blocks=3)
    seq = _random_llama(blocks=3)
    _quantize(one, "gptq", windows, False, bits=3, group_size=32)
    _quantize(seq, "gptq", windows, True, bits=3, group_size=32)
    for name in NAMES:
        prefix = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        first = f"model.layers.0.{prefix}.{name}"
        assert torch.equal(one.get_submodule(first).qweight, seq.get_submodule(first).qweight), first
    later = [
        t for t in models.find_linears(one, NAMES) if not t.startswith("model.layers.0.")
    ]  # their inputs carry block 0's quantization error in sequential mode
    assert any(not torch.equal(one.get_submodule(t).qweight, seq.get_submodule(t).qweight) for t in later)


@torch.no_grad()
def _logit_error(model, reference, held):
    got, want = model(input_ids=held).logits, reference(input_ids=held).logits
    return float((got - want).norm() / want.norm())


def test_sequential_gptq_3bit_has_a_lower_output_error_than_one_pass_on_the_tiny_model():
    tok = models.load_tokenizer(TINY)
    texts = calibration.read_text(str(ASSETS / "data" / "tiny_text.txt"))
    w = calibration.token_windows(tok, texts, samples=40, seq_len=128, seed=0)
    calib, held = w[:32], w[32:]  # the error is measured on windows calibration never saw
    reference = models.load_model(TINY, "float32", "cpu")
    errors = {}
    for sequential in (False, True):
        model = models.load_model(TINY, "float32", "cpu")
        _quantize(model, "gptq", calib, sequential, bits=3, group_size=64)
        errors[sequential] = _logit_error(model, reference, held)
    assert errors[True] < errors[False], errors


def test_qeft_sequential_reorders_once_and_keeps_the_function_before_quantizing(monkeypatch):
    from qpeft_bench.quant import qeft

    model = _random_llama(blocks=2)
    windows = calibration.random_windows(128, 4, 32, seed=3)
    calls = []
    real = qeft.reorder_hidden
    monkeypatch.setattr(qeft, "reorder_hidden", lambda m, p: (calls.append(p), real(m, p)))
    record = _quantize(model, "qeft", windows, True, bits=4, group_size=32, k=8)
    assert len(calls) == 1 and record["sequential"]
    for t in models.find_linears(model, NAMES):
        layer = model.get_submodule(t)
        assert layer.contiguous == (not t.endswith("o_proj")), t


def test_a_quantizer_without_block_support_runs_in_one_pass_whatever_calib_sequential_says():
    model = _random_llama(blocks=2)
    windows = calibration.random_windows(128, 4, 32, seed=4)
    record = _quantize(model, "smoothquant", windows, True)
    assert record["sequential"] is False


def test_qeft_is_refused_when_the_model_is_brought_in_one_block_at_a_time():
    # its global vote runs every block before any is quantized: blocks not yet loaded would vote with garbage
    c = _random_llama(blocks=2).config
    arch = {"model_type": "llama", **{k: getattr(c, k) for k in ("hidden_size", "intermediate_size", "vocab_size")}}
    arch |= {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    model = models.empty_model(arch, "float32")
    targets = list(models.find_linears(model, NAMES))
    fill = models.layerwise(model, targets, models.TensorSource(None, "float32"), "cpu")
    windows = calibration.random_windows(128, 2, 16, seed=5)
    cfg = quant.get("qeft").Config(bits=4, group_size=32, k=8)
    with pytest.raises(ValueError, match="cannot be calibrated while the model is brought in one block at a time"):
        quant.quantize_model("qeft", model, targets, cfg, "float32", "cpu", windows=windows, fill=fill, sequential=True)


def test_gptq_brought_in_one_block_at_a_time_equals_the_loaded_model():
    # the same random weights either way: a model loaded whole, and one whose targets are filled block by block
    whole = _random_llama(blocks=2)
    source = {n: p.detach().clone() for n, p in whole.named_parameters()}

    class Source(models.TensorSource):
        def get(self, name, shape, device):
            return source[name].to(device)

    arch = {
        "model_type": "llama",
        **{
            k: getattr(whole.config, k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "vocab_size",
                "num_attention_heads",
                "num_key_value_heads",
                "max_position_embeddings",
            )
        },
        "num_hidden_layers": 2,
    }
    empty = models.empty_model(arch, "float32")
    targets = list(models.find_linears(empty, NAMES))
    fill = models.layerwise(empty, targets, Source(None, "float32"), "cpu")
    windows = calibration.random_windows(128, 4, 32, seed=6)
    cfg = quant.get("gptq").Config(bits=4, group_size=32)
    quant.quantize_model("gptq", empty, targets, cfg, "float32", "cpu", windows=windows, fill=fill, sequential=True)
    _quantize(whole, "gptq", windows, True, bits=4, group_size=32)
    for t in targets:
        assert torch.equal(empty.get_submodule(t).qweight, whole.get_submodule(t).qweight), t
