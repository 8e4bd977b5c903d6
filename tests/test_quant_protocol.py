"""Every quantizer module of the table satisfies `quant.QuantizerModule`, and `quant.owner` maps each quantized layer
back to the module that made it: the capabilities consumers ask for are declared by the quantizer that has them."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

from qpeft_bench import adapters, quant

FLAGS = [m for m in quant.OPTIONAL if m.isupper() and m not in ("FAMILIES", "FAMILIES_WHY")]
IN_F, OUT_F = 64, 32


@pytest.mark.parametrize("name", quant.names())
def test_every_module_has_the_members_of_the_protocol_with_their_types(name):
    qmod = quant.get(name)
    assert dataclasses.is_dataclass(qmod.Config) and isinstance(qmod.Config, type)
    for member in quant.REQUIRED[1:]:
        assert callable(getattr(qmod, member)), (name, member)
        # the protocol's parameters, less self
        want = list(inspect.signature(getattr(quant.QuantizerModule, member)).parameters)[1:]
        assert len(inspect.signature(getattr(qmod, member)).parameters) >= len(want), (name, member)
    for flag in FLAGS:
        assert isinstance(quant.capability(qmod, flag), bool), (name, flag)
    families = quant.capability(qmod, "FAMILIES")
    assert families is None or (isinstance(families, tuple) and all(isinstance(f, str) for f in families))
    for member in ("prepare", "zero_points", "set_zero_points"):
        assert callable(quant.capability(qmod, member)), (name, member)
    assert hasattr(qmod, "zero_points") == hasattr(qmod, "set_zero_points"), name  # who reports them can store new
    assert all(isinstance(c, type) for c in qmod.layer_classes())
    unknown = {m for m in vars(qmod) if m.isupper() and m.endswith(("_TESTED", "_BASE", "_SHARDABLE"))} - set(FLAGS)
    assert not unknown, f"{name}: {unknown} look like capabilities the protocol does not list"


def test_capability_defaults_come_from_the_protocol():
    assert quant.capability("none", "NEEDS_CALIBRATION") is False and quant.capability("gptq", "NEEDS_CALIBRATION")
    assert quant.capability(None, "FUSED_LORA_BASE") is False  # a layer no quantizer owns
    assert quant.capability("rtn", "prepare")(None, [], None, None, "cpu") == {}
    with pytest.raises(AttributeError, match="not an optional member"):
        quant.capability("none", "Config")


def test_the_capability_table():
    # what the consumers' former lists and class-name strings said, now declared by each quantizer
    assert quant.names_where("FSDP_SHARDABLE") == ("none", "nf4", "fp4")
    assert set(quant.names_where("FUSED_LORA_BASE")) == {"none", "nf4", "fp4", "hqq", "rtn", "gptq", "icq"}
    assert set(quant.names_where("COMPILE_TESTED")) == {"nf4", "fp4", "hqq", "rtn", "qeft", "owq"}
    assert set(quant.names_where("QUANTIZES_ACTIVATIONS")) == {"int8", "smoothquant"}
    assert set(quant.names_where("OUTPUT_FOLLOWS_INPUT_DTYPE")) == {"nf4", "fp4", "int8"}
    assert set(quant.names_where("PROCESS_REUSE")) == {"none", "nf4", "fp4", "rtn", "gptq"}
    assert set(quant.names_where("PEFT_WRAPS")) == {"none", "nf4", "fp4", "int8", "hqq"}
    assert set(quant.names_where("GROUP_ZERO_POINTS")) == {"rtn", "gptq", "hqq"}
    assert set(quant.names_where("WEAK_COLUMNS")) == {"owq", "qeft"}


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN_F, OUT_F, bias=True)


def _layer(name: str) -> nn.Module:
    """A tiny quantized layer of quantizer `name`, on the CPU (a Hessian of random inputs where one is needed)."""
    qmod = quant.get(name)
    knobs = {"group_size": 32} if "group_size" in {f.name for f in dataclasses.fields(qmod.Config)} else {}
    knobs |= {"k": 4} if name in ("owq", "qeft") else {}
    knobs |= {"tau_points": 5} if name == "icq" else {}
    cfg = qmod.Config(**{**quant.preset(name), **knobs})
    x = torch.randn(256, IN_F)
    hessian = 2 * x.T @ x / x.shape[0]
    stats = {"gptq": hessian, "owq": hessian, "qeft": (hessian, torch.arange(4))}.get(name)
    return qmod.quantize_linear(_linear(), cfg, "float32", "cpu", stats)


@pytest.mark.parametrize("name", quant.names())
def test_owner_maps_each_quantized_layer_to_its_module(name):
    qmod = quant.get(name)
    layer = _layer(name)
    owner = quant.owner(layer)
    assert owner is not None and type(layer) in owner.layer_classes(), (name, type(layer))
    # a module whose layer class another declares first (gptq: RTN's format; qeft: OWQ's) shares that format,
    # and the capabilities of the layer with it
    assert owner is qmod or qmod.layer_classes() == owner.layer_classes(), (name, owner)
    flags = ("FUSED_LORA_BASE", "QUANTIZES_ACTIVATIONS", "OUTPUT_FOLLOWS_INPUT_DTYPE", "PEFT_WRAPS", "WEAK_COLUMNS")
    for flag in (*flags, "GROUP_ZERO_POINTS"):
        assert quant.capability(owner, flag) == quant.capability(qmod, flag), (name, flag)
    assert owner.dequantize(layer).numel() == IN_F * OUT_F
    # the flags say what the layer has: zero points to merge into, weak columns to train
    assert (quant.capability(owner, "zero_points")(layer) is not None) == quant.capability(qmod, "GROUP_ZERO_POINTS")
    assert hasattr(layer, "weak") == quant.capability(qmod, "WEAK_COLUMNS"), name


def test_owner_of_plain_and_unknown_layers():
    assert quant.owner(nn.Linear(4, 4)) is quant.get("none")
    assert quant.owner(nn.LayerNorm(4)) is None


def test_the_method_capability_table():
    # declared by the method module (adapters.OPTIONAL's defaults elsewhere), read by speedups.py and distributed.py
    assert adapters.names_where("FUSED_LORA") == ("lora",) == adapters.names_where("FSDP_SHARDABLE")
    assert all(isinstance(adapters.capability(m, "FUSED_LORA"), bool) for m in adapters.names())
    with pytest.raises(KeyError):
        adapters.capability("lora", "FUSABLE")
