"""The peft-backed methods (LoRA, rsLoRA, DoRA, LoftQ and their combinations, IA3): forward parity with plain
fp32 formulas, gradients through every quantizer each declares supported, the support matrix at compose time,
save/reload, merges, LoftQ's initialisation and cache, plan-mode counts, and short end-to-end runs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import FAST
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from qpeft_bench import adapters, calibration, models, plan, quant, recipe
from qpeft_bench.adapters import base, loftq
from qpeft_bench.config import ConfigError
from qpeft_bench.spec import validate

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPT = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# small groups so the 64-wide tiny model has several of them per row
KNOBS = {
    "hqq": {"group_size": 32},
    "rtn": {"group_size": 32},
    "gptq": {"group_size": 32},
    "owq": {"group_size": 32, "k": 4},
    "qeft": {"group_size": 32, "k": 4},
    "icq": {"blocksize": 32},
    # the reference FakeQuantInputLinear below rounds the inputs only, not also the q/k/v outputs
    "smoothquant": {"quantize_bmm_input": False},
}
LORA_OPTIONS = ["lora", "rslora", "dora", "loftq", "dora_rslora", "loftq_rslora", "dora_loftq"]
lora, ia3 = adapters.get("lora"), adapters.get("ia3")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).float().eval()


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        word_embed_proj_dim=64,
        enable_bias=True,
    )
    model = OPTForCausalLM(cfg).float().eval()
    with torch.no_grad():  # transformers initialises biases to zero: make them matter
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    return model


def quantized(qname: str, model=None, names=LLAMA, device: str = "cpu"):
    model = (tiny_llama() if model is None else model).to(device)
    targets = list(models.find_linears(model, names))
    qmod = quant.get(qname)
    cfg = qmod.Config(**{**quant.preset(qname), **KNOBS.get(qname, {})})
    windows = calibration.random_windows(128, 4, 16, 0)
    quant.quantize_model(qname, model, targets, cfg, "float32", device, windows=windows)
    return model, targets


class FakeQuantInputLinear(torch.nn.Linear):
    """Reference for W8A8: int8 per-token fake quantization of the input (straight-through), then fp32 x W^T."""

    def forward(self, x):
        from qpeft_bench.quant.smoothquant import fake_quantize_tokens

        return super().forward(x + (fake_quantize_tokens(x) - x).detach())


def dense_reference(qmodel, targets: list[str], qname: str):
    """The same network with every quantized target an fp32 nn.Linear of its dequantized weight."""
    ref = copy.deepcopy(qmodel)
    cls = FakeQuantInputLinear if qname == "smoothquant" else torch.nn.Linear
    for name in targets:
        mod = ref.get_submodule(name)
        bias = getattr(mod, "bias", None)
        lin = cls(mod.in_features, mod.out_features, bias=bias is not None)
        lin.weight.data = base.dense_weight(mod).float().reshape(mod.out_features, mod.in_features).clone()
        if bias is not None:
            lin.bias.data = bias.detach().float().clone()
        lin.requires_grad_(False)
        ref.set_submodule(name, lin)
    return ref


def perturb(model, seed: int = 3) -> None:
    """Non-trivial adapter values (B = 0 and IA3 = 1 would leave gradients and outputs degenerate)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * 0.05)


def grads(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def lora_cfg(**kw):
    return lora.Config(**{"r": 4, "alpha": 8, "dropout": 0.0, "adapter_dtype": "float32", **kw})


def supported_quantizers(amod, cfg) -> list[str]:
    return [q for q in quant.names() if amod.unsupported(q, None, cfg) is None]


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))

# ----------------------------------------------------------------------------------------------------------------
# Forward parity with plain fp32 formulas
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [{}, {"use_rslora": True}, {"use_dora": True}, {"use_dora": True, "use_rslora": True}],
    ids=["lora", "rslora", "dora", "dora_rslora"],
)
@pytest.mark.parametrize("qname", ["none", "rtn", "nf4"])
def test_lora_variants_match_plain_formulas(variant, qname):
    model, targets = quantized(qname)
    cfg = lora_cfg(r=4, alpha=6, **variant)
    peft_model = lora.attach(model, targets, cfg)
    perturb(peft_model)
    peft_model.eval()
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4))
    scale = 6 / (math.sqrt(4) if variant.get("use_rslora") else 4)
    for name, layer in lora.lora_layers(peft_model).items():
        xin = x if layer.in_features == 64 else torch.randn(3, 5, layer.in_features)
        w = base.dense_weight(layer.get_base_layer()).float()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if variant.get("use_dora"):
            m = layer.lora_magnitude_vector["default"].weight
            v = w + scale * b @ a
            expected = xin @ ((m / v.norm(dim=1)).unsqueeze(1) * v).T
        else:
            expected = xin @ w.T + scale * (xin @ a.T) @ b.T
        with torch.no_grad():
            assert rel(layer(xin), expected) < 1e-6, name


def test_ia3_matches_plain_formula_with_biases():
    model, targets = quantized("none", tiny_opt(), OPT)
    peft_model = ia3.attach(model, targets, ia3.Config())
    perturb(peft_model)
    layers = ia3.ia3_layers(peft_model)
    assert {n.rsplit(".", 1)[-1] for n, m in layers.items() if m.is_feedforward} == {"fc2"}
    for name, layer in layers.items():
        lin = layer.get_base_layer()
        x = torch.randn(3, 5, lin.in_features, generator=torch.Generator().manual_seed(5))
        vec = layer.ia3_l["default"].flatten()
        if name.endswith("fc2"):
            expected = (x * vec) @ lin.weight.T + lin.bias
        else:
            expected = vec * (x @ lin.weight.T + lin.bias)
        with torch.no_grad():
            assert rel(layer(x), expected) < 1e-6, name


# ----------------------------------------------------------------------------------------------------------------
# Every supported cell trains with correct gradients; every other cell fails at compose time
# ----------------------------------------------------------------------------------------------------------------


def _check_gradients(qname: str, amod, cfg, device: str = "cpu") -> None:
    model, targets = quantized(qname, device=device)
    reference = dense_reference(model, targets, qname)
    qpeft, rpeft = amod.attach(model, targets, cfg), amod.attach(reference, targets, cfg)
    perturb(qpeft)
    q_params, r_params = dict(qpeft.named_parameters()), dict(rpeft.named_parameters())
    with torch.no_grad():
        for name, p in q_params.items():
            if p.requires_grad:  # same adapters on both (DoRA magnitudes included)
                r_params[name].copy_(p)
    ids = IDS.to(device)
    with torch.no_grad():
        qpeft.eval()
        qpeft(
            input_ids=ids
        )  # an eval forward first: it arms bitsandbytes' autograd-less CPU kernel (docs/design.md §7)
    g_q, g_r = grads(qpeft, ids), grads(rpeft, ids)
    assert set(g_q) == set(g_r) and len(g_q) >= len(targets)
    for name, g in g_r.items():
        assert g.abs().sum() > 0, name
        assert rel(g_q[name], g) < 1e-4, f"{qname} {name}: {rel(g_q[name], g):.2e}"
    # and a step of training moves the loss
    opt = torch.optim.SGD([p for p in qpeft.parameters() if p.requires_grad], lr=1.0)
    with torch.no_grad():
        before = float(qpeft(input_ids=ids, labels=ids).loss)
        opt.step()
        assert float(qpeft(input_ids=ids, labels=ids).loss) != before


@pytest.mark.parametrize("qname", supported_quantizers(lora, lora_cfg(use_dora=True)))
def test_dora_gradients_on_every_supported_quantizer(qname):
    _check_gradients(qname, lora, lora_cfg(use_dora=True, use_rslora=True))


@pytest.mark.parametrize("qname", supported_quantizers(lora, lora_cfg()))
def test_lora_gradients_on_every_supported_quantizer(qname):
    _check_gradients(qname, lora, lora_cfg(dropout=0.0))


@pytest.mark.parametrize("qname", supported_quantizers(ia3, ia3.Config()))
def test_ia3_gradients_on_every_supported_quantizer(qname):
    _check_gradients(qname, ia3, ia3.Config())


def _support(option: str) -> tuple[object, object]:
    amod = ia3 if option == "ia3" else lora
    cfg = (
        amod.Config()
        if option == "ia3"
        else lora_cfg(
            use_dora="dora" in option,
            use_rslora="rslora" in option,
            loftq={"bits": 4, "iters": 1} if "loftq" in option else None,
        )
    )
    return amod, cfg


def test_support_matrix_is_what_the_tests_establish():
    declared = {opt: supported_quantizers(*_support(opt)) for opt in [*LORA_OPTIONS, "ia3"]}
    every = quant.names()
    for opt in ("lora", "rslora", "dora", "dora_rslora"):
        assert declared[opt] == every
    for opt in ("loftq", "loftq_rslora", "dora_loftq"):
        assert declared[opt] == ["fp4", "nf4"]
    assert declared["ia3"] == ["fp4", "int8", "nf4", "none"]


@pytest.mark.parametrize("option", ["loftq", "dora_loftq", "ia3"])
def test_unsupported_cells_fail_at_compose_time(compose, option):
    amod, cfg = _support(option)
    for qname in quant.names():
        why = amod.unsupported(qname, None, cfg)
        overrides = [f"peft={option}", f"quant={qname}", "mode=plan"]
        if why is None:
            validate(compose(overrides))
            continue
        with pytest.raises(ConfigError) as err:
            validate(compose(overrides))
        assert f"peft={option} cannot run on quant={qname}" in str(err.value) and why in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["peft=loftq", "peft.loftq.bits=8"], "peft.loftq.bits=8: only 4 is supported"),
        (["peft=loftq", "peft.loftq.iters=0"], "peft.loftq.iters=0 must be >= 1"),
        (["peft=lora", "peft.loftq={bits:4,iter:2}"], "unknown key(s) peft.loftq.iter"),
        (["peft=lora", "peft.loftq={bits:4,iters:two}"], "peft.loftq.iters='two' has the wrong type"),
        (["peft=dora", "peft.use_dora=maybe"], "peft.use_dora='maybe' has the wrong type"),
        (["peft=ia3", "peft.adapter_dtype=int8"], "peft.adapter_dtype='int8'"),
        (["peft=ia3", "+peft.r=8"], "unknown key peft.r"),
    ],
)
def test_bad_knobs_fail_at_compose_time(compose, overrides, message):
    with pytest.raises(ConfigError, match=None) as err:
        validate(compose(overrides))
    assert message in str(err.value)


def test_presets_and_combinations_compose(compose):
    for option, want in [
        ("rslora", (True, False, None)),
        ("dora", (False, True, None)),
        ("loftq", (False, False, {"bits": 4, "iters": 1})),
        ("dora_rslora", (True, True, None)),
        ("loftq_rslora", (True, False, {"bits": 4, "iters": 1})),
        ("dora_loftq", (False, True, {"bits": 4, "iters": 1})),
    ]:
        spec = validate(compose([f"peft={option}"]))
        assert (spec.peft_method, spec.peft_name) == ("lora", option)
        assert (spec.peft.use_rslora, spec.peft.use_dora, spec.peft.loftq) == want
    spec = validate(compose(["peft=lora", "peft.use_dora=true", "peft.loftq={iters:3}"]))
    assert spec.peft.use_dora and spec.peft.loftq == {"bits": 4, "iters": 3}  # defaults filled in
    assert validate(compose(["peft=rslora", "peft.r=16", "peft.alpha=8"])).peft.scale == 2.0


# ----------------------------------------------------------------------------------------------------------------
# verify() catches what peft would accept silently
# ----------------------------------------------------------------------------------------------------------------


def test_verify_rejects_wrong_scale_missing_magnitude_and_wrong_modules():
    model, targets = quantized("none")
    cfg = lora_cfg(use_rslora=True, use_dora=True, r=4, alpha=8)
    peft_model = lora.attach(model, targets, cfg)
    assert all(m.scaling["default"] == 4.0 for m in lora.lora_layers(peft_model).values())  # 8 / sqrt(4)
    with pytest.raises(RuntimeError, match="scale"):
        lora.verify(peft_model, targets, lora_cfg(use_dora=True, r=4, alpha=8))  # alpha/r would be 2
    with pytest.raises(RuntimeError, match="DoRA magnitude present"):
        lora.verify(peft_model, targets, lora_cfg(use_rslora=True, r=4, alpha=8))
    with pytest.raises(RuntimeError, match="wrong modules"):
        lora.verify(peft_model, [*targets, "model.layers.0.mlp.nonexistent"], cfg)
    layer = lora.lora_layers(peft_model)[targets[0]]
    del layer.lora_magnitude_vector["default"]
    with pytest.raises(RuntimeError, match="DoRA magnitude missing"):
        lora.verify(peft_model, targets, cfg)

    model, targets = quantized("none")
    peft_model = ia3.attach(model, targets, ia3.Config())
    with pytest.raises(RuntimeError, match="input scaling"):
        ia3.verify(peft_model, targets, ia3.Config(feedforward=["up_proj"]))
    with pytest.raises(RuntimeError, match="bfloat16"):
        ia3.verify(peft_model, targets, ia3.Config(adapter_dtype="bfloat16"))


# ----------------------------------------------------------------------------------------------------------------
# Save / reload and merge
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "qname, option", [("nf4", "dora_rslora"), ("rtn", "dora"), ("hqq", "lora"), ("nf4", "ia3"), ("int8", "ia3")]
)
def test_save_and_reload_onto_a_fresh_base_gives_identical_outputs(tmp_path, qname, option):
    amod, cfg = _support(option)
    model, targets = quantized(qname)
    trained = amod.attach(model, targets, cfg)
    perturb(trained)
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=IDS).logits
    amod.save(trained, tmp_path, cfg)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    fresh, _ = quantized(qname)
    loaded = amod.load(fresh, targets, cfg, tmp_path)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, expected)
    other = _support("lora")[1] if option == "ia3" else lora_cfg(r=2)
    with pytest.raises(ValueError):
        (ia3 if option == "ia3" else lora).load(
            quantized(qname)[0], targets, other if option != "ia3" else ia3.Config(feedforward=["up_proj"]), tmp_path
        )


@pytest.mark.parametrize(
    "qname, option",
    [
        ("none", "lora"),
        ("nf4", "rslora"),
        ("hqq", "dora"),
        ("icq", "dora"),
        ("gptq", "dora_rslora"),
        ("owq", "lora"),
        ("none", "ia3"),
        ("fp4", "ia3"),
    ],
)
def test_merge_into_a_dequantized_base_keeps_the_outputs(qname, option):
    amod, cfg = _support(option)
    model, targets = quantized(qname)
    peft_model = amod.attach(model, targets, cfg)
    perturb(peft_model)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits
        merged = amod.merge(peft_model)
        assert not any("lora_" in n or "ia3_" in n for n, _ in merged.named_parameters())
        assert all(type(merged.get_submodule(t)) is torch.nn.Linear for t in targets)
        assert rel(merged(input_ids=IDS).logits, expected) <= 1e-5


def test_ia3_merge_scales_biases_of_output_targets_only():
    model, targets = quantized("none", tiny_opt(), OPT)
    peft_model = ia3.attach(model, targets, ia3.Config())
    perturb(peft_model)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits
        assert rel(ia3.merge(peft_model)(input_ids=IDS).logits, expected) <= 1e-5


@pytest.mark.parametrize("qname", ["int8", "smoothquant"])
def test_no_merge_for_bases_that_quantize_activations(qname):
    model, targets = quantized(qname)
    peft_model = lora.attach(model, targets, lora_cfg())
    with pytest.raises(base.MergeUnsupported, match="rounds its activations to int8"):
        lora.merge(peft_model)


# ----------------------------------------------------------------------------------------------------------------
# LoftQ
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """A saved random tiny LLaMA (LoftQ reads the unquantized weights from it) and a private LoftQ cache."""
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    tiny_llama(seed=7).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def loaded_nf4(path, qname: str = "nf4", device: str = "cpu"):
    model = models.load_model(str(path), "float32", device)
    return quantized(qname, model, device=device)


def plain_nf4(w: torch.Tensor) -> torch.Tensor:
    """Reference quantizer: bitsandbytes NF4 with QLoRA's settings (block 64, double quantization), dequantized."""
    import bitsandbytes.functional as bf

    packed, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return bf.dequantize_4bit(packed, state).float()


def plain_svd(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


@pytest.mark.parametrize("iters, variant", [(1, {}), (1, {"use_rslora": True, "alpha": 3}), (2, {"use_dora": True})])
def test_loftq_initialisation_matches_a_plain_reference(checkpoint, iters, variant):
    _check_loftq(checkpoint, iters, variant, "cpu")


def _check_loftq(checkpoint, iters: int, variant: dict, device: str) -> None:
    originals = {
        n: m.weight.detach().clone()
        for n, m in models.load_model(str(checkpoint), "float32", device).named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    }
    model, targets = loaded_nf4(checkpoint, device=device)
    before = {t: base.dense_weight(model.get_submodule(t)).clone() for t in targets}
    cfg = lora_cfg(**{"r": 4, "alpha": 8, **variant, "loftq": {"bits": 4, "iters": iters}})
    peft_model = lora.attach(model, targets, cfg)
    assert peft_model.qpeft_loftq["cache"] == "miss"
    for name, layer in lora.lora_layers(peft_model).items():
        w = originals[name]
        q = plain_nf4(w)  # the first Q is NF4(W): the recipe's base
        assert torch.equal(q, before[name].float())
        lr = plain_svd(w - q, 4)
        if iters == 2:  # LoftQ: re-quantize W - L R, then the SVD of the new residual
            shift = peft_model.qpeft_loftq_shifts[name]
            shift = shift["shift_L"] @ shift["shift_R"]
            assert rel(shift, lr) < 1e-5, name
            # (exactly NF4 of the shifted weight; rounding of the shift may flip a code at a boundary, so the
            # reference quantizes the shift the code used)
            q = plain_nf4(w - shift)
            lr = plain_svd(w - q, 4)
        got_q = base.dense_weight(layer.get_base_layer()).float()
        assert torch.equal(got_q, q), name  # the base the model now computes with is LoftQ's final Q
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert rel(layer.scaling["default"] * b @ a, lr) < 1e-5, name  # rescaled: s B A = L R whatever alpha
        assert (w - q - lr).norm() < (w - q).norm()  # the adapters cancel part of the quantization error
        x = torch.randn(2, layer.in_features, device=device)
        with torch.no_grad():  # the first forward computes Q + L R (DoRA's magnitude too starts at the norm)
            assert rel(layer(x), x @ (q + lr).T) < 1e-5, name


def test_loftq_cache_is_reused_and_reload_rebuilds_the_shifted_base(checkpoint, tmp_path):
    cfg = lora_cfg(r=4, alpha=4, loftq={"bits": 4, "iters": 2})
    first = lora.attach(*loaded_nf4(checkpoint), cfg)
    second = lora.attach(*loaded_nf4(checkpoint), cfg)
    assert (first.qpeft_loftq["cache"], second.qpeft_loftq["cache"]) == ("miss", "hit")
    assert first.qpeft_loftq["cache_file"] == second.qpeft_loftq["cache_file"]
    assert len(list((tmp_path / "cache" / "loftq").iterdir())) == 1
    s1, s2 = first.state_dict(), second.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1 if "lora_" in k)
    # another rank is another cache entry
    lora.attach(*loaded_nf4(checkpoint), lora_cfg(r=2, alpha=2, loftq={"bits": 4, "iters": 2}))
    assert len(list((tmp_path / "cache" / "loftq").iterdir())) == 2

    perturb(first)
    first.eval()
    with torch.no_grad():
        expected = first(input_ids=IDS).logits
    lora.save(first, tmp_path / "adapter", cfg)
    reloaded = lora.load(loaded_nf4(checkpoint)[0], loaded_nf4(checkpoint)[1], cfg, tmp_path / "adapter")
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, expected)


def test_loftq_without_a_checkpoint_says_what_it_needs():
    model, targets = quantized("nf4")
    with pytest.raises(FileNotFoundError, match="LoftQ needs the unquantized weights"):
        lora.attach(model, targets, lora_cfg(loftq={"bits": 4, "iters": 1}))


# ----------------------------------------------------------------------------------------------------------------
# Plan mode: exact counts on every card
# ----------------------------------------------------------------------------------------------------------------

CARDS = ["tiny_llama", "llama_7b", "llama_13b", "llama2_7b", "llama2_13b", "llama2_70b", "llama3_8b", "opt_1_3b"]


@pytest.mark.parametrize("card", CARDS)
def test_plan_counts_are_exact_on_every_card(compose, card):
    from qpeft_bench.config import adapter_target

    for option, r in [("dora_loftq", 16), ("ia3", None)]:
        spec = validate(compose(["mode=plan", f"model={card}", f"peft={option}", *([f"peft.r={r}"] if r else [])]))
        shapes = models.linear_shapes(spec.model.arch_dict(), spec.model.dtype, spec.model.linear_names)
        shapes = {n: s for n, s in shapes.items() if adapter_target(n, spec.peft_targets)}
        if option == "ia3":
            ff = spec.peft.feedforward
            want = sum(i if n.rsplit(".", 1)[-1] in ff else o for n, (i, o) in shapes.items())
            elem = 4
        else:  # A: r x in, B: out x r, DoRA magnitude: out
            want = sum(r * (i + o) + o for i, o in shapes.values())
            elem = 2
        acc = plan.plan_accounting(spec)
        assert acc["trainable_params"] == want, option
        assert acc["adapter_bytes"] == acc["peft_overhead_bytes"] == elem * want


# ----------------------------------------------------------------------------------------------------------------
# End to end on the embedded tiny model
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["dora_loftq", "ia3"])
def test_short_run_completes(compose, tmp_path, monkeypatch, option):
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    knob = "peft.loftq.iters=2" if "loftq" in option else "peft.feedforward=[down_proj]"
    config = compose([*FAST, f"peft={option}", knob])
    assert recipe.run(config, tmp_path / "run", progress=False) == "completed"
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["accounting"]["adapter_init_time_s"] > 0 and math.isfinite(rec["eval"]["after"]["ppl_heldout"])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    if "loftq" in option:
        assert (tmp_path / "run" / "adapter" / "loftq_shift.safetensors").is_file()
        assert len(list((tmp_path / "cache" / "loftq").iterdir())) == 1


# ----------------------------------------------------------------------------------------------------------------
# CUDA (the lent GPU): LoftQ's alternation, DoRA and IA3 on bitsandbytes layers
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("iters, variant", [(1, {"use_rslora": True, "alpha": 3}), (2, {"use_dora": True})])
def test_loftq_on_cuda_matches_a_plain_reference(checkpoint, iters, variant):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _check_loftq(checkpoint, iters, variant, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("option", ["dora_rslora", "ia3"])
def test_gradients_on_cuda(option):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    amod, cfg = _support(option)
    _check_gradients("nf4", amod, cfg, "cuda")


def test_randomized_low_rank_is_within_0_002_percent_of_the_exact_truncation():
    """LoftQ's rank-r step on large residuals uses a randomized SVD; a Gaussian matrix (a flat spectrum, like
    quantization noise: the hardest case for a sketch) must still come within 0.002% of the exact truncation error
    (peft's LoftQ takes the exact one; the GPU comparison is scripts/bench_loftq.py)."""
    torch.manual_seed(0)
    a = torch.randn(600, 1500)
    rank = 64
    assert min(a.shape) > max(2 * (1 + loftq.OVERSAMPLE) * rank, loftq.EXACT_UP_TO)  # the randomized branch
    left, right = loftq.low_rank(a, rank)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    exact = (a - (u[:, :rank] * s[:rank]) @ vh[:rank]).norm()
    got = (a - left @ right).norm()
    assert exact <= got <= 1.00002 * exact
    assert torch.equal(left, loftq.low_rank(a, rank)[0])  # seeded: the same residual gives the same factors


def test_the_sketch_basis_is_orthonormal_also_when_its_columns_are_dependent():
    torch.manual_seed(0)
    b = torch.randn(1000, 50)
    for case in (b, torch.cat([b[:, :49], b[:, :1]], dim=1)):  # the second: a singular Gram matrix
        q = loftq._orthonormal(case)
        assert q.shape == case.shape
        torch.testing.assert_close(q.T @ q, torch.eye(50), atol=1e-5, rtol=0)
    q = loftq._orthonormal(b)
    torch.testing.assert_close(q @ (q.T @ b), b, atol=1e-4, rtol=1e-4)  # it spans b's columns
