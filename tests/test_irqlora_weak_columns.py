"""IR-QLoRA's IEC adapter and OWQ/QEFT weak-column tuning: parity with plain references, gradients, exact counts,
merge and save/reload identity, compose-time errors, and short end-to-end runs on the embedded tiny model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import FAST
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from qpeft_bench import adapters, calibration, models, plan, quant, recipe
from qpeft_bench.adapters import irqlora, weak_columns
from qpeft_bench.adapters.base import AdapterLinear, dense_weight
from qpeft_bench.config import ConfigError
from qpeft_bench.quant.weakcol import WeakColumnLinear
from qpeft_bench.spec import validate

NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ICQ = {"tau_points": 10}  # a coarse tau grid: the search is what costs time, not what is tested here
WEAK = {"owq": {"bits": 4, "k": 4, "group_size": 64}, "qeft": {"bits": 4, "k": 8, "group_size": 64}}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).float().eval()


def _quantize(model, qname: str, knobs: dict) -> list[str]:
    targets = list(models.find_linears(model, NAMES))
    qcfg = quant.get(qname).Config(**{**quant.preset(qname), **knobs})
    quant.quantize_model(
        qname, model, targets, qcfg, "float32", "cpu", windows=calibration.random_windows(256, 8, 32, 0)
    )
    return targets


def _ids(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _randomize_iec(model, seed: int = 3) -> None:
    """Trained-looking IEC parameters: B and both betas away from their zero start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if name.endswith(".B") else 0.5))


# ---------------------------------------------------------------------------------------------------------------
# IEC: forward parity, gradients
# ---------------------------------------------------------------------------------------------------------------


def _iec_reference(x, weight, bias, a, b, beta1, beta2, scale):
    """Deliberately plain, in fp64, one output at a time: u_i = A_i . x + beta1 * mean(x over input group i);
    y_o = W_o . x + bias_o + scale * (sum_i B_oi u_i + beta2 * u_{o // (out / r)}). Returns (y, delta)."""
    x, weight, bias, a, b = (t.double() for t in (x, weight, bias, a, b))
    r, n_in = a.shape
    n_out = b.shape[0]
    g_in, g_out = n_in // r, n_out // r
    flat = x.reshape(-1, n_in)
    ys, deltas = (
        torch.zeros(flat.shape[0], n_out, dtype=torch.float64),
        torch.zeros(flat.shape[0], n_out, dtype=torch.float64),
    )
    for t in range(flat.shape[0]):
        xt = flat[t]
        u = [float(a[i] @ xt) + beta1 * float(xt[i * g_in : (i + 1) * g_in].sum()) / g_in for i in range(r)]
        for o in range(n_out):
            d = scale * (sum(float(b[o, i]) * u[i] for i in range(r)) + beta2 * u[o // g_out])
            deltas[t, o] = d
            ys[t, o] = float(weight[o] @ xt) + float(bias[o]) + d
    return ys.reshape(*x.shape[:-1], n_out), deltas.reshape(*x.shape[:-1], n_out)


@pytest.mark.parametrize("base_kind", ["linear", "icq"])
def test_iec_forward_matches_plain_reference(base_kind):
    torch.manual_seed(0)
    n_in, n_out, r = 128, 96, 8  # groups of 16 inputs, blocks of 12 outputs
    layer = nn.Linear(n_in, n_out)
    if base_kind == "icq":
        layer = quant.get("icq").quantize_linear(layer, quant.get("icq").Config(**ICQ), "float32", "cpu")
    weight = dense_weight(layer).float()
    iec = irqlora.IECLinear(layer, r=r, alpha=12.0, dropout=0.0, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        iec.adapter["A"].copy_(torch.randn(r, n_in, generator=g) * 0.1)
        iec.adapter["B"].copy_(torch.randn(n_out, r, generator=g) * 0.1)
        iec.adapter["beta1"].fill_(0.7)
        iec.adapter["beta2"].fill_(-1.3)
    x = torch.randn(3, 5, n_in, generator=g)
    want_y, want_d = _iec_reference(
        x, weight, layer.bias.detach(), iec.adapter["A"].detach(), iec.adapter["B"].detach(), 0.7, -1.3, 12.0 / r
    )
    with torch.no_grad():
        got_d, got_y = iec.delta(x), iec(x)
    assert got_y.shape == (3, 5, n_out)
    assert _rel(got_d, want_d) < 1e-6 and _rel(got_y, want_y) < 1e-6
    assert float(got_d.norm() / got_y.norm()) > 0.1  # the adapter path is not negligible next to the base
    # each connection matters on its own (a wrong pooling or repetition would be caught above, not hidden)
    _, without_beta2 = _iec_reference(
        x, weight, layer.bias.detach(), iec.adapter["A"].detach(), iec.adapter["B"].detach(), 0.7, 0.0, 12.0 / r
    )
    assert _rel(got_d, without_beta2) > 0.05


def test_iec_gradients_pass_finite_difference_check():
    torch.manual_seed(0)
    n_in, n_out, r = 24, 12, 4
    layer = nn.Linear(n_in, n_out, dtype=torch.float64)
    iec = irqlora.IECLinear(layer, r=r, alpha=8.0, dropout=0.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    params = {
        f"adapter.{k}": torch.randn(v.shape, generator=g, dtype=torch.float64, requires_grad=True)
        for k, v in iec.adapter.items()
    }
    x = torch.randn(2, 3, n_in, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, a, b, beta1, beta2):
        values = dict(zip(params, (a, b, beta1, beta2), strict=True))
        return torch.func.functional_call(iec, values, (x,))

    assert torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-7)


def test_beta_gradients_are_nonzero_once_b_has_moved():
    model = _tiny_llama()
    targets = _quantize(model, "icq", ICQ)
    with models.seeded(0):
        model = irqlora.attach(model, targets, irqlora.Config(r=8, alpha=16, dropout=0.0, adapter_dtype="float32"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = _ids()

    def grads() -> dict[str, torch.Tensor]:
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "beta" in n}

    first = grads()
    assert len(first) == 2 * len(targets)
    # B = 0 and beta2 = 0 at the start: beta1's signal reaches the output only through them
    assert all(float(g.abs().max()) == 0 for n, g in first.items() if n.endswith("beta1"))
    assert all(float(g.abs().max()) > 0 for n, g in first.items() if n.endswith("beta2"))
    opt.step()
    second = grads()
    assert all(float(g.abs().max()) > 0 for g in second.values()), [n for n, g in second.items() if not g.any()]


# ---------------------------------------------------------------------------------------------------------------
# IEC: merge, save/reload, counts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qname, knobs", [("icq", ICQ), ("rtn", {"bits": 4, "group_size": 64}), ("nf4", {})])
def test_iec_merge_gives_the_same_outputs_with_no_adapter_left(qname, knobs):
    model = _tiny_llama()
    targets = _quantize(model, qname, knobs)
    base_logits = _logits(model)
    with models.seeded(0):
        model = irqlora.attach(model, targets, irqlora.Config(r=8, alpha=16, dropout=0.1, adapter_dtype="float32"))
    _randomize_iec(model)
    adapted = _logits(model)
    assert _rel(adapted, base_logits) > 1e-3  # the adapters really change the outputs
    merged = irqlora.merge(model)
    assert not any(isinstance(m, AdapterLinear) for m in merged.modules())
    assert all(type(merged.get_submodule(t)) is nn.Linear for t in targets)
    assert _rel(_logits(merged), adapted) <= 1e-5


def test_iec_save_and_load_onto_a_fresh_base_gives_identical_outputs(tmp_path):
    original = _tiny_llama()
    model, fresh = copy.deepcopy(original), copy.deepcopy(original)
    cfg = irqlora.Config(r=4, alpha=8, dropout=0.0, adapter_dtype="bfloat16")
    targets = _quantize(model, "icq", ICQ)
    with models.seeded(0):
        model = irqlora.attach(model, targets, cfg)
    _randomize_iec(model)
    irqlora.save(model, tmp_path, cfg)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (meta["format"], meta["version"], meta["method"]) == ("qpeft-bench/adapter", 1, "irqlora")

    _quantize(fresh, "icq", ICQ)
    with models.seeded(5):  # other initial values: only the loaded ones may count
        loaded = irqlora.load(fresh, targets, cfg, tmp_path)
    assert torch.equal(_logits(loaded), _logits(model))
    # alpha changes the outputs without changing a shape: only the saved config can tell
    with pytest.raises(ValueError, match=r"other knobs .*'alpha': \(8, 16\)"):
        irqlora.load(
            _tiny_llama(), targets, irqlora.Config(r=4, alpha=16, dropout=0.0, adapter_dtype="bfloat16"), tmp_path
        )


def test_iec_counts_are_exact_on_a_meta_model():
    arch = {
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    }
    model = models.build_meta_model(arch, "bfloat16")
    targets = list(models.find_linears(model, NAMES))
    r = 16
    model = irqlora.attach(model, targets, irqlora.Config(r=r))
    shapes = {
        n: (m.in_features, m.out_features)
        for n, m in models.find_linears(models.build_meta_model(arch, "bfloat16"), NAMES).items()
    }
    want = sum(r * i + o * r + 2 for i, o in shapes.values())
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for _, p in trainable) == want
    assert all(p.is_meta and p.dtype == torch.bfloat16 and ".adapter." in n for n, p in trainable)


# ---------------------------------------------------------------------------------------------------------------
# Weak-column tuning
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qname", sorted(WEAK))
def test_weak_columns_train_exactly_the_weak_parameters_with_correct_gradients(qname):
    model = _tiny_llama()
    targets = _quantize(model, qname, WEAK[qname])
    k = WEAK[qname]["k"]
    # the reference: the same network with every target an fp32 nn.Linear holding the dequantized weight
    reference = copy.deepcopy(model)
    for name in targets:
        layer = reference.get_submodule(name)
        lin = nn.Linear(layer.in_features, layer.out_features, bias=False)
        lin.weight.data = layer.dequantize().detach().float().clone()
        reference.set_submodule(name, lin)
    for p in reference.parameters():
        p.requires_grad_(False)
    for name in targets:
        reference.get_submodule(name).weight.requires_grad_(True)

    model = weak_columns.attach(model, targets, weak_columns.Config(k=k, adapter_dtype="float32"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"{t}.weak" for t in targets}
    assert sum(p.numel() for p in trainable.values()) == k * sum(model.get_submodule(t).out_features for t in targets)

    ids = _ids()
    losses = []
    for m in (model, reference):
        m.train()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(float(loss))
    # training splits x W^T into the frozen part and the weak columns' (no full weight gradient): the same function
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    for name in targets:
        layer = model.get_submodule(name)
        want = reference.get_submodule(name).weight.grad[:, layer.weak_idx.long()]
        assert float(want.abs().max()) > 0
        torch.testing.assert_close(layer.weak.grad, want, rtol=1e-4, atol=1e-7, msg=name)


def test_weak_columns_save_and_load_onto_a_fresh_base(tmp_path):
    original = _tiny_llama()
    model, fresh, other = copy.deepcopy(original), copy.deepcopy(original), copy.deepcopy(original)
    cfg = weak_columns.Config(k=4, adapter_dtype="float32")
    targets = _quantize(model, "owq", WEAK["owq"])
    model = weak_columns.attach(model, targets, cfg)
    before = _logits(model)
    with torch.no_grad():  # a trained-looking update of every weak column
        for t in targets:
            model.get_submodule(t).weak.add_(0.05 * torch.randn_like(model.get_submodule(t).weak))
    trained = _logits(model)
    assert _rel(trained, before) > 1e-3
    assert weak_columns.merge(model) is model and torch.equal(_logits(model), trained)  # nothing to merge
    weak_columns.save(model, tmp_path, cfg)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (meta["format"], meta["version"], meta["method"], meta["targets"]) == (
        "qpeft-bench/adapter",
        1,
        "weak_columns",
        sorted(targets),
    )

    _quantize(fresh, "owq", WEAK["owq"])
    assert torch.equal(_logits(weak_columns.load(fresh, targets, cfg, tmp_path)), trained)
    # a base that kept other columns must be refused, not silently given the wrong inputs' weights
    _quantize(other, "owq", WEAK["owq"])
    layer = other.get_submodule(targets[0])
    layer.weak_idx.copy_(torch.roll(layer.weak_idx, 1) + 1)
    with pytest.raises(ValueError, match="not the same quantized base"):
        weak_columns.load(other, targets, cfg, tmp_path)


def test_weak_columns_refuse_layers_without_weak_columns():
    model = _tiny_llama()
    targets = _quantize(model, "rtn", {"bits": 4, "group_size": 64})
    with pytest.raises(ConfigError, match="holds no weak columns"):
        weak_columns.attach(model, targets, weak_columns.Config(k=4))


# ---------------------------------------------------------------------------------------------------------------
# Compose-time errors, plan-mode counts, end to end
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["peft=irqlora", "peft.r=48"],
            "peft.r=48 does not divide in_features=256 of model.layers.0.self_attn.q_proj (256 -> 256)",
        ),
        (
            ["peft=irqlora", "peft.r=256"],
            "peft.r=256 does not divide out_features=128 of model.layers.0.self_attn.k_proj (256 -> 128)",
        ),
        (["peft=irqlora", "peft.dropout=1.0"], "peft.dropout=1.0 must lie in [0, 1)"),
        (
            ["peft=weak_columns"],
            "peft=weak_columns cannot run on quant=nf4: only owq and qeft keep 16-bit weak columns",
        ),
        (["peft=weak_columns", "quant=hqq"], "cannot run on quant=hqq"),
        (["peft=weak_columns", "quant=owq", "peft.k=4"], "peft.k=4 differs from quant.k=8"),
        (["peft=weak_columns", "quant=qeft", "quant.k=0"], "quant.k=0 keeps no weak column to train"),
    ],
)
def test_bad_combinations_fail_at_compose_time(compose, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    assert message in str(err.value)


def test_irqlora_composes_on_every_quantizer_and_k_follows_the_quantizer(compose):
    for qname in quant.names():
        assert validate(compose(["peft=irqlora", f"quant={qname}"])).peft_method == "irqlora"
    spec = validate(compose(["peft=weak_columns", "quant=qeft", "quant.k=16"]))
    assert (spec.peft.k, spec.peft.adapter_dtype) == (16, "bfloat16")
    assert adapters.unsupported(weak_columns, "qeft", spec.quant, spec.peft) is None


def _shapes(spec) -> dict[str, tuple[int, int]]:
    return models.linear_shapes(spec.model.arch_dict(), spec.model.dtype, spec.model.linear_names)


@pytest.mark.parametrize(
    "overrides",
    [
        ["peft=weak_columns", "quant=qeft"],
        ["peft=weak_columns", "quant=owq", "peft.adapter_dtype=float32"],
        ["peft=irqlora", "peft.r=32", "model=llama2_7b"],
    ],
)
def test_plan_mode_counts(compose, overrides):
    spec = validate(compose([*overrides, "mode=plan"]))
    acc = plan.plan_accounting(spec)
    shapes = _shapes(spec)
    if spec.peft_method == "irqlora":
        want = sum(32 * i + 32 * o + 2 for i, o in shapes.values())
        assert want == 32 * (4096 + 4096) * 4 * 32 + 32 * (4096 + 11008) * 3 * 32 + 2 * 7 * 32  # LLaMA-2-7B
        assert acc["peft_overhead_bytes"] == acc["adapter_bytes"] == 2 * want
    else:
        want = spec.quant.k * sum(o for _, o in shapes.values())
        elem = 4 if spec.peft.adapter_dtype == "float32" else 2
        assert acc["adapter_bytes"] == elem * want
        assert acc["peft_overhead_bytes"] == (elem - 2) * want  # the columns are already in the quantized model
    assert acc["trainable_params"] == want


@pytest.mark.parametrize(
    "overrides",
    [
        ["quant=icq", "quant.tau_points=10", "peft=irqlora"],
        ["quant=owq", "peft=weak_columns"],
        ["quant=qeft", "peft=weak_columns"],
    ],
)
def test_short_run_end_to_end(compose, tmp_path, overrides):
    config = compose([*FAST, *overrides, "calib.samples=8", "calib.seq_len=128"])
    assert recipe.run(config, tmp_path, progress=False) == "completed"
    rec = json.loads((tmp_path / "result.json").read_text())
    spec = validate(config)
    acc, planned = rec["accounting"], plan.plan_accounting(validate({**config, "mode": "plan"}))
    for key in ("trainable_params", "adapter_bytes", "peft_overhead_bytes"):
        assert acc[key] == planned[key], key
    shapes = _shapes(spec)
    if spec.peft_method == "irqlora":
        assert acc["trainable_params"] == sum(8 * i + 8 * o + 2 for i, o in shapes.values())
    else:
        assert acc["trainable_params"] == spec.quant.k * sum(o for _, o in shapes.values())
        assert acc["peft_overhead_bytes"] == 0
    assert all(math.isfinite(x) for x in rec["train"]["losses"])
    assert rec["eval"]["after"]["ppl_heldout"] != rec["eval"]["before"]["ppl_heldout"]  # training changed the model
    assert rec["adapter"]["method"] == spec.peft_method
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["method"] == spec.peft_method and len(saved["targets"]) == len(shapes)


def test_weak_column_layers_really_are_what_the_quantizers_produce():
    """Guards the assumption the module rests on: owq/qeft targets are WeakColumnLinear with a frozen `weak`."""
    for qname, knobs in WEAK.items():
        model = _tiny_llama()
        targets = _quantize(model, qname, knobs)
        layers = [model.get_submodule(t) for t in targets]
        assert all(isinstance(m, WeakColumnLinear) and not m.weak.requires_grad for m in layers)
        assert {m.weak.shape[1] for m in layers} == {knobs["k"]}
