"""LoRA gradients through bitsandbytes NF4 on the CPU equal those of a dequantized fp32 reference.

DESIGN §7: on CPUs with AVX512-BF16 an eval-mode forward of a `Linear4bit` repacks its weight for a gemv kernel
without autograd, after which gradients are silently wrong. The quantizer turns that path off; this test runs
an eval-mode forward first, so it fails if the guard is lost.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qpeft_bench import adapters, models
from qpeft_bench.quant import bnb4bit

NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_random_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float().eval()


def _dequantized_copy(qmodel) -> torch.nn.Module:
    """The same network with each Linear4bit replaced by an fp32 nn.Linear holding its dequantized weight."""
    import bitsandbytes.functional as bf

    ref = copy.deepcopy(qmodel)
    for name, mod in list(ref.named_modules()):
        if type(mod).__name__ == "Linear4bit":
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = bf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
            lin.weight.requires_grad_(False)
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, lin)
    return ref


def _lora_grads(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("double_quant", [True, False])
def test_lora_gradients_through_nf4_match_dequantized_fp32(double_quant):
    model = _tiny_random_llama()
    targets = list(models.find_linears(model, NAMES))
    bnb4bit.quantize(model, targets, bnb4bit.Config(double_quant=double_quant), "float32", "cpu")
    reference = _dequantized_copy(model)

    cfg = adapters.get("lora").Config(r=4, alpha=8, dropout=0.0, adapter_dtype="float32")
    lora = adapters.get("lora")
    with models.seeded(1):
        qpeft = lora.attach(model, targets, cfg)
    with models.seeded(1):
        rpeft = lora.attach(reference, targets, cfg)
    # LoRA's B starts at zero, which would leave A without gradient: give both the same non-zero B.
    for (n1, p1), (n2, p2) in zip(qpeft.named_parameters(), rpeft.named_parameters(), strict=True):
        assert n1 == n2
        if "lora_" not in n1:
            continue
        if "lora_B" in n1:
            torch.manual_seed(hash(n1) % 2**31)
            p1.data.normal_(0, 0.02)
            p2.data.copy_(p1.data)
        torch.testing.assert_close(p1.data, p2.data)

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        qpeft.eval()
        qpeft(input_ids=ids)  # the eval-mode forward that would arm the bad CPU kernel
    grads_q, grads_r = _lora_grads(qpeft, ids), _lora_grads(rpeft, ids)
    assert len(grads_q) == 2 * len(targets)
    for name, g in grads_r.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads_q[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_quantizer_disables_the_cpu_gemv_path():
    model = _tiny_random_llama()
    targets = list(models.find_linears(model, NAMES))
    bnb4bit.quantize(model, targets, bnb4bit.Config(), "float32", "cpu")
    assert all(model.get_submodule(t).support_avx512bf16_for_cpu is False for t in targets)
