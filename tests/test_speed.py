"""Speed switches (qpeft_bench/speedups.py, fused_lora.py, chunked_loss.py) compute the same function as the plain
path; the memory budget chooses settings that fit; a sweep reuses its quantized base. Speed itself is measured by
scripts/bench_vs_reference.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from qpeft_bench import chunked_loss, fused_lora, quantized_base, recipe, results, speedups
from qpeft_bench.adapters import lora
from qpeft_bench.config import ConfigError
from qpeft_bench.evaluation.items import read_items
from qpeft_bench.spec import validate


def small_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=100,
    )
    return LlamaForCausalLM(cfg).float()


def with_lora(base, dora: bool, dropout: float):
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", use_dora=dora),
    )
    with torch.no_grad():  # B = 0 at init would hide every B-dependent term
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model.train()


def loss_and_grads(model, ids) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def max_rel(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)


@pytest.fixture
def fixed_dropout(monkeypatch):
    """The same drop pattern in peft's nn.Dropout and the fused function's native_dropout: a mask that depends on
    element positions only, so both paths drop the same elements and must agree exactly."""

    def mask_of(x):
        return (torch.arange(x.numel(), device=x.device).view_as(x) % 4) != 0

    def dropout(x, p=0.5, training=True, inplace=False):
        return x * mask_of(x) / (1 - p) if training else x

    def native(x, p, train):
        m = mask_of(x)
        return x * m / (1 - p), m

    monkeypatch.setattr(F, "dropout", dropout)
    monkeypatch.setattr(torch, "native_dropout", native)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no_dropout", "dropout"])
def test_fused_lora_matches_peft_loss_and_every_gradient(dora, dropout, fixed_dropout):
    base = small_llama()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    model = with_lora(base, dora, dropout)
    loss_peft, grads_peft = loss_and_grads(model, ids)
    assert fused_lora.fuse_lora(model) == 14  # 7 linears x 2 layers
    loss_fused, grads_fused = loss_and_grads(model, ids)
    assert loss_fused == pytest.approx(loss_peft, rel=1e-6)
    assert max_rel(grads_peft, grads_fused) < 1e-5
    if dora:
        assert any("lora_magnitude_vector" in k for k in grads_fused)  # the magnitude trains through the fused path
    fused_lora.unfuse_lora(model)
    assert loss_and_grads(model, ids)[0] == pytest.approx(loss_peft, rel=1e-6)  # peft's own forward again


@pytest.mark.parametrize("qname", ["nf4", "rtn", "hqq"])
def test_fused_lora_on_a_quantized_base_under_bf16_autocast_matches_peft(qname):
    from qpeft_bench import quant

    base = small_llama()
    targets = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    qmod = quant.get(qname)
    cfg = qmod.Config(group_size=32) if qname in ("rtn", "hqq") else qmod.Config()
    quant.quantize_model(qname, base, targets, cfg, "bfloat16", "cpu")
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    # the recipe's attach: peft's all-linear matches neither HQQ's nor our own quantized layers
    model = lora.attach(base, targets, lora.Config(r=4, alpha=8, dropout=0.0, adapter_dtype="float32")).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    x = torch.randn(2, 5, 64)  # fp32, as after norms upcast to fp32: the output dtype must be peft's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_peft, grads_peft = loss_and_grads(model, ids)
        y_peft = layer(x)
        assert fused_lora.fuse_lora(model) == 14
        loss_fused, grads_fused = loss_and_grads(model, ids)
        y_fused = layer(x)
    assert y_fused.dtype == y_peft.dtype
    assert loss_fused == pytest.approx(loss_peft, rel=1e-2)  # bf16 rounding in a different order
    assert max_rel(grads_peft, grads_fused) < 5e-2


def test_chunked_loss_is_the_same_mean_nll_and_gradient():
    model = with_lora(small_llama(), False, 0.0)
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :4] = -100  # ignored positions must stay ignored
    model.zero_grad()
    plain = model(input_ids=ids, labels=labels).loss
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with chunked_loss.chunked_loss(model, 7):  # 30 tokens in chunks of 7: a partial last chunk
        chunked = model(input_ids=ids, labels=labels).loss
        chunked.backward()
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert max_rel(grads, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}) < 1e-5
    assert model(input_ids=ids).logits.shape == (3, 10, 100)  # lm_head is back afterwards


def test_chunked_loss_refuses_a_trainable_lm_head():
    model = small_llama()
    with pytest.raises(ConfigError, match="frozen lm_head"), chunked_loss.chunked_loss(model, 8):
        pass


def test_switch_values_and_method_checks(compose):
    assert speedups.resolve("lora", "nf4", "cpu", "auto", "auto") == (True, False)
    assert speedups.resolve("ia3", "nf4", "cuda:0", "auto", "auto") == (False, True)
    assert speedups.resolve("lora", "gptq", "cuda:0", "auto", "auto") == (True, False)  # not measured compiled
    assert speedups.resolve("lora", "none", "cuda:0", "auto", "auto") == (True, False)
    assert speedups.resolve("lora", "gptq", "cuda:0", False, True) == (False, True)
    assert speedups.resolve("weak_columns", "qeft", "cuda:0", "auto", "auto") == (False, True)  # measured: 4x
    assert speedups.resolve("lora", "nf4", "cuda:0", "auto", "auto", sharded=True) == (False, False)  # FSDP
    validate(compose(["peft=ia3"]))  # auto leaves other methods alone
    with pytest.raises(ConfigError, match="train.fused_lora=true applies to peft.method"):
        validate(compose(["peft=ia3", "train.fused_lora=true"]))
    with pytest.raises(ConfigError, match="train.compile='fast'; choose true, false or auto"):
        validate(compose(["train.compile=fast"]))
    for bad in ("lots", "-2", "0"):
        with pytest.raises(ConfigError, match="train.memory_budget"):
            validate(compose([f"train.memory_budget={bad}"]))


def test_memory_budget_picks_the_fastest_setting_that_fits():
    estimates = {False: 30 * speedups.GIB, True: 7 * speedups.GIB}  # by gradient_checkpointing

    def estimate(settings):
        return estimates[settings["gradient_checkpointing"]]

    assert speedups.choose(40 * speedups.GIB, estimate) == (speedups.BUDGET_CANDIDATES[0], 30 * speedups.GIB)
    assert speedups.choose(10 * speedups.GIB, estimate) == (speedups.BUDGET_CANDIDATES[1], 7 * speedups.GIB)
    with pytest.raises(ConfigError, match="too small for this run"):
        speedups.choose(5 * speedups.GIB, estimate)
    assert speedups.budget_bytes(12, "cpu") == 12 * speedups.GIB
    assert 0 < speedups.budget_bytes("auto", "cpu")


def test_a_budgeted_run_records_its_choice_and_trains(compose, tmp_path):
    config = compose(
        [*FAST, "train.memory_budget=64", "train.gradient_checkpointing=true", "train.upcast_norms_fp32=true"]
    )
    assert recipe.run(config, tmp_path, progress=False) == "completed"
    tr = json.loads((tmp_path / "result.json").read_text())["train"]
    chosen = tr["speed"]["memory_budget"]["chosen"]
    # the tiny model fits anywhere: the fastest candidate wins over what the config asked for
    assert chosen == {**speedups.BUDGET_CANDIDATES[0], "chunked_loss": speedups.BUDGET_CHUNK}
    assert tr["gradient_checkpointing"] is False and tr["upcast_norms_fp32"] is False
    assert tr["speed"]["chunked_loss"] == speedups.BUDGET_CHUNK
    assert tr["speed"]["memory_budget"]["estimated_peak_bytes"] <= 64 * speedups.GIB


def test_fused_and_plain_runs_train_the_same(compose, tmp_path):
    runs = {}
    for fused in ("true", "false"):
        config = compose(
            [*FAST, f"train.fused_lora={fused}", "peft.dropout=0", "model.dtype=float32", "peft.adapter_dtype=float32"]
        )
        assert recipe.run(config, tmp_path / fused, progress=False) == "completed"
        runs[fused] = json.loads((tmp_path / fused / "result.json").read_text())
    assert runs["true"]["train"]["speed"]["fused_lora_layers"] > 0
    assert "fused_lora_layers" not in runs["false"]["train"]["speed"]
    for a, b in zip(runs["true"]["train"]["losses"], runs["false"]["train"]["losses"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)


def test_a_sweep_quantizes_its_base_once_and_trains_as_a_fresh_run_would(compose, tmp_path, monkeypatch):
    quantized_base._BASE_CACHE.clear()
    records = {}
    for name, extra in (("first", ["seed=1"]), ("second", ["seed=2"]), ("fresh", ["seed=2", "train.reuse_base=false"])):
        assert recipe.run(compose([*FAST, *extra]), tmp_path / name, progress=False) == "completed"
        records[name] = json.loads((tmp_path / name / "result.json").read_text())
    assert "reused" not in records["first"]["quant"]
    assert records["second"]["quant"]["reused"]["from"] == "process cache"
    assert "reused" not in records["fresh"]["quant"]

    # the reused base is the same base: same accounting, same quantization error, same training and evaluation
    def untimed(section: dict) -> dict:
        # the items file's hash covers its run id, which differs: its items are compared below
        return {k: v for k, v in section.items() if "time" not in k and k != "items"}

    for key in ("accounting", "eval"):
        assert untimed(records["second"][key]) == untimed(records["fresh"][key])
    items = [read_items(tmp_path / n / results.RECORD, records[n])["stages"] for n in ("second", "fresh")]
    assert items[0] == items[1]
    assert records["second"]["train"]["losses"] == records["fresh"]["train"]["losses"]
    assert records["second"]["quant"]["weight_rel_error"] == records["first"]["quant"]["weight_rel_error"]
    quantized_base._BASE_CACHE.clear()


def test_the_cached_copy_of_a_4bit_base_holds_nothing_of_the_model_it_was_copied_from():
    """quantized_base._BASE_CACHE deep-copies the quantized base: a back-reference from a 4-bit weight to its layer would
    come along as the same object and keep the finished run's model (on the GPU: a whole base) alive."""
    import gc
    import weakref

    from qpeft_bench.quant import bnb4bit

    layer = bnb4bit.quantize_linear(
        torch.nn.Linear(256, 128, bias=False).to(torch.bfloat16), bnb4bit.Config(), "bfloat16", "cpu"
    )
    model = torch.nn.Sequential(layer)
    alive = weakref.ref(layer)
    cache = copy.deepcopy(model)
    del model, layer
    gc.collect()
    assert alive() is None and cache[0].weight.quant_state is not None


# --------------------------------------------------------------------------- on the GPU (pytest -m gpu)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_gpu_fused_lora_and_compiled_layers_train_like_peft(compose, tmp_path):
    runs = {}
    for name, extra in (
        ("peft", ["train.fused_lora=false", "train.compile=false"]),
        ("fast", ["train.fused_lora=true", "train.compile=true", "train.chunked_loss=256"]),
    ):
        config = compose([*FAST, "train.device=cuda", "peft.dropout=0", *extra])
        assert recipe.run(config, tmp_path / name, progress=False) == "completed"
        runs[name] = json.loads((tmp_path / name / "result.json").read_text())
    assert runs["fast"]["train"]["speed"]["compiled_layers"] > 0
    for a, b in zip(runs["fast"]["train"]["losses"], runs["peft"]["train"]["losses"], strict=True):
        assert a == pytest.approx(b, rel=2e-2)  # bf16 on the GPU, fused in another order


@pytest.mark.gpu
@cuda
def test_gpu_a_4bit_base_survives_the_trip_to_the_cpu_cache_and_back():
    from qpeft_bench import quant

    base = small_llama().to(torch.bfloat16).cuda()
    targets = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    quant.quantize_model("nf4", base, targets, quant.get("nf4").Config(), "bfloat16", "cuda")
    ids = torch.randint(0, 100, (2, 12), device="cuda")
    with torch.no_grad():
        before = base(input_ids=ids).logits
    base.to("cpu")
    copied = copy.deepcopy(base).to("cuda")  # what quantized_base._BASE_CACHE hands the next run
    base.to("cuda")
    with torch.no_grad():
        assert torch.equal(copied(input_ids=ids).logits, before)
        assert torch.equal(base(input_ids=ids).logits, before)
