"""Q-BaRA and QA-HiRA (adapters/qbara.py, adapters/qahira.py): parity with plain references, gradients, exact
parameter counts, merges (into zero points and into a dequantized base), save/reload, compose-time errors, every
quantizer, and short runs end to end."""

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
from qpeft_bench.adapters import base
from qpeft_bench.config import ConfigError
from qpeft_bench.spec import validate

NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
qbara, qahira = adapters.get("qbara"), adapters.get("qahira")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Deliberately plain references: pooling and repetition as explicit matrices built entry by entry
# ---------------------------------------------------------------------------------------------------------------


def pool_matrix(n: int, k: int) -> torch.Tensor:
    """(n / k, n): row i averages inputs i*k .. i*k + k - 1."""
    p = torch.zeros(n // k, n)
    for j in range(n):
        p[j // k, j] = 1.0 / k
    return p


def repeat_matrix(n: int, k: int) -> torch.Tensor:
    """(n * k, n): output o copies input o // k."""
    r = torch.zeros(n * k, n)
    for o in range(n * k):
        r[o, o // k] = 1.0
    return r


def qbara_reference_weight(a, b, lam: int, scale: float, in_f: int, out_f: int) -> torch.Tensor:
    return scale * repeat_matrix(out_f // lam, lam) @ b @ a @ pool_matrix(in_f, lam)


def qahira_reference_weight(c, lam1: int, lam2: int, scale: float, in_f: int, out_f: int) -> torch.Tensor:
    return scale * repeat_matrix(out_f // lam2, lam2) @ c @ pool_matrix(in_f, lam1)


def _linear(in_f: int, out_f: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=True)
    lin.requires_grad_(False)
    return lin


def _randomize(layer: nn.Module, seed: int, std: float = 0.1) -> None:
    """Adapter tensors random (B and C would otherwise start at zero and hide every mistake)."""
    g = gen(seed)
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


QBARA_CASES = [(256, 128, 4, 2), (128, 256, 2, 4), (96, 64, 3, 1), (64, 64, 8, 8)]  # in, out, r, balance
QAHIRA_CASES = [(256, 128, 4, 8), (128, 256, 8, 8), (96, 64, 3, 2), (64, 64, 1, 1)]  # in, out, lambda1, lambda2


@pytest.mark.parametrize("in_f, out_f, r, lam", QBARA_CASES)
def test_qbara_matches_plain_reference_and_its_gradients(in_f, out_f, r, lam):
    alpha = 7.0
    layer = qbara.QBaRALinear(_linear(in_f, out_f, 0), r, lam, alpha, 0.0, torch.float32)
    _randomize(layer, 1)
    a, b = layer.adapter.A, layer.adapter.B
    assert a.shape == (lam * r, in_f // lam) and b.shape == (out_f // lam, lam * r)
    assert a.numel() + b.numel() == r * (in_f + out_f)  # LoRA's count at the same r

    x = torch.randn(3, 5, in_f, generator=gen(2))
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    w_ref = qbara_reference_weight(a_ref, b_ref, lam, alpha / r, in_f, out_f)
    delta_ref = x @ w_ref.T
    assert rel(layer.delta(x), delta_ref) < 1e-6
    assert rel(layer(x), layer.base(x) + delta_ref) < 1e-6
    assert rel(layer.delta_weight(), w_ref) < 1e-6

    g = torch.randn(3, 5, out_f, generator=gen(3))
    (layer(x) * g).sum().backward()
    ((layer.base(x) + delta_ref) * g).sum().backward()
    assert rel(a.grad, a_ref.grad) < 1e-6 and rel(b.grad, b_ref.grad) < 1e-6
    assert layer.base.weight.grad is None


@pytest.mark.parametrize("in_f, out_f, lam1, lam2", QAHIRA_CASES)
def test_qahira_matches_plain_reference_and_its_gradients(in_f, out_f, lam1, lam2):
    scale = 0.3
    layer = qahira.QAHiRALinear(_linear(in_f, out_f, 0), lam1, lam2, scale, "zeros", 0.0, torch.float32)
    c = layer.adapter.C
    assert c.shape == (out_f // lam2, in_f // lam1) and c.numel() == in_f * out_f // (lam1 * lam2)
    x = torch.randn(4, in_f, generator=gen(2))
    # zeros: the wrapped layer starts as the base itself, yet C (the only factor) already gets a gradient
    assert torch.equal(layer(x), layer.base(x))
    layer(x).square().sum().backward()
    assert c.grad.abs().sum() > 0
    c.grad = None

    _randomize(layer, 1)
    c_ref = c.detach().clone().requires_grad_()
    w_ref = qahira_reference_weight(c_ref, lam1, lam2, scale, in_f, out_f)
    delta_ref = x @ w_ref.T
    assert rel(layer.delta(x), delta_ref) < 1e-6
    assert rel(layer(x), layer.base(x) + delta_ref) < 1e-6
    assert rel(layer.delta_weight(), w_ref) < 1e-6
    g = torch.randn(4, out_f, generator=gen(3))
    (layer(x) * g).sum().backward()
    ((layer.base(x) + delta_ref) * g).sum().backward()
    assert rel(c.grad, c_ref.grad) < 1e-6


def test_finite_difference_gradients_in_float64():
    lin = _linear(16, 8, 0).double()
    layers = [
        qbara.QBaRALinear(lin, 2, 2, 4.0, 0.0, torch.float64),
        qahira.QAHiRALinear(lin, 4, 2, 0.5, "kaiming", 0.0, torch.float64),
    ]
    x = torch.randn(3, 16, dtype=torch.float64, generator=gen(0))
    for layer in layers:
        _randomize(layer, 1)
        names = [n for n, _ in layer.adapter.named_parameters()]

        def delta(*values, layer=layer, names=names):
            """layer.delta(x) with the adapter tensors replaced by `values`, so gradcheck can perturb them."""
            state = {f"adapter.{n}": v for n, v in zip(names, values, strict=True)}
            return torch.func.functional_call(layer, state, (x,), strict=False) - layer.base(x)

        inputs = tuple(p.detach().clone().requires_grad_() for p in layer.adapter.parameters())
        assert torch.autograd.gradcheck(delta, inputs)


def test_initialisation_and_dtypes():
    lin = _linear(128, 64, 0)
    layer = qbara.QBaRALinear(lin, 4, 2, 16, 0.05, torch.bfloat16)
    assert layer.adapter.A.dtype == layer.adapter.B.dtype == torch.bfloat16
    assert torch.count_nonzero(layer.adapter.B) == 0 and torch.count_nonzero(layer.adapter.A) > 0
    bound = (1 / (128 // 2)) ** 0.5  # LoRA's A: Kaiming-uniform with a = sqrt(5) -> U(-1/sqrt(fan_in), +)
    assert float(layer.adapter.A.float().abs().max()) <= bound
    assert float(layer.adapter.A.float().abs().max()) > 0.9 * bound
    hira = qahira.QAHiRALinear(lin, 4, 8, 0.25, "zeros", 0.0, torch.float32)
    assert torch.count_nonzero(hira.adapter.C) == 0
    assert qahira.Config().init == "kaiming"  # the authors' code: C is peft's lora_A (docs/fidelity.md)
    hira_k = qahira.QAHiRALinear(lin, 4, 8, 0.25, "kaiming", 0.0, torch.float32)
    assert 0.9 * (1 / 32) ** 0.5 < float(hira_k.adapter.C.abs().max()) <= (1 / 32) ** 0.5
    # bf16 adapter, fp32 base: the output stays in the base's dtype
    layer.train(False)
    assert layer(torch.randn(2, 128)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Whole models: counts, meta device, verification
# ---------------------------------------------------------------------------------------------------------------


def _tiny_llama(dtype=torch.float32) -> LlamaForCausalLM:
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
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _targets(model) -> list[str]:
    return list(models.find_linears(model, NAMES))


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_counts_equal_lora_and_the_formulas_on_a_model():
    model = _tiny_llama()
    shapes = {n: (m.in_features, m.out_features) for n, m in models.find_linears(model, NAMES).items()}
    lora_model = adapters.get("lora").attach(
        _tiny_llama(), _targets(model), adapters.get("lora").Config(r=4, alpha=8, dropout=0.0)
    )
    m = qbara.attach(model, _targets(model), qbara.Config(r=4, balance=4))
    assert (
        _trainable(m)
        == _trainable(lora_model)
        == sum(4 * (i + o) for i, o in shapes.values())
        == 4 * 2 * (2 * 256 + 2 * 192 + 3 * 384)
    )
    m = qahira.attach(_tiny_llama(), _targets(model), qahira.Config(lambda1=4, lambda2=8))
    assert _trainable(m) == sum(i * o // 32 for i, o in shapes.values())
    # everything else is frozen
    assert all(".adapter." in n for n, p in m.named_parameters() if p.requires_grad)


def test_attach_on_the_meta_device():
    meta = models.build_meta_model(_tiny_llama().config.to_dict(), "bfloat16")
    targets = _targets(meta)
    meta = qahira.attach(meta, targets, qahira.Config(lambda1=8, lambda2=8))
    params = [p for p in meta.parameters() if p.requires_grad]
    assert params and all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in params)
    meta = models.build_meta_model(_tiny_llama().config.to_dict(), "bfloat16")
    meta = qbara.attach(meta, targets, qbara.Config(r=2, balance=2, adapter_dtype="float32"))
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in meta.parameters() if p.requires_grad)


def test_plan_mode_counts_on_llama2_7b(compose):
    overrides = ["mode=plan", "model=llama2_7b"]
    lora = plan.plan_accounting(validate(compose([*overrides, "peft=lora", "peft.r=64"])))
    bara = plan.plan_accounting(validate(compose([*overrides, "peft=qbara", "peft.r=64"])))
    assert bara["trainable_params"] == lora["trainable_params"] == 159_907_840  # QLoRA's published r=64 count
    spec = validate(compose([*overrides, "peft=qahira"]))
    shapes = models.linear_shapes(spec.model.arch_dict(), spec.model.dtype, spec.model.linear_names)
    hira = plan.plan_accounting(spec)
    assert hira["trainable_params"] == sum(i * o // (4 * 8) for i, o in shapes.values())
    assert hira["adapter_bytes"] == 2 * hira["trainable_params"]  # bf16


def test_verification_catches_a_wrong_layer():
    model = qbara.attach(_tiny_llama(), _targets(_tiny_llama()), qbara.Config(r=2, balance=2))
    name = _targets(model)[3]
    model.get_submodule(name).scale = 99.0
    with pytest.raises(RuntimeError, match=f"{name}: adapter has"):
        qbara.verify(model, _targets(model), qbara.Config(r=2, balance=2))
    with pytest.raises(RuntimeError, match="missing"):
        qbara.verify(model, [*_targets(model), "model.layers.0.mlp.nothing"], qbara.Config(r=2, balance=2))


# ---------------------------------------------------------------------------------------------------------------
# Every quantizer: a training step
# ---------------------------------------------------------------------------------------------------------------

WINDOWS = calibration.random_windows(256, 4, 32, 0)
IDS = torch.randint(0, 256, (2, 16), generator=gen(5))


def _quantized(qname: str, dtype=torch.float32, compute="float32", **knobs):
    model = _tiny_llama(dtype)
    qmod = quant.get(qname)
    quant.quantize_model(
        qname, model, _targets(model), qmod.Config(**{**quant.preset(qname), **knobs}), compute, "cpu", windows=WINDOWS
    )
    return model


@pytest.mark.parametrize("qname", quant.names())
def test_a_training_step_on_every_quantizer(qname):
    knobs = {"tau_points": 11} if qname == "icq" else {}  # ICQ's entropy search is the slow part; 11 suffice here
    quantized = _quantized(qname, torch.bfloat16, "bfloat16", **knobs)
    for amod, cfg in ((qbara, qbara.Config(r=2, balance=2)), (qahira, qahira.Config(lambda1=4, lambda2=8))):
        assert amod.unsupported(qname, None, cfg) is None
        with models.seeded(0):
            model = amod.attach(copy.deepcopy(quantized), _targets(quantized), cfg)
        model.train()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        assert torch.isfinite(loss), (qname, amod.METHOD)
        # Q-BaRA's B and QA-HiRA's C (zero at the start) get gradients on every layer
        learners = [(n, p) for n, p in trainable if n.endswith((".B", ".C"))]
        assert len(learners) == 14 and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in learners), qname
        before = [p.detach().clone() for _, p in learners]
        opt.step()
        assert all(not torch.equal(b, p) for b, (_, p) in zip(before, learners, strict=True))


def test_adapter_gradients_through_nf4_equal_those_through_its_dequantized_weights():
    """The base's backward carries the gradient of later layers' adapters back to earlier ones: through NF4 it
    must equal that of an fp32 copy holding the dequantized weights (docs/design.md §7's CPU kernel caveat)."""
    qmodel = _quantized("nf4")
    reference = _quantized("nf4")
    qmod = quant.get("nf4")
    for name in _targets(reference):
        mod = reference.get_submodule(name)
        lin = nn.Linear(mod.in_features, mod.out_features, bias=False)
        lin.weight.data = qmod.dequantize(mod).float().reshape(mod.out_features, mod.in_features)
        reference.set_submodule(name, lin)
    grads = []
    for model in (qmodel, reference):
        with torch.no_grad():
            model(input_ids=IDS)  # an eval-mode forward first, as the evaluation before fine-tuning does
        with models.seeded(0):  # the same random C (the default init) on both
            model = qahira.attach(model, _targets(model), qahira.Config(dropout=0.0, adapter_dtype="float32"))
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[1].items():
        assert rel(grads[0][name], g) < 1e-4, name


# ---------------------------------------------------------------------------------------------------------------
# Merges
# ---------------------------------------------------------------------------------------------------------------


def _randomize_model(model, seed: int) -> None:
    """Random adapters that move the logits by some 10-20 %, like a trained adapter (not by 100 %)."""
    for layer in model.modules():
        if isinstance(layer, base.AdapterLinear):
            _randomize(layer, seed, std=0.03)
            seed += 1


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


MERGES = [
    # quantizer and knobs, method, config, exact merge into the zero points?
    ("rtn", {"bits": 4, "group_size": 32}, "qbara", {"r": 2, "balance": 32}, True),
    ("rtn", {"bits": 4, "group_size": 32}, "qbara", {"r": 4, "balance": 64}, True),
    ("rtn", {"bits": 4, "group_size": 32}, "qahira", {"lambda1": 32, "lambda2": 4}, True),
    ("gptq", {"bits": 3, "group_size": 32}, "qahira", {"lambda1": 64, "lambda2": 8}, True),
    ("hqq", {"nbits": 4, "group_size": 32}, "qbara", {"r": 2, "balance": 64}, True),
    ("hqq", {"nbits": 2, "group_size": 64}, "qahira", {"lambda1": 64, "lambda2": 2}, True),
    ("owq", {"bits": 4, "group_size": 32, "k": 4}, "qbara", {"r": 2, "balance": 32}, False),  # weak columns
    ("hqq", {"nbits": 4, "group_size": 32}, "qbara", {"r": 2, "balance": 16}, False),
    ("rtn", {"bits": 4, "group_size": 32}, "qbara", {"r": 4, "balance": 2}, False),
    ("rtn", {"bits": 4, "group_size": 32}, "qahira", {"lambda1": 4, "lambda2": 8}, False),
    ("nf4", {}, "qbara", {"r": 4, "balance": 2}, False),
    ("nf4", {}, "qahira", {"lambda1": 8, "lambda2": 8}, False),
    ("none", {}, "qahira", {"lambda1": 64, "lambda2": 8}, False),
]


@pytest.mark.parametrize(
    "qname, knobs, method, acfg, exact",
    MERGES,
    ids=[f"{q}-{m}-{'-'.join(f'{k}{v}' for k, v in a.items())}" for q, _, m, a, _ in MERGES],
)
def test_merge_gives_the_same_outputs(qname, knobs, method, acfg, exact):
    amod = adapters.get(method)
    model = _quantized(qname, **knobs)
    plain = _logits(model)
    model = amod.attach(model, _targets(model), amod.Config(**acfg, dropout=0.0, adapter_dtype="float32"))
    _randomize_model(model, 10)
    adapted = _logits(model)
    assert rel(adapted, plain) > 1e-3  # the adapters change the function (else the test proves nothing)
    base_type = type(model.get_submodule(_targets(model)[0]).base)
    merged = amod.merge(model)
    assert not any(isinstance(m, base.AdapterLinear) for m in merged.modules())
    for name in _targets(merged):
        layer = merged.get_submodule(name)
        if exact:  # the quantized layer itself: same class, same codes, new zero points, no extra path
            assert type(layer) is base_type and base.group_size_of(layer) is not None
        else:
            assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
    assert rel(_logits(merged), adapted) <= 1e-5


def test_exact_merge_keeps_the_codes_and_moves_only_zero_points():
    model = _quantized("rtn", bits=4, group_size=32)
    name = _targets(model)[0]
    before = {k: v.clone() for k, v in model.get_submodule(name).state_dict().items()}
    model = qahira.attach(model, _targets(model), qahira.Config(lambda1=32, lambda2=8, adapter_dtype="float32"))
    _randomize_model(model, 3)
    after = qahira.merge(model).get_submodule(name).state_dict()
    assert torch.equal(after["qweight"], before["qweight"]) and torch.equal(after["scales"], before["scales"])
    assert not torch.equal(after["zeros"], before["zeros"])


# ---------------------------------------------------------------------------------------------------------------
# Save and reload
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, acfg", [("qbara", {"r": 2, "balance": 4}), ("qahira", {"lambda1": 8, "lambda2": 4})])
def test_save_and_reload_onto_a_fresh_quantized_base(tmp_path, method, acfg):
    amod = adapters.get(method)
    cfg = amod.Config(**acfg)
    model = amod.attach(_quantized("nf4", torch.bfloat16, "bfloat16"), _targets(_tiny_llama()), cfg)
    _randomize_model(model, 20)
    model.eval()
    expected = _logits(model)
    amod.save(model, tmp_path / "adapter", cfg)
    meta = json.loads((tmp_path / "adapter" / base.CONFIG_FILE).read_text())
    assert (meta["format"], meta["version"], meta["method"]) == (base.FORMAT, base.VERSION, method)
    assert meta["config"] == {**amod.Config().__dict__, **acfg} and len(meta["targets"]) == 14

    fresh = _quantized("nf4", torch.bfloat16, "bfloat16")
    reloaded = amod.load(fresh, _targets(fresh), cfg, tmp_path / "adapter")
    reloaded.eval()
    assert torch.equal(_logits(reloaded), expected)

    other = amod.Config(**{**acfg, "dropout": 0.1})
    with pytest.raises(ValueError, match="other knobs"):
        amod.load(_quantized("nf4", torch.bfloat16, "bfloat16"), _targets(fresh), other, tmp_path / "adapter")
    wrong = qahira if method == "qbara" else qbara
    with pytest.raises(ValueError, match=f"holds a '{method}' adapter"):
        wrong.load(_quantized("nf4", torch.bfloat16, "bfloat16"), _targets(fresh), wrong.Config(), tmp_path / "adapter")


# ---------------------------------------------------------------------------------------------------------------
# Compose-time errors and end-to-end runs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["peft=qbara", "peft.balance=3"],
            "peft.balance=3 does not divide in_features=256 of model.layers.0.self_attn.q_proj (256 -> 256)",
        ),
        (
            ["peft=qbara", "peft.balance=256"],
            "peft.balance=256 does not divide out_features=128 of model.layers.0.self_attn.k_proj (256 -> 128)",
        ),
        (["peft=qbara", "peft.balance=0"], "peft.balance=0 must be > 0"),
        (["peft=qbara", "peft.r=0"], "peft.r=0 must be > 0"),
        (["peft=qbara", "peft.dropout=1.0"], "peft.dropout=1.0 must lie in [0, 1)"),
        (["peft=qbara", "peft.adapter_dtype=int8"], "peft.adapter_dtype='int8'"),
        (
            ["peft=qahira", "peft.lambda1=3"],
            "peft.lambda1=3 does not divide in_features=256 of model.layers.0.self_attn.q_proj (256 -> 256)",
        ),
        (
            ["peft=qahira", "peft.lambda2=256"],
            "peft.lambda2=256 does not divide out_features=128 of model.layers.0.self_attn.k_proj (256 -> 128)",
        ),
        (
            ["peft=qahira", "peft.lambda1=512"],
            "peft.lambda1=512 does not divide in_features=256 of model.layers.0.self_attn.q_proj",
        ),
        (["peft=qahira", "peft.lambda2=0"], "peft.lambda2=0 must be > 0"),
        (["peft=qahira", "peft.init=ones"], "peft.init='ones' has the wrong type"),
        (["peft=qahira", "+peft.r=8"], "unknown key peft.r"),
    ],
)
def test_bad_knobs_fail_at_compose_time(compose, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    assert message in str(err.value)


def test_lambda_that_divides_every_layer_composes(compose):
    # (8, 8) and lambda1 = 768 = the tiny model's intermediate size only divides down_proj's input: must fail;
    # lambda1 = 256 divides every input (256 and 768)
    assert validate(compose(["peft=qahira", "peft.lambda1=8", "peft.lambda2=8"])).peft.lambda1 == 8
    assert validate(compose(["peft=qahira", "peft.lambda1=256", "peft.lambda2=128"])).peft.lambda2 == 128
    with pytest.raises(ConfigError, match="lambda1=768 does not divide in_features=256"):
        validate(compose(["peft=qahira", "peft.lambda1=768"]))


@pytest.mark.parametrize("method", ["qbara", "qahira"])
@pytest.mark.parametrize("qname", ["nf4", "rtn"])
def test_short_run_end_to_end(compose, tmp_path, method, qname):
    # shorter than FAST: 2 steps, no evaluation before fine-tuning (4 runs must fit in this file's time budget)
    config = compose(
        [
            *FAST,
            f"peft={method}",
            f"quant={qname}",
            "calib.samples=4",
            "calib.seq_len=64",
            "train.max_steps=2",
            "eval.before_finetune=false",
            "eval.max_batches=1",
        ]
    )
    assert recipe.run(config, tmp_path, progress=False) == "completed"
    rec = json.loads((tmp_path / "result.json").read_text())
    spec = validate(config)
    shapes = models.linear_shapes(spec.model.arch_dict(), spec.model.dtype, spec.model.linear_names)
    if method == "qbara":
        want = sum(spec.peft.r * (i + o) for i, o in shapes.values())
    else:
        want = sum(i * o // (spec.peft.lambda1 * spec.peft.lambda2) for i, o in shapes.values())
    assert rec["accounting"]["trainable_params"] == want
    assert rec["accounting"]["adapter_bytes"] == 2 * want  # bf16
    assert len(rec["train"]["losses"]) == 2 and all(math.isfinite(x) for x in rec["train"]["losses"])
    assert math.isfinite(rec["eval"]["after"]["ppl_heldout"])
    meta = json.loads((tmp_path / "adapter" / base.CONFIG_FILE).read_text())
    assert meta["method"] == method
