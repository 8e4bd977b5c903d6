"""QA-LoRA: the forward against a plain reference, gradients, exact counts, the exact zero-point merge on rtn, gptq
and hqq, save/reload, the compose-time refusals and a short run end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAST
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from qpeft_bench import calibration, models, plan, quant, recipe
from qpeft_bench.adapters import base, qa_lora
from qpeft_bench.config import ConfigError
from qpeft_bench.spec import validate

NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MERGE_CASES = [
    ("rtn", {"bits": 4, "group_size": 64}),
    ("rtn", {"bits": 2, "group_size": 32, "symmetric": True}),
    ("gptq", {"bits": 3, "group_size": 32}),
    ("hqq", {"nbits": 4, "group_size": 64}),
    ("hqq", {"nbits": 3, "group_size": 32}),
]


def reference(x, weight, a, b, scale, group_size):
    """Q(W) x + s · B A pool_L(x), written out: each pooled feature is the plain mean of its L inputs."""
    groups = weight.shape[1] // group_size
    pooled = torch.zeros(x.shape[0], groups)
    for g in range(groups):
        pooled[:, g] = x[:, g * group_size : (g + 1) * group_size].sum(dim=1) / group_size
    return x @ weight.T + scale * ((pooled @ a.T) @ b.T)


def rel(got, want) -> float:
    return float((got - want).norm() / want.norm())


def randomize(layer: qa_lora.QALoRALinear, seed: int) -> None:
    """Non-zero B (it starts at zero, which would make every check trivial) and a fresh A."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in ("A", "B"):
            p = layer.adapter[key]
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def tiny_llama(dtype=torch.float32) -> LlamaForCausalLM:
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


def quantized_llama(qname: str, knobs: dict):
    model = tiny_llama()
    targets = list(models.find_linears(model, NAMES))
    qmod = quant.get(qname)
    quant.quantize_model(
        qname, model, targets, qmod.Config(**knobs), "float32", "cpu", windows=calibration.random_windows(256, 8, 32, 0)
    )
    return model, targets


def quantized_layer(in_f: int, out_f: int, qname: str, knobs: dict) -> nn.Module:
    torch.manual_seed(3)
    lin = nn.Linear(in_f, out_f, bias=False)
    return quant.get(qname).quantize_linear(lin, quant.get(qname).Config(**knobs), "float32", "cpu")


def fp32_config(**kw) -> qa_lora.Config:
    return qa_lora.Config(**{"r": 4, "alpha": 8, "group_size": 32, "dropout": 0.0, "adapter_dtype": "float32", **kw})


# ---------------------------------------------------------------------------------------------------------------
# Forward and gradients
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "qname, knobs", [("none", {}), ("rtn", {"bits": 4, "group_size": 32}), ("hqq", {"nbits": 4, "group_size": 32})]
)
def test_forward_matches_plain_reference(qname, knobs):
    in_f, out_f, L, r = 256, 96, 32, 4
    if qname == "none":
        torch.manual_seed(3)
        layer_base = nn.Linear(in_f, out_f, bias=False)
        weight = layer_base.weight.detach()
    else:
        layer_base = quantized_layer(in_f, out_f, qname, knobs)
        weight = quant.get(qname).dequantize(layer_base).float().reshape(out_f, in_f)
    layer = qa_lora.QALoRALinear(layer_base, r, 8, L, 0.0, torch.float32)
    assert layer.adapter["A"].shape == (r, in_f // L) and layer.adapter["B"].shape == (out_f, r)
    randomize(layer, 1)
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(2))
    want = reference(x, weight, layer.adapter["A"].detach(), layer.adapter["B"].detach(), 8 / r, L)
    with torch.no_grad():
        got = layer(x)
        base_only = layer.base(x)
    assert rel(got, want) < 1e-6
    assert rel(base_only, want) > 1e-2  # the adapter path really contributes


def uniform_reference(rows: int, cols: int, bound: float, seed: int) -> torch.Tensor:
    """One uniform(-bound, bound) draw of a rows x cols fp32 tensor from the default generator at `seed`."""
    torch.manual_seed(seed)
    return torch.empty(rows, cols).uniform_(-bound, bound)


@pytest.mark.parametrize("in_f, r, L", [(256, 8, 64), (512, 4, 32), (384, 16, 16)])
def test_initial_adapter_is_a_no_op_and_a_is_xavier_uniform_as_the_authors(in_f, r, L):
    # The authors' A (yuhuixu1993/qa-lora, peft_utils.py) is lora_A = nn.Linear(in / L, r), re-initialised by
    # xavier_uniform_: a (r, in / L) weight drawn from U(-b, b), b = gain · √(6 / (fan_in + fan_out)), gain 1,
    # fan_in = in / L (its input is the pooled x), fan_out = r. Restated here from that definition.
    layer_base = quantized_layer(in_f, 64, "rtn", {"bits": 4, "group_size": L})
    torch.manual_seed(11)
    layer = qa_lora.QALoRALinear(layer_base, r, 16, L, 0.0, torch.float32)
    bound = math.sqrt(6.0 / (in_f // L + r))
    want = uniform_reference(r, in_f // L, bound, 11)
    a = layer.adapter["A"].detach()
    assert a.shape == want.shape
    # Same generator state, one uniform draw of the same shape: equal to fp32 rounding of the bound (torch computes
    # it as √3 · √(2 / n), we as √(6 / n)), and identical on most entries.
    assert torch.allclose(a, want, rtol=0, atol=1e-7)
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    x = torch.randn(3, in_f)
    with torch.no_grad():
        assert torch.equal(layer(x), layer_base(x))  # B starts at zero: the adapted layer is the base
    assert qa_lora.Config().init_a == "xavier_uniform"


def test_init_a_kaiming_uniform_gives_loras_init():
    # LoRA's A: kaiming_uniform_(a=√5) = U(-b, b), b = √(6 / ((1 + a²) · fan_in)) = 1 / √fan_in, fan_in = in / L.
    in_f, r, L = 256, 8, 64
    layer_base = quantized_layer(in_f, 64, "rtn", {"bits": 4, "group_size": L})
    torch.manual_seed(5)
    layer = qa_lora.QALoRALinear(layer_base, r, 16, L, 0.0, torch.float32, init_a="kaiming_uniform")
    want = uniform_reference(r, in_f // L, 1 / math.sqrt(in_f // L), 5)
    assert torch.allclose(layer.adapter["A"].detach(), want, rtol=0, atol=1e-7)
    torch.manual_seed(5)
    xavier = qa_lora.QALoRALinear(layer_base, r, 16, L, 0.0, torch.float32)
    assert not torch.allclose(xavier.adapter["A"], layer.adapter["A"])  # the knob really changes the draw
    with pytest.raises(ValueError, match="init_a='normal'"):
        qa_lora.QALoRALinear(layer_base, r, 16, L, 0.0, torch.float32, init_a="normal")


@pytest.mark.parametrize("in_f, L, r", [(4096, 32, 64), (11008, 32, 64), (4096, 64, 8), (11008, 64, 8)])
def test_xavier_a_is_about_twice_kaimings_at_llama_7b_shapes(in_f, L, r):
    # docs/fidelity/qa_lora.md's table (run with -s to print it): the std of the initial A through our layer.
    # Uniform bounds give the expected ratio √(6 / (in / L + r)) · √(in / L): exactly 2 at the reference's
    # L = 32, r = 64 on 4096 inputs (the "2.0x").
    std = {}
    for init in qa_lora.INIT_A:
        torch.manual_seed(0)
        layer = qa_lora.QALoRALinear(nn.Linear(in_f, 1, bias=False), r, 16, L, 0.0, torch.float32, init_a=init)
        std[init] = layer.adapter["A"].std().item()
    ratio = std["xavier_uniform"] / std["kaiming_uniform"]
    xavier, kaiming = std["xavier_uniform"], std["kaiming_uniform"]
    print(f"in={in_f} L={L} r={r}: std xavier {xavier:.4f} kaiming {kaiming:.4f} x{ratio:.2f}")
    assert ratio == pytest.approx(math.sqrt(6 / (in_f // L + r)) * math.sqrt(in_f // L), rel=0.05)


def test_init_a_reaches_every_wrapper_through_attach():
    model = tiny_llama()
    targets = list(models.find_linears(model, NAMES))
    torch.manual_seed(2)
    qa_lora.attach(model, targets, fp32_config(init_a="kaiming_uniform"))
    for name in targets:
        a = model.get_submodule(name).adapter["A"]
        assert a.abs().max() <= 1 / math.sqrt(a.shape[1])  # kaiming's bound, below xavier's √(6 / (in / L + r))


def test_gradients_match_closed_form():
    in_f, out_f, L, r, s = 128, 48, 16, 3, 2.5
    layer_base = quantized_layer(in_f, out_f, "rtn", {"bits": 4, "group_size": L})
    weight = layer_base.dequantize().float()
    layer = qa_lora.QALoRALinear(layer_base, r, s * r, L, 0.0, torch.float32)
    randomize(layer, 4)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, in_f, generator=gen, requires_grad=True)
    g_out = torch.randn(7, out_f, generator=gen)
    (layer(x) * g_out).sum().backward()
    a, b = layer.adapter["A"].detach(), layer.adapter["B"].detach()
    pooled = x.detach().reshape(7, in_f // L, L).mean(-1)
    torch.testing.assert_close(layer.adapter["B"].grad, s * g_out.T @ (pooled @ a.T), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.adapter["A"].grad, s * (g_out @ b).T @ pooled, rtol=1e-5, atol=1e-6)
    # dL/dx = G W + s (G B A) / L spread over each group's L inputs
    dx = g_out @ weight + s * ((g_out @ b @ a) / L).repeat_interleave(L, dim=1)
    torch.testing.assert_close(x.grad, dx, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in layer.base.parameters())


def test_gradcheck_in_float64():
    torch.manual_seed(6)
    lin = nn.Linear(32, 12, bias=True).double().requires_grad_(False)
    layer = qa_lora.QALoRALinear(lin, 2, 4, 8, 0.0, torch.float64)
    with torch.no_grad():
        layer.adapter["B"].normal_()
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)

    def f(x, a, b):
        return torch.func.functional_call(layer, {"adapter.A": a, "adapter.B": b}, (x,))

    a = layer.adapter["A"].detach().clone().requires_grad_()
    b = layer.adapter["B"].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, a, b))


def test_adapter_path_runs_in_adapter_dtype_and_adds_in_output_dtype():
    layer_base = quantized_layer(128, 64, "rtn", {"bits": 4, "group_size": 32})
    layer = qa_lora.QALoRALinear(layer_base, 4, 8, 32, 0.0, torch.bfloat16)
    randomize(layer, 7)
    assert layer.adapter["A"].dtype == layer.adapter["B"].dtype == torch.bfloat16
    x = torch.randn(2, 128)
    assert layer.delta(x).dtype == torch.bfloat16
    assert layer(x).dtype == torch.float32
    # the authors' order: x cast to A's dtype first, then average-pooled (nn.AvgPool1d) in that dtype
    a, b = layer.adapter["A"].detach(), layer.adapter["B"].detach()
    pooled = nn.AvgPool1d(32)(x.to(torch.bfloat16).unsqueeze(0)).squeeze(0)
    with torch.no_grad():
        assert torch.equal(layer.delta(x), (pooled @ a.T) @ b.T * 2.0)


# ---------------------------------------------------------------------------------------------------------------
# Attaching: counts, verification, the meta device
# ---------------------------------------------------------------------------------------------------------------


def test_attach_counts_and_freezes():
    model, targets = quantized_llama("rtn", {"bits": 4, "group_size": 32})
    cfg = fp32_config(r=4, group_size=32)
    shapes = {t: (model.get_submodule(t).in_features, model.get_submodule(t).out_features) for t in targets}
    model = qa_lora.attach(model, targets, cfg)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"{t}.adapter.{k}" for t in targets for k in "AB"}
    assert sum(trainable.values()) == sum(4 * (i // 32) + o * 4 for i, o in shapes.values())
    # hidden 128, intermediate 256, kv 64: q,o 128->128; k,v 128->64; gate,up 128->256; down 256->128
    assert sum(trainable.values()) == 2 * (2 * (16 + 512) + 2 * (16 + 256) + 2 * (16 + 1024) + (32 + 512))


def test_attach_on_meta_device_and_plan_counts(compose):
    spec = validate(
        compose(
            [
                "mode=plan",
                "model=llama2_7b",
                "quant=rtn",
                "quant.group_size=128",
                "peft=qa_lora",
                "peft.group_size=128",
                "peft.r=64",
            ]
        )
    )
    acc = plan.plan_accounting(spec)
    # LLaMA-2-7B per block: q,k,v,o 4096->4096; gate,up 4096->11008; down 11008->4096; 32 blocks
    per_block = (
        4 * (64 * 4096 // 128 + 4096 * 64) + 2 * (64 * 4096 // 128 + 11008 * 64) + (64 * 11008 // 128 + 4096 * 64)
    )
    assert acc["trainable_params"] == 32 * per_block == 87_601_152
    assert acc["adapter_bytes"] == 2 * acc["trainable_params"]  # bf16

    model = models.build_meta_model(spec.model.arch_dict(), spec.model.dtype)
    targets = list(models.find_linears(model, spec.model.linear_names))
    qa_lora.attach(model, targets, spec.peft)
    assert all(p.device.type == "meta" for n, p in model.named_parameters() if ".adapter." in n)


def test_attach_refuses_a_base_with_other_quantization_groups():
    model, targets = quantized_llama("rtn", {"bits": 4, "group_size": 64})
    with pytest.raises(
        ConfigError,
        match=r"model.layers.0.self_attn.q_proj \(128 -> 128\): peft.group_size=32 "
        r"differs from the base layer's quantization groups of 64",
    ):
        qa_lora.attach(model, targets, fp32_config(group_size=32))


def test_verification_catches_a_layer_that_did_not_get_the_knobs():
    model, targets = quantized_llama("rtn", {"bits": 4, "group_size": 32})
    model = qa_lora.attach(model, targets, fp32_config())
    model.get_submodule(targets[3]).scale = 99.0
    with pytest.raises(RuntimeError, match=f"{targets[3]}: adapter has"):
        base.verify_wrappers(
            model,
            targets,
            qa_lora.QALoRALinear,
            lambda name: {"r": 4, "scale": 2.0, "group_size": 32, "dtype": torch.float32},
        )


# ---------------------------------------------------------------------------------------------------------------
# Exact merge into the group zero points
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "qname, knobs", MERGE_CASES, ids=[f"{q}-{'-'.join(f'{k}{v}' for k, v in kn.items())}" for q, kn in MERGE_CASES]
)
def test_merge_into_zero_points_is_exact(qname, knobs):
    model, targets = quantized_llama(qname, knobs)
    kinds = {t: type(model.get_submodule(t)) for t in targets}
    model = qa_lora.attach(model, targets, fp32_config(group_size=knobs["group_size"]))
    for i, t in enumerate(targets):
        randomize(model.get_submodule(t), 10 + i)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        first = model.get_submodule(targets[0])
        layer_adapted, layer_base = first(x), first.base(x)
        merged_model = qa_lora.merge(model)
        merged = merged_model(input_ids=ids).logits
        layer_merged = merged_model.get_submodule(targets[0])(x)
    assert rel(layer_adapted, layer_base) > 1e-2  # the update is not negligible
    assert rel(layer_merged, layer_adapted) <= 1e-5
    assert rel(merged, adapted) <= 1e-5
    # what remains is the plain quantized model: same layer classes, nothing trainable, no extra path
    assert {t: type(merged_model.get_submodule(t)) for t in targets} == kinds
    assert not any(isinstance(m, base.AdapterLinear) for m in merged_model.modules())
    assert not any(p.requires_grad for p in merged_model.parameters())


def test_merge_refuses_bases_without_plain_group_zero_points():
    torch.manual_seed(0)
    for layer_base in (
        nn.Linear(64, 32, bias=False),
        quantized_layer(64, 32, "hqq", {"nbits": 4, "group_size": 32, "axis": 0}),
    ):
        layer = qa_lora.QALoRALinear(layer_base, 2, 4, 32, 0.0, torch.float32)
        with pytest.raises(base.MergeUnsupported, match="no exact zero-point merge"):
            layer.merge()
    from qpeft_bench.quant.weakcol import WeakColumnLinear

    weak = quantized_layer(64, 32, "rtn", {"bits": 4, "group_size": 32})
    weak = WeakColumnLinear(
        64,
        32,
        4,
        32,
        None,
        torch.zeros(32, 62, dtype=torch.uint8),  # the 62 other columns, in compact groups
        weak.scales,
        weak.zeros,
        torch.randn(32, 2),
        torch.tensor([0, 5]),
    )
    assert base.group_size_of(weak) is None  # the 16-bit columns would miss the zero-point shift
    with pytest.raises(base.MergeUnsupported):
        base.merge_group_constant(weak, torch.zeros(32, 2))


# ---------------------------------------------------------------------------------------------------------------
# Save and reload
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "qname, knobs", [("rtn", {"bits": 4, "group_size": 32}), ("hqq", {"nbits": 4, "group_size": 32})]
)
def test_save_and_reload_onto_a_fresh_base_gives_identical_outputs(tmp_path, qname, knobs):
    cfg = fp32_config()
    model, targets = quantized_llama(qname, knobs)
    with models.seeded(0):
        model = qa_lora.attach(model, targets, cfg)
    for i, t in enumerate(targets):
        randomize(model.get_submodule(t), 20 + i)
    qa_lora.save(model, tmp_path, cfg)
    meta = json.loads((tmp_path / base.CONFIG_FILE).read_text())
    assert (meta["format"], meta["version"], meta["method"]) == (base.FORMAT, base.VERSION, "qa_lora")
    assert meta["config"]["group_size"] == 32 and meta["targets"] == sorted(targets)

    fresh, _ = quantized_llama(qname, knobs)
    with models.seeded(1):  # another initialisation: the loaded tensors must replace all of it
        fresh = qa_lora.load(fresh, targets, cfg, tmp_path)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)

    other, _ = quantized_llama(qname, knobs)
    with pytest.raises(ValueError, match="alpha"):
        qa_lora.load(other, targets, fp32_config(alpha=16), tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Compose-time checks and a run end to end
# ---------------------------------------------------------------------------------------------------------------


def test_config_file_composes_with_matching_groups(compose):
    spec = validate(compose(["quant=rtn", "quant.group_size=64", "peft=qa_lora"]))
    assert (spec.peft_method, spec.peft_name) == ("qa_lora", "qa_lora")
    assert spec.peft == qa_lora.Config(r=8, alpha=16, group_size=64, dropout=0.05, adapter_dtype="bfloat16")
    for qname in ("hqq", "gptq"):
        validate(compose([f"quant={qname}", "quant.group_size=64", "peft=qa_lora"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["quant=rtn", "quant.group_size=128"],
            "peft=qa_lora cannot run on quant=rtn: peft.group_size=64 must equal quant.group_size=128",
        ),
        (
            [],
            "peft=qa_lora cannot run on quant=nf4: QA-LoRA merges into per-group zero points, which only rtn, "
            "gptq, hqq have",
        ),
        (
            ["quant=owq", "quant.group_size=64"],
            "cannot run on quant=owq: QA-LoRA merges into the group zero points, which the 16-bit weak columns bypass",
        ),
        (["quant=hqq", "quant.axis=0"], "cannot run on quant=hqq: QA-LoRA needs groups along the inputs"),
        (
            ["quant=rtn", "quant.group_size=64", "peft.group_size=96"],
            "peft.group_size=96 does not divide in_features=256 of model.layers.0.self_attn.q_proj (256 -> 256)",
        ),
        (["quant=rtn", "quant.group_size=64", "peft.r=0"], "peft.r=0 must be > 0"),
        (["quant=rtn", "quant.group_size=64", "peft.group_size=0"], "peft.group_size=0 must be > 0"),
        (["quant=rtn", "quant.group_size=64", "peft.dropout=1.0"], "peft.dropout=1.0 must lie in [0, 1)"),
        (["quant=rtn", "quant.group_size=64", "peft.adapter_dtype=int8"], "peft.adapter_dtype='int8'"),
        (["quant=rtn", "quant.group_size=64", "peft.init_a=normal"], "peft.init_a"),
    ],
)
def test_compose_time_errors(compose, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(["peft=qa_lora", *overrides]))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("qname", ["rtn", "hqq"])
def test_short_run_end_to_end(compose, tmp_path, qname):
    config = compose([*FAST, f"quant={qname}", "quant.group_size=64", "peft=qa_lora", "peft.group_size=64"])
    assert recipe.run(config, tmp_path, progress=False) == "completed"
    rec = json.loads((tmp_path / "result.json").read_text())
    # the embedded model: 4 blocks, hidden 256, intermediate 768, 2 KV heads of 64 (k, v: 256 -> 128)
    shapes = [(256, 256), (256, 128), (256, 128), (256, 256), (256, 768), (256, 768), (768, 256)]
    assert rec["accounting"]["trainable_params"] == 4 * sum(8 * (i // 64) + o * 8 for i, o in shapes)
    assert rec["accounting"]["adapter_bytes"] == 2 * rec["accounting"]["trainable_params"]
    saved = json.loads((tmp_path / "adapter" / base.CONFIG_FILE).read_text())
    assert saved["method"] == "qa_lora" and len(saved["targets"]) == 28
    assert rec["eval"]["after"]["ppl_heldout"] > 1
