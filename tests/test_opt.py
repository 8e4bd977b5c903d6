"""OPT support (the SmoothQuant + QLoRA study used OPT-1.3B): other module names (out_proj, fc1, fc2), LayerNorm with
bias, learned positions, tied embeddings. A small OPT with random weights is saved in the real save_pretrained
layout (with the embedded tokenizer) and run end to end through the recipe with several quantizers."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import FAST

from qpeft_bench import ASSETS, plan, recipe
from qpeft_bench.spec import validate

OPT_NAMES = "[q_proj,k_proj,v_proj,out_proj,fc1,fc2]"


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    out = tmp_path_factory.mktemp("tiny_opt")
    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=2048,
        hidden_size=128,
        ffn_dim=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        word_embed_proj_dim=128,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
    )
    OPTForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / "tiny_llama" / name, out / name)
    return out


def _opt_overrides(path) -> list[str]:
    return [f"model.path={path}", "model.family=opt", "model.name=tiny_opt", f"model.linear_names={OPT_NAMES}"]


@pytest.mark.parametrize("qname", ["nf4", "hqq", "gptq", "smoothquant"])
def test_real_runs_on_an_opt_model(compose, tmp_path, tiny_opt, qname):
    config = compose([*FAST, *_opt_overrides(tiny_opt), f"quant={qname}"])
    assert recipe.run(config, tmp_path, progress=False) == "completed"
    rec = json.loads((tmp_path / "result.json").read_text())
    layers = rec["quant"]["layers"]
    assert len(layers) == 2 * 6 and any(n.endswith("self_attn.out_proj") for n in layers)
    assert all(math.isfinite(e["output_rel_error"]) for e in layers.values())
    assert math.isfinite(rec["eval"]["after"]["ppl_heldout"])
    planned = plan.plan_accounting(validate({**config, "mode": "plan"}))
    for key in ("quantized_model_bytes", "param_buffer_bytes", "trainable_params", "adapter_bytes"):
        assert rec["accounting"][key] == planned[key], key


def test_plan_mode_on_the_opt_1_3b_card(compose):
    acc = plan.plan_accounting(validate(compose(["model=opt_1_3b", "mode=plan", "quant=smoothquant", "peft.r=16"])))
    # LoRA on the six linear types of 24 layers: r (in + out) per layer, from the card's shapes
    h, f, layers, r = 2048, 8192, 24, 16
    assert acc["trainable_params"] == layers * r * (4 * (h + h) + (h + f) + (f + h))
    assert 7.9 < acc["bits_per_weight"] < 8.1  # int8 codes plus per-channel scales
