"""Per-layer-group knobs through every method that has them (lora and its presets, qbara, qahira, irqlora, qa_lora):
the adapter of each module has the shapes of its own knobs, saves and reloads onto a fresh quantized base with
identical logits, and refuses to load under other per-group knobs; plan-mode counts and compose-time checks for
irqlora and qa_lora."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from qpeft_bench import ASSETS, adapters, layers, models, plan, quant
from qpeft_bench.adapters import base
from qpeft_bench.config import ConfigError
from qpeft_bench.layers import TYPE_GROUPS
from qpeft_bench.spec import validate

NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GROUP_SIZE = 64  # rtn's groups, and QA-LoRA's pooling, which must equal them
IDS = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def quantized_base():
    """The embedded tiny LLaMA (4 blocks, 256 -> 768) with rtn 4-bit g64 on every linear (deterministic, so a
    second quantization is the same base); tests take deep copies."""
    model = models.load_model(str(ASSETS / "tiny_llama"), "float32", "cpu").eval()
    targets = list(models.find_linears(model, NAMES))
    qmod = quant.get("rtn")
    quant.quantize_model("rtn", model, targets, qmod.Config(bits=4, group_size=GROUP_SIZE), "float32", "cpu")
    return model, targets


def block(name: str) -> int:
    return layers.block_index(name)


def is_mlp(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in TYPE_GROUPS["mlp"]


# Each case: the method, its default knobs, the per-group overrides (cutting across type and depth, so that at least
# three distinct knob combinations occur), and the expected adapter tensor shapes of one module from its own knobs.
def _lora_shapes(c, i, o):
    shapes = {"lora_A": (c.r, i), "lora_B": (o, c.r)}
    return shapes | ({"lora_magnitude_vector": (o,)} if c.use_dora else {})


CASES = {
    "lora": ("lora", {"r": 8, "alpha": 16}, {"mlp": {"r": 4}, "second_half": {"alpha": 4}}, _lora_shapes),
    "dora_rslora": (
        "lora",
        {"r": 8, "alpha": 16, "use_dora": True, "use_rslora": True},
        {"attn": {"r": 2}, "first_half": {"alpha": 32}},
        _lora_shapes,
    ),
    "qbara": (
        "qbara",
        {"r": 4, "balance": 2},
        {"mlp": {"balance": 4}, "first_half": {"r": 2}},
        lambda c, i, o: {"A": (c.balance * c.r, i // c.balance), "B": (o // c.balance, c.balance * c.r)},
    ),
    "qahira": (
        "qahira",
        {"lambda1": 4, "lambda2": 8},
        {"mlp": {"lambda1": 8}, "second_half": {"lambda2": 4, "scale": 0.5}},
        lambda c, i, o: {"C": (o // c.lambda2, i // c.lambda1)},
    ),
    "irqlora": (
        "irqlora",
        {"r": 8, "alpha": 16},
        {"mlp": {"r": 16}, "first_half": {"alpha": 4}},
        lambda c, i, o: {"A": (c.r, i), "B": (o, c.r), "beta1": (1,), "beta2": (1,)},
    ),
    "qa_lora": (
        "qa_lora",
        {"r": 8, "alpha": 16, "group_size": GROUP_SIZE},
        {"mlp": {"r": 4}, "second_half": {"alpha": 8}},
        lambda c, i, o: {"A": (c.r, i // c.group_size), "B": (o, c.r)},
    ),
}


def adapter_shapes(model) -> dict[str, dict[str, tuple]]:
    """{module: {tensor: shape}} of the trainable tensors, for our wrappers (`<module>.adapter.<T>`) and peft's
    (`base_model.model.<module>.lora_<X>.default[.weight]`)."""
    out: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".adapter." in name:
            module, tensor = name.split(".adapter.")
        else:
            module, rest = name.removeprefix("base_model.model.").split(".lora_")
            tensor = "lora_" + rest.split(".")[0]
        out.setdefault(module, {})[tensor] = tuple(p.shape)
    return out


def per_module(amod, cfg, targets, by_layer) -> dict:
    """The per-module configs exactly as validate() resolves peft.by_layer (4 blocks in the tiny model)."""
    return layers.per_module_configs(cfg, sorted(targets), 4, by_layer, {}, amod.PER_LAYER_KNOBS, amod.__name__)


def perturb(model, seed: int) -> None:
    """Trained-looking adapters: B, C and the betas start at zero and would hide a tensor loaded into the wrong
    place. Adding (not replacing) keeps DoRA's magnitudes near the row norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_group_knobs_shape_each_module_and_survive_save_and_load(quantized_base, tmp_path, case):
    method, knobs, by_layer, expected_shapes = CASES[case]
    amod = adapters.get(method)
    cfg = amod.Config(**knobs, dropout=0.0, adapter_dtype="float32")
    base_model, targets = quantized_base
    plain = logits(copy.deepcopy(base_model))
    pm = per_module(amod, cfg, targets, by_layer)
    combos = {tuple(getattr(c, k) for k in amod.PER_LAYER_KNOBS) for c in pm.values()}
    assert len(combos) >= 3  # the overrides really make the modules differ (else the test proves nothing)

    with models.seeded(0):
        model = amod.attach(copy.deepcopy(base_model), targets, cfg, per_module=pm)
    sizes = {t: (base_model.get_submodule(t).in_features, base_model.get_submodule(t).out_features) for t in targets}
    assert adapter_shapes(model) == {t: expected_shapes(pm[t], *sizes[t]) for t in targets}
    perturb(model, 1)
    trained = logits(model)
    assert not torch.allclose(trained, plain)  # the adapters change the function

    amod.save(model, tmp_path, cfg, per_module=pm)
    saved = json.loads((tmp_path / base.CONFIG_FILE).read_text())
    differ = {t for t, c in pm.items() if any(getattr(c, k) != getattr(cfg, k) for k in amod.PER_LAYER_KNOBS)}
    if method == "lora":  # peft's own file: the per-group values are its rank_pattern / alpha_pattern
        assert set(saved["rank_pattern"]) | set(saved["alpha_pattern"]) == differ
    else:
        assert set(saved["per_module"]) == differ
    with models.seeded(7):  # another initialisation: only the loaded tensors may count
        loaded = amod.load(copy.deepcopy(base_model), targets, cfg, tmp_path, per_module=pm)
    assert adapter_shapes(loaded) == adapter_shapes(model)
    assert torch.equal(logits(loaded), trained)

    # Other per-group knobs: drop the depth override, which may change no shape at all (alpha, scale)
    other_by_layer = {g: v for g, v in by_layer.items() if g not in ("first_half", "second_half")}
    other = per_module(amod, cfg, targets, other_by_layer)
    name = next(
        t for t in sorted(targets) if any(getattr(pm[t], k) != getattr(other[t], k) for k in amod.PER_LAYER_KNOBS)
    )
    knob = next(k for k in amod.PER_LAYER_KNOBS if getattr(pm[name], k) != getattr(other[name], k))
    message = (
        f"{name}: the saved adapter has {knob}={getattr(pm[name], knob)}, the config asks "
        f"{knob}={getattr(other[name], knob)}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        amod.load(copy.deepcopy(base_model), targets, cfg, tmp_path, per_module=other)
    with pytest.raises(ValueError, match=r"model\.layers\.\d+\.\S+: the saved adapter has"):  # none: all default
        amod.load(copy.deepcopy(base_model), targets, cfg, tmp_path)


@pytest.mark.parametrize("case", ["qbara", "irqlora"])
def test_save_refuses_per_module_knobs_the_model_does_not_have(quantized_base, tmp_path, case):
    method, knobs, by_layer, _ = CASES[case]
    amod = adapters.get(method)
    cfg = amod.Config(**knobs, dropout=0.0, adapter_dtype="float32")
    base_model, targets = quantized_base
    model = amod.attach(copy.deepcopy(base_model), targets, cfg, per_module=per_module(amod, cfg, targets, by_layer))
    with pytest.raises(ValueError, match="the model has"):
        amod.save(model, tmp_path, cfg, per_module=per_module(amod, cfg, targets, {"attn": by_layer.get("mlp")}))


def test_a_uniform_adapter_saves_an_empty_per_module_and_loads_without_it(quantized_base, tmp_path):
    amod = adapters.get("qa_lora")
    cfg = amod.Config(r=4, group_size=GROUP_SIZE, dropout=0.0, adapter_dtype="float32")
    base_model, targets = quantized_base
    model = amod.attach(copy.deepcopy(base_model), targets, cfg)
    perturb(model, 2)
    amod.save(model, tmp_path, cfg)
    path = tmp_path / base.CONFIG_FILE
    meta = json.loads(path.read_text())
    assert meta["per_module"] == {}
    del meta["per_module"]  # a file written before per-group knobs existed
    path.write_text(json.dumps(meta))
    assert torch.equal(logits(amod.load(copy.deepcopy(base_model), targets, cfg, tmp_path)), logits(model))


# ---------------------------------------------------------------------------------------------------------------
# Plan mode on LLaMA-2-7B and compose-time checks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, extra",
    [
        ("irqlora", []),
        ("qa_lora", ["quant=rtn", "quant.group_size=64", "peft.group_size=64"]),
    ],
)
def test_plan_counts_follow_the_per_group_ranks(compose, method, extra):
    overrides = [
        "mode=plan",
        "model=llama2_7b",
        f"peft={method}",
        *extra,
        "peft.r=64",
        "peft.by_layer.mlp.r=32",
        "peft.by_layer.first_half.r=16",
    ]
    spec = validate(compose(overrides))
    acc = plan.plan_accounting(spec)
    shapes = models.linear_shapes(spec.model.arch_dict(), spec.model.dtype, spec.model.linear_names)
    n = spec.model.arch_dict()["num_hidden_layers"]

    def rank(name: str) -> int:  # depth beats type (layers.py)
        return 16 if block(name) < n // 2 else 32 if is_mlp(name) else 64

    if method == "irqlora":  # A (r, in), B (out, r), beta1, beta2
        expected = sum(rank(t) * (i + o) + 2 for t, (i, o) in shapes.items())
    else:  # A (r, in / L), B (out, r)
        expected = sum(rank(t) * (i // 64 + o) for t, (i, o) in shapes.items())
    assert acc["trainable_params"] == expected
    assert {t: c.r for t, c in spec.peft_per_module.items()} == {t: rank(t) for t in shapes}


@pytest.mark.parametrize("method, extra", [("irqlora", []), ("qa_lora", ["quant=rtn", "quant.group_size=64"])])
def test_per_group_knobs_compose_without_plus(compose, method, extra):
    spec = validate(compose([f"peft={method}", *extra, "peft.by_layer.mlp.r=16", "peft.by_layer.attn.alpha=4"]))
    assert spec.peft_per_module  # every adapted module, each with its own config
    for name, c in spec.peft_per_module.items():
        assert (c.r, c.alpha) == ((16, 16) if is_mlp(name) else (8, 4)), name


def test_an_irqlora_rank_that_does_not_divide_a_module_names_it(compose):
    # 48 divides the tiny model's 768 but not its 256: every MLP module has a 256 side, no attention module is hit
    with pytest.raises(
        ConfigError,
        match=r"peft\.r=48 does not divide (in|out)_features=256 of "
        r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
    ):
        validate(compose(["peft=irqlora", "peft.by_layer.mlp.r=48"]))
