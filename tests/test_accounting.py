"""Plan-mode accounting against the published LLaMA-2-7B figures, and plan against real on the tiny model."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import REFERENCE, measured_accounting

from qpeft_bench import accounting, adapters, plan
from qpeft_bench.spec import validate

GIB, MIB = 2**30, 2**20
IMPLEMENTED = set(adapters.names())
ADAPTER_ELEMENT_BYTES = {"lora": 2, "ia3": 4}  # bf16 LoRA factors; the thesis kept the IA3 vectors in fp32


def _reference_rows():
    return [r for r in csv.DictReader(open(REFERENCE / "accounting_llama2_7b.csv")) if r["method"] in IMPLEMENTED]


def _knobs(row) -> list[str]:
    return [f"peft.{k}={row[k]}" for k in ("r", "alpha") if row[k]]  # IA3 has neither


def test_reference_rows_are_exercised():
    # Every LoRA row of the thesis and the IA3 row are checked here.
    assert {r["method"] for r in _reference_rows()} == {"lora", "ia3"} and len(_reference_rows()) >= 5


@pytest.mark.parametrize("row", _reference_rows(), ids=lambda r: f"{r['method']}-r{r['r']}-a{r['alpha']}")
def test_plan_reproduces_published_llama2_7b_accounting(compose, row):
    spec = validate(compose(["mode=plan", "model=llama2_7b", "quant=nf4", f"peft={row['method']}", *_knobs(row)]))
    acc = plan.plan_accounting(spec)
    assert acc["trainable_params"] == int(row["trainable_params"])  # exactly: it follows from the shapes
    published_gib = float(row["quantized_size_published_GB"])
    assert acc["param_buffer_bytes"] / GIB == pytest.approx(published_gib, rel=0.005)
    # The published overhead is what qlora.py's set-up shows (fp32 norms, a pad-token row): within 1.2 %,
    # and our own overhead (adapters alone) differs from it by exactly that derived constant.
    published_mib = float(row["overhead_published_MB"])
    assert acc["qlora_recipe_overhead_bytes"] / MIB == pytest.approx(published_mib, rel=0.012)
    assert acc["qlora_recipe_overhead_bytes"] - acc["peft_overhead_bytes"] == 65 * 4096 * 2 + 2 * 4096 * 2
    elem = ADAPTER_ELEMENT_BYTES[row["method"]]
    assert acc["peft_overhead_bytes"] == acc["adapter_bytes"] == elem * acc["trainable_params"]
    assert acc["total_params"] == 6_738_415_616
    assert acc["trainable_pct"] == pytest.approx(100 * acc["trainable_params"] / acc["total_params"])


def test_nf4_double_quant_storage_matches_the_gpu_measurement(compose):
    # Measured on the lent H100 with bitsandbytes (docs/reference/gpu_baseline.md): parameters+buffers
    # 3,762,823,680 B plus absmax/double-quant state 103,013,248 B.
    acc = plan.plan_accounting(validate(compose(["mode=plan", "model=llama2_7b", "peft.r=64"])))
    assert acc["param_buffer_bytes"] == 3_762_823_680
    assert acc["quant_state_bytes"] == 103_013_248
    assert acc["quantized_model_bytes"] / GIB == pytest.approx(3.600, abs=0.0005)
    assert 4.12 < acc["bits_per_weight"] < 4.13


@pytest.mark.parametrize("model", ["llama_7b", "llama_13b", "llama2_13b", "llama2_70b", "llama3_8b", "opt_1_3b"])
def test_plan_mode_works_for_every_card(compose, model):
    acc = plan.plan_accounting(validate(compose(["mode=plan", f"model={model}", "peft.r=16"])))
    assert acc["quantized_model_bytes"] < acc["base_model_bytes"] / 2
    assert acc["trainable_params"] > 0


@pytest.mark.parametrize(
    "qname, overrides",
    [
        ("nf4", []),
        ("nf4", ["quant.double_quant=false"]),
        ("fp4", ["quant.blocksize=128"]),
        ("none", []),
        ("hqq", []),
        ("hqq", ["quant.nbits=2", "quant.group_size=32"]),
        ("hqq", ["quant.nbits=3"]),
        ("hqq", ["quant.nbits=1", "quant.axis=0"]),
        ("hqq", ["quant.nbits=8", "quant.group_size=128"]),
        ("rtn", []),
        ("rtn", ["quant.bits=2", "quant.group_size=64"]),
        ("rtn", ["quant.bits=8", "quant.symmetric=true"]),
        ("rtn", ["quant.bits=3"]),
        ("gptq", ["quant.bits=3", "quant.group_size=64"]),
        ("int8", []),
        ("smoothquant", []),
        ("icq", []),
        ("gptq", []),
        ("owq", []),
        ("qeft", []),
    ],
)
def test_plan_and_real_agree_on_the_tiny_model(compose, qname, overrides):
    spec = validate(compose([f"quant={qname}", "peft.r=4", *overrides]))
    planned = plan.plan_accounting(spec)
    real = measured_accounting(spec)

    for key in (
        "total_params",
        "base_model_bytes",
        "param_buffer_bytes",
        "quantized_model_bytes",
        "quant_state_bytes",
        "trainable_params",
        "adapter_bytes",
        "peft_overhead_bytes",
        "qlora_recipe_overhead_bytes",
    ):
        assert real[key] == planned[key], key  # exact: the storage formula is the format
    assert math.isclose(real["bits_per_weight"], planned["bits_per_weight"])
    if qname != "none":  # the quantized linears are stored in fewer bits than the 16-bit originals
        assert real["quantized_model_bytes"] < real["base_model_bytes"]
        assert real["bits_per_weight"] < 16


def test_accounting_functions_on_a_hand_built_model():
    # Independent reference: a two-layer model whose sizes we can count by hand.
    net = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=True), torch.nn.LayerNorm(4))
    net.register_buffer("scale", torch.zeros(3))
    assert accounting.param_buffer_bytes(net) == (8 * 4 + 4 + 4 + 4 + 3) * 4
    net[0].weight.requires_grad_(False)
    sizes = accounting.adapter_sizes(net, param_buffer_bytes_before=0, total_params=47)
    assert sizes["trainable_params"] == 4 + 4 + 4
    assert sizes["adapter_bytes"] == 12 * 4


@pytest.mark.parametrize("nbits, published_pb", [(4, 3_762_823_424), (2, 2_143_822_080)])
def test_plan_hqq_llama2_7b_matches_the_gpu_measurement(compose, nbits, published_pb):
    # docs/reference/gpu_baseline.md, measured with the hqq API on the lent H100: parameters+buffers as
    # printed, plus scale/zero in `meta` of 404,750,336 B (bf16, one of each per group of 64).
    acc = plan.plan_accounting(
        validate(compose(["mode=plan", "model=llama2_7b", "quant=hqq", f"quant.nbits={nbits}", "peft.r=64"]))
    )
    assert acc["param_buffer_bytes"] == pytest.approx(published_pb, rel=0.005)
    assert acc["quant_state_bytes"] == 404_750_336
    assert acc["bits_per_weight"] == pytest.approx(nbits + 0.5)
