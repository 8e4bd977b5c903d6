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


class _Source(models.TensorSource):
    """The weights of a model loaded whole, handed out by name."""

    def __init__(self, whole):
        super().__init__(None, "float32")
        self.values = {n: p.detach().clone() for n, p in whole.named_parameters()}

    def get(self, name, shape, device):
        return self.values[name].clone().to(device)


class _Counting(models.BlockLoader):
    """After each fill: the bytes of the target linears held in full precision (not meta, not yet quantized)."""

    peak = 0

    def __call__(self, target):
        super().__call__(target)
        held = [m.weight for m in self.model.modules() if type(m) is torch.nn.Linear and m.weight is not None]
        head = self.model.get_output_embeddings().weight
        self.peak = max(self.peak, sum(w.numel() * 4 for w in held if not w.is_meta and w is not head))


def _arch(model, blocks):
    keys = ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads")
    return {
        "model_type": "llama",
        **{k: getattr(model.config, k) for k in keys},
        "num_hidden_layers": blocks,
        "max_position_embeddings": model.config.max_position_embeddings,
    }


def _by_block(whole, blocks, qname, windows, **knobs):
    empty = models.empty_model(_arch(whole, blocks), "float32")
    targets = list(models.find_linears(empty, NAMES))
    loader = _Counting(empty, targets, _Source(whole), "cpu")
    cfg = quant.get(qname).Config(**knobs)
    record = quant.quantize_model(
        qname, empty, targets, cfg, "float32", "cpu", windows=windows, probe=windows[:1], fill=loader, sequential=True
    )
    return empty, targets, loader, record


def test_qeft_brought_in_one_block_at_a_time_equals_the_loaded_model_holding_one_block():
    # its global vote runs every block before any is quantized: each block is read in for the vote and freed, and
    # the reordering reaches the blocks not yet read through the permutation they keep until their weights arrive
    whole = _random_llama(blocks=3)
    windows = calibration.random_windows(128, 4, 32, seed=5)
    knobs = {"bits": 4, "group_size": 32, "k": 8}
    empty, targets, loader, record = _by_block(whole, 3, "qeft", windows, **knobs)
    _quantize(whole, "qeft", windows, True, **knobs)
    for t in targets:
        a, b = empty.get_submodule(t), whole.get_submodule(t)
        assert torch.equal(a.qweight, b.qweight) and torch.equal(
            quant.get("qeft").dequantize(a), quant.get("qeft").dequantize(b)
        ), t
    assert torch.equal(empty.get_input_embeddings().weight, whole.get_input_embeddings().weight)
    assert record["output_rel_error"] is not None  # the probe runs block by block too
    one_block = sum(
        whole.get_submodule(t).in_features * whole.get_submodule(t).out_features * 4
        for t in targets
        if t.startswith("model.layers.0.")
    )
    assert loader.peak == one_block


def test_gptq_brought_in_one_block_at_a_time_equals_the_loaded_model():
    # the same random weights either way: a model loaded whole, and one whose targets are filled block by block
    whole = _random_llama(blocks=2)
    windows = calibration.random_windows(128, 4, 32, seed=6)
    empty, targets, loader, record = _by_block(whole, 2, "gptq", windows, bits=4, group_size=32)
    expect = _quantize(whole, "gptq", windows, True, bits=4, group_size=32)
    for t in targets:
        assert torch.equal(empty.get_submodule(t).qweight, whole.get_submodule(t).qweight), t
    assert record["output_rel_error"] == expect["output_rel_error"]
    one_block = sum(
        whole.get_submodule(t).in_features * whole.get_submodule(t).out_features * 4
        for t in targets
        if t.startswith("model.layers.0.")
    )
    assert loader.peak == one_block  # one block's linears in full precision at a time, never two


def test_a_one_pass_quantizer_is_refused_on_a_model_brought_in_one_block_at_a_time():
    whole = _random_llama(blocks=2)
    windows = calibration.random_windows(128, 2, 16, seed=7)
    with pytest.raises(ValueError, match="cannot be calibrated while the model is brought in one block at a time"):
        _by_block(whole, 2, "smoothquant", windows)


def test_a_reordering_of_a_parameter_not_yet_read_is_applied_when_it_arrives():
    model = models.empty_model(_arch(_random_llama(blocks=1), 1), "float32")
    weight = model.model.layers[0].mlp.up_proj.weight
    assert weight.is_meta
    perm = torch.randperm(weight.shape[1], generator=torch.Generator().manual_seed(0))
    models.index_select_(weight, 1, perm)
    models.index_select_(weight, 1, perm)  # twice: applied in order
    values = torch.randn(weight.shape)

    class One(models.TensorSource):
        def get(self, name, shape, device):
            return values.clone()

    models.fill(model, ["model.layers.0.mlp.up_proj.weight"], One(None, "float32"), "cpu")
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, values[:, perm][:, perm])
    models.unload(model, ["model.layers.0.mlp.up_proj.weight"])
    assert model.model.layers[0].mlp.up_proj.weight.is_meta


@pytest.mark.parametrize("qname", ["nf4", "gptq"])
def test_a_non_finite_weight_is_named_not_quantized(qname):
    model = _random_llama(blocks=2)
    layer = model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        layer.weight[3, 5] = float("nan")
        layer.weight[0, 0] = float("inf")
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has 2 NaN or infinite values"):
        _quantize(model, qname, windows, True, **({"group_size": 32} if qname == "gptq" else {}))
    assert isinstance(model.model.layers[1].mlp.up_proj, torch.nn.Linear)  # left as it was
