"""LoRA gradients through every quantized base equal those of a reference holding the dequantized weights in
fp32 (docs/design.md §7: a silently wrong CPU kernel is exactly what such a test catches)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qpeft_bench import adapters, calibration, models, quant

NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = [
    ("nf4", {"double_quant": True}),
    ("nf4", {"double_quant": False}),
    ("fp4", {"blocksize": 128}),
    ("hqq", {"nbits": 4, "group_size": 64}),
    ("hqq", {"nbits": 2, "group_size": 32}),
    ("hqq", {"nbits": 3, "group_size": 64, "axis": 0}),
    ("rtn", {"bits": 4, "group_size": 64}),
    ("rtn", {"bits": 2, "group_size": 32, "symmetric": True}),
    ("gptq", {"bits": 4, "group_size": 64}),
    ("owq", {"bits": 4, "k": 4, "group_size": 64}),
    ("qeft", {"bits": 4, "k": 4, "group_size": 64}),
    ("icq", {}),
]


def _tiny_random_llama() -> LlamaForCausalLM:
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


def _dequantized_copy(qmodel, targets: list[str], qmod) -> torch.nn.Module:
    """The same network with each quantized target replaced by an fp32 nn.Linear of its dequantized weight."""
    ref = copy.deepcopy(qmodel)
    for name in targets:
        mod = ref.get_submodule(name)
        lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=False)
        lin.weight.data = qmod.dequantize(mod).float().reshape(mod.out_features, mod.in_features)
        lin.weight.requires_grad_(False)
        ref.set_submodule(name, lin)
    return ref


def _lora_grads(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _check_gradients(qname: str, knobs: dict, device: str, compute_dtype: str = "float32") -> None:
    qmod = quant.get(qname)
    model = _tiny_random_llama().to(device)
    targets = list(models.find_linears(model, NAMES))
    windows = calibration.random_windows(256, 8, 32, 0)
    quant.quantize_model(
        qname, model, targets, qmod.Config(**{**quant.preset(qname), **knobs}), compute_dtype, device, windows=windows
    )
    reference = _dequantized_copy(model, targets, qmod)
    # the quantized weights really differ from the original ones (otherwise the test proves nothing)
    assert not torch.allclose(
        reference.get_submodule(targets[0]).weight.cpu(), _tiny_random_llama().get_submodule(targets[0]).weight
    )

    lora, cfg = adapters.get("lora"), adapters.get("lora").Config(r=4, alpha=8, dropout=0.0, adapter_dtype="float32")
    with models.seeded(1):
        qpeft = lora.attach(model, targets, cfg)
    with models.seeded(1):
        rpeft = lora.attach(reference, targets, cfg)
    # LoRA's B starts at zero, which would leave A without gradient: give both the same non-zero B.
    lora_q = [(n, p) for n, p in qpeft.named_parameters() if "lora_" in n]
    lora_r = [(n, p) for n, p in rpeft.named_parameters() if "lora_" in n]
    for (n1, p1), (n2, p2) in zip(lora_q, lora_r, strict=True):
        assert n1 == n2
        if device == "cpu":
            torch.testing.assert_close(p1.data, p2.data)  # same seed, same initial adapters
        else:  # peft may initialise on another device's generator for some base layers: align them
            p2.data.copy_(p1.data)
        if "lora_B" in n1:
            p1.data.copy_(torch.randn(p1.shape, generator=torch.Generator().manual_seed(len(n1))) * 0.02)
            p2.data.copy_(p1.data)

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2)).to(device)
    low = compute_dtype != "float32"
    autocast = functools.partial(torch.autocast, device.split(":")[0], dtype=models.DTYPE[compute_dtype], enabled=low)
    with torch.no_grad(), autocast():  # (hqq computes in its compute dtype and wants inputs in it)
        qpeft.eval()
        qpeft(input_ids=ids)  # an eval-mode forward first: it arms bitsandbytes' autograd-less CPU kernel
    grads_r = _lora_grads(rpeft, ids)  # the fp32 reference
    with autocast():
        grads_q = _lora_grads(qpeft, ids)
        grads_r_low = _lora_grads(rpeft, ids) if low else None
    assert len(grads_q) == 2 * len(targets)
    for name, g in grads_r.items():
        assert g.abs().sum() > 0, name
        if not low:
            torch.testing.assert_close(grads_q[name], g, rtol=1e-4, atol=1e-6, msg=name)
        else:
            # 16-bit matmuls: the tolerance is the error the fp32 reference itself shows when run in that
            # dtype. A wrong quantized path is off by far more than rounding.
            noise = float((grads_r_low[name] - g).norm())
            err = float((grads_q[name] - g).norm())
            assert err <= 3 * noise + 1e-3 * float(g.norm()), f"{name}: {err:.3e} vs 16-bit noise {noise:.3e}"


@pytest.mark.parametrize(
    "qname, knobs", CASES, ids=[f"{q}-{'-'.join(f'{k}{v}' for k, v in kn.items())}" for q, kn in CASES]
)
def test_lora_gradients_through_quantized_base_match_dequantized_fp32(qname, knobs):
    _check_gradients(qname, knobs, "cpu")


GPU_CASES = [
    ("nf4", {}, "float32"),
    ("nf4", {}, "bfloat16"),
    ("hqq", {"nbits": 4, "group_size": 64}, "float32"),
    ("hqq", {"nbits": 2, "group_size": 32}, "float32"),
    ("hqq", {"nbits": 4, "group_size": 64}, "bfloat16"),
    ("rtn", {"bits": 4, "group_size": 64}, "float32"),
    ("gptq", {"bits": 3, "group_size": 64}, "float32"),
    ("qeft", {"bits": 4, "k": 4, "group_size": 64}, "bfloat16"),
    ("icq", {}, "float32"),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "qname, knobs, compute_dtype",
    GPU_CASES,
    ids=[f"{q}-{'-'.join(f'{k}{v}' for k, v in kn.items())}-{d}" for q, kn, d in GPU_CASES],
)
def test_lora_gradients_on_cuda(qname, knobs, compute_dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _check_gradients(qname, knobs, "cuda", compute_dtype)


def test_bitsandbytes_quantizer_disables_the_cpu_gemv_path():
    model = _tiny_random_llama()
    targets = list(models.find_linears(model, NAMES))
    quant.quantize_model("nf4", model, targets, quant.get("nf4").Config(), "float32", "cpu")
    assert all(model.get_submodule(t).support_avx512bf16_for_cpu is False for t in targets)
