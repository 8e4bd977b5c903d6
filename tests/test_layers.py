"""Layer groups and per-group PEFT knobs (issue 5): resolution of overlapping groups, plan counts, real runs."""

from __future__ import annotations

import json

import pytest
from conftest import FAST

from qpeft_bench import layers, plan, recipe
from qpeft_bench.config import ConfigError
from qpeft_bench.spec import validate

NAMES = [
    f"model.layers.{i}.{kind}"
    for i in range(4)
    for kind in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
]


def test_depth_overrides_type_and_user_groups_override_both():
    by_layer = {"mlp": {"r": 32}, "attn": {"alpha": 8}, "first_half": {"r": 16}, "odd": {"r": 4}}
    got = layers.resolve(NAMES, 4, by_layer, {"odd": r"layers\.3\..*q_proj"})
    assert got["model.layers.0.mlp.down_proj"] == {"r": 16}  # first half beats mlp
    assert got["model.layers.2.mlp.down_proj"] == {"r": 32}  # second half: the type group's value
    assert got["model.layers.1.self_attn.q_proj"] == {"alpha": 8, "r": 16}  # different knobs combine
    assert got["model.layers.2.self_attn.o_proj"] == {"alpha": 8}
    assert got["model.layers.3.self_attn.q_proj"] == {"alpha": 8, "r": 4}  # the user group is the most specific


def test_halves_split_by_block_index_with_the_middle_block_in_the_second_half():
    assert layers.members("first_half", "model.layers.1.mlp.up_proj", 5, {})
    assert layers.members("second_half", "model.layers.2.mlp.up_proj", 5, {})
    assert layers.members("mlp", "model.decoder.layers.0.fc1", 24, {})  # OPT names
    assert layers.members("attn", "model.decoder.layers.0.self_attn.out_proj", 24, {})


def test_plan_counts_follow_the_per_group_ranks(compose):
    overrides = ["mode=plan", "model=llama2_7b", "peft.r=64", "peft.by_layer.mlp.r=32", "peft.by_layer.first_half.r=16"]
    spec = validate(compose(overrides))
    acc = plan.plan_accounting(spec)
    arch = spec.model.arch_dict()
    h, f, n = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    attn, mlp = 4 * (h + h), 3 * (h + f)  # r * (in + out) per module, summed per block
    expected = n // 2 * (attn + mlp) * 16 + (n - n // 2) * (attn * 64 + mlp * 32)
    assert acc["trainable_params"] == expected
    ranks = {name: c.r for name, c in spec.peft_per_module.items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 16 and ranks["model.layers.31.mlp.up_proj"] == 32
    assert ranks["model.layers.31.self_attn.v_proj"] == 64


def test_a_real_run_records_and_applies_the_per_module_knobs(compose, tmp_path):
    config = compose([*FAST, "peft.by_layer.mlp.r=4", "peft.by_layer.second_half.alpha=4"])
    assert recipe.run(config, tmp_path, progress=False) == "completed"
    rec = json.loads((tmp_path / "result.json").read_text())
    pl = rec["peft_layers"]
    assert pl["model.layers.0.mlp.up_proj"] == {"r": 4, "alpha": 16}
    assert pl["model.layers.3.mlp.up_proj"] == {"r": 4, "alpha": 4}
    assert pl["model.layers.0.self_attn.k_proj"] == {"r": 8, "alpha": 16}
    planned = plan.plan_accounting(validate({**config, "mode": "plan"}))
    assert rec["accounting"]["trainable_params"] == planned["trainable_params"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+peft.by_layer.middle.r=4"], "unknown layer group"),
        (["+peft.by_layer.mlp.dropout=0.1"], "dropout cannot be set per layer group for peft.method=lora"),
        (["peft=ia3", "+peft.by_layer.mlp.r=4"], "per-group knobs: none"),
        (
            ["peft=qbara", "peft.by_layer.attn.balance=3"],
            "peft.balance=3 does not divide in_features=256 of model.layers.0",
        ),
        (["+peft.layer_groups.none_such=lm_head", "+peft.by_layer.none_such.r=4"], "matches no adapted module"),
        (["+peft.layer_groups.attn=q_proj"], "is a built-in group"),
        (["peft.by_layer.mlp.r=0"], "peft.by_layer.mlp.r=0 must be > 0"),  # named by the knob, not a module
        (["peft.by_layer.attn.r=300"], "peft.r=300 exceeds min"),
    ],
)
def test_bad_per_group_settings_fail_before_loading(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


@pytest.mark.parametrize(
    "option, overrides, knob, values",
    [
        ("qbara", ["peft.by_layer.mlp.balance=4", "peft.by_layer.first_half.r=4"], "balance", (2, 4)),
        ("qahira", ["peft.by_layer.mlp.lambda1=8", "peft.by_layer.mlp.lambda2=8"], "lambda1", (4, 8)),
    ],
)
def test_our_pooled_adapters_take_per_group_knobs(compose, tmp_path, option, overrides, knob, values):
    config = compose([*FAST, f"peft={option}", *overrides])
    spec = validate(config)
    assert {getattr(c, knob) for c in spec.peft_per_module.values()} == set(values)
    assert recipe.run(config, tmp_path, progress=False) == "completed"  # attach() verifies every module
    rec = json.loads((tmp_path / "result.json").read_text())
    assert rec["peft_layers"]["model.layers.3.mlp.down_proj"][knob] == values[1]
    assert rec["peft_layers"]["model.layers.3.self_attn.q_proj"][knob] == values[0]
    planned = plan.plan_accounting(validate({**config, "mode": "plan"}))
    assert rec["accounting"]["trainable_params"] == planned["trainable_params"]


# ---------------------------------------------------------------------------------------------------------------
# peft.variant: the same overrides relative to the method's defaults (what sweeps cross)
# ---------------------------------------------------------------------------------------------------------------


def test_variant_edits_divide_multiply_and_set_relative_to_the_defaults():
    got = layers.apply_variant(
        ["mlp.r/4", "attn.alpha*2", "first_half.balance:3"], {"attn": {"r": None}}, {"r": 64, "alpha": 16, "balance": 2}
    )
    assert got == {"attn": {"r": None, "alpha": 32}, "mlp": {"r": 16}, "first_half": {"balance": 3}}
    # an edit that agrees with an explicit by_layer value is fine; one that contradicts it is not
    assert layers.apply_variant(["mlp.r/2"], {"mlp": {"r": 32}}, {"r": 64}) == {"mlp": {"r": 32}}


@pytest.mark.parametrize(
    "variant, message",
    [
        (["mlp.r/3"], "r=64 is not divisible by 3"),
        (["mlp.r/0"], "r=64 is not divisible by 0"),
        (["mlp.rank/2"], "the method has no knob 'rank'"),
        (["mlp.r=2"], "is not <group>.<knob>/<n>"),
        (["mlp.r:two"], "'two' is not a number"),
        (["mlp.r/2", "mlp.r/4"], "already; set it in one place"),
    ],
)
def test_bad_variants_are_one_clear_error(variant, message):
    with pytest.raises(ConfigError, match=message):
        layers.apply_variant(variant, {}, {"r": 64, "alpha": 16})


def test_a_variant_composes_into_per_module_knobs(compose):
    spec = validate(compose(["mode=plan", "model=llama2_7b", "peft.r=64", "peft.variant=[second_half.r/4]"]))
    ranks = {name: c.r for name, c in spec.peft_per_module.items()}
    assert ranks["model.layers.31.mlp.down_proj"] == 16 and ranks["model.layers.0.mlp.down_proj"] == 64
    with pytest.raises(ConfigError, match="peft.variant: 'mlp.r/2' sets mlp.r=32, but peft.by_layer.mlp.r=8"):
        validate(
            compose(["mode=plan", "model=llama2_7b", "peft.r=64", "peft.variant=[mlp.r/2]", "peft.by_layer.mlp.r=8"])
        )
    with pytest.raises(ConfigError, match="the method has no knob 'r'"):
        validate(compose(["peft=ia3", "+peft.variant=[mlp.r/2]"]))
