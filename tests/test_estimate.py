"""Plan-mode estimates of peak training memory and of step time (qpeft_bench/estimate.py).

Expected values come from the reference stack measured on the lent H100, docs/reference/gpu_baseline.md
(QLoRA r64 NF4+DQ on a LLaMA-2-7B-shaped model, batch 8 x 512). Architecture numbers are read from the model cards
and quantized bytes / trainable counts from plan_accounting, never typed here. The activation and FLOP
formulas are also checked against what autograd saves and what torch's FlopCounterMode counts on tiny models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qpeft_bench import estimate, models, quant
from qpeft_bench.adapters import lora
from qpeft_bench.config import ConfigError
from qpeft_bench.plan import plan_accounting
from qpeft_bench.spec import validate
from qpeft_bench.train import autocast, prepare_for_training

ROOT = Path(__file__).resolve().parents[1]

GIB = 2**30
BATCH, SEQ = 8, 512  # the reference step (gpu_baseline.md)

# docs/reference/gpu_baseline.md, "Variations of the QLoRA recipe": peak allocated GiB without fp32 upcast
REF_PEAK_GIB = {True: 7.19, False: 37.46}  # keyed by gradient checkpointing
# same file: "A QLoRA step above costs about 1.66e14 FLOP with gradient checkpointing ... and about 1.1e14 without"
REF_FLOPS = {True: 1.66e14, False: 1.1e14}
# same file: the row estimate.EFFICIENCY is calibrated on ("no fp32 upcast (checkpointing + input grads only)")
CALIBRATION_S = 0.755
# same file: measured s/step of rows NOT used for calibration, as (overrides, gradient checkpointing, s/step).
# Our step time does not depend on the norm upcast (our upcast widens the norms only), so the upcast rows are
# predicted like their no-upcast twins. QDoRA (1.718 s) and the HQQ rows (0.476, 0.479 s) are not modelled.
QLORA_R64 = ("peft.r=64", "peft.alpha=16")
OTHER_ROWS = {
    "no fp32 upcast, no checkpointing": (QLORA_R64, False, 0.441),
    "reference: fp32 upcast + checkpointing": (QLORA_R64, True, 0.818),
    "fp32 upcast, no checkpointing": (QLORA_R64, False, 0.605),
    "Q-IA3 NF4+DQ (reference recipe: checkpointing)": (("peft=ia3",), True, 0.674),
    "LoRA r64 bf16 base (reference recipe: checkpointing)": (("quant=none", *QLORA_R64), True, 0.646),
}


@pytest.fixture(scope="module")
def plan(compose):
    """plan(*overrides) -> (spec, accounting) of LLaMA-2-7B in plan mode, cached per override set."""
    cache = {}

    def _plan(*overrides):
        if overrides not in cache:
            spec = validate(compose(["mode=plan", "model=llama2_7b", *overrides]))
            cache[overrides] = (spec, plan_accounting(spec))
        return cache[overrides]

    return _plan


def _memory(spec, acc, *, gc: bool, upcast: bool = False, batch: int = BATCH, seq: int = SEQ) -> dict:
    """The call the recipe makes, with the training knobs of the reference step."""
    return estimate.train_memory(
        spec.model.arch_dict(),
        batch_size=batch,
        seq_len=seq,
        gradient_checkpointing=gc,
        upcast_norms_fp32=upcast,
        compute_dtype="bfloat16",
        model_dtype=spec.model.dtype,
        adapter_dtype=getattr(spec.peft, "adapter_dtype", spec.model.dtype),
        trainable_params=acc["trainable_params"],
        quantized_bytes=acc["quantized_model_bytes"],
        adapter_rank=getattr(spec.peft, "r", 0),
        adapter_dropout=getattr(spec.peft, "dropout", 0.0),
        adapter_targets=spec.peft_targets,
        optimizer="paged_adamw_32bit",
        output_follows_input_dtype=spec.quant_name in ("nf4", "fp4", "int8"),
        dequantizes=spec.quant_name != "none",
    )


def _flops(spec, acc, *, gc: bool, batch: int = BATCH, seq: int = SEQ) -> int:
    return estimate.step_flops(
        spec.model.arch_dict(),
        batch_size=batch,
        seq_len=seq,
        gradient_checkpointing=gc,
        trainable_params=acc["trainable_params"],
    )


# ---------------------------------------------------------------------------------------------------------------
# Against the H100 reference (gpu_baseline.md)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gc", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_peak_memory_matches_the_reference_without_upcast(plan, gc):
    spec, acc = plan(*QLORA_R64)
    mem = _memory(spec, acc, gc=gc)
    # the measured figure is max_memory_allocated, which does not see bitsandbytes' paged optimizer state
    assert mem["allocated_peak_bytes"] / GIB == pytest.approx(REF_PEAK_GIB[gc], rel=0.15)
    assert mem["peak_bytes"] / GIB == pytest.approx(REF_PEAK_GIB[gc], rel=0.15)


@pytest.mark.parametrize("gc", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_step_flops_match_the_reference(plan, gc):
    spec, acc = plan(*QLORA_R64)
    assert _flops(spec, acc, gc=gc) == pytest.approx(REF_FLOPS[gc], rel=0.10)


def test_efficiency_reproduces_its_calibration_row(plan):
    spec, acc = plan(*QLORA_R64)
    assert estimate.step_seconds(_flops(spec, acc, gc=True)) == pytest.approx(CALIBRATION_S, rel=0.01)


@pytest.mark.parametrize("row", list(OTHER_ROWS))
def test_step_seconds_predict_the_other_measured_rows(plan, row):
    overrides, gc, measured = OTHER_ROWS[row]
    spec, acc = plan(*overrides)
    assert estimate.step_seconds(_flops(spec, acc, gc=gc)) == pytest.approx(measured, rel=0.25)


# ---------------------------------------------------------------------------------------------------------------
# Structure and monotonicity
# ---------------------------------------------------------------------------------------------------------------


def test_components_add_up_and_paging_follows_bitsandbytes_threshold(plan):
    spec, acc = plan(*QLORA_R64)
    mem = _memory(spec, acc, gc=True)
    parts = {k: v for k, v in mem.items() if k not in ("peak_bytes", "paged_optimizer_bytes", "allocated_peak_bytes")}
    assert sum(parts.values()) == mem["peak_bytes"]
    assert mem["allocated_peak_bytes"] == mem["peak_bytes"] - mem["paged_optimizer_bytes"]
    assert mem["weights_bytes"] == acc["quantized_model_bytes"]
    # two fp32 AdamW states per trainable element (bitsandbytes' 32-bit optimizer)
    assert mem["optimizer_bytes"] == 2 * 4 * acc["trainable_params"]
    shapes = models.linear_shapes(spec.model.arch_dict(), spec.model.dtype, spec.model.linear_names).values()
    smallest_factor = 64 * min(min(s) for s in shapes)
    assert smallest_factor >= estimate.PAGED_MIN_ELEMENTS  # so r=64: every LoRA factor's state is paged
    assert mem["paged_optimizer_bytes"] == mem["optimizer_bytes"]
    spec8, acc8 = plan("peft.r=8")
    assert 8 * max(max(s) for s in shapes) < estimate.PAGED_MIN_ELEMENTS  # r=8: no factor reaches the threshold
    mem8 = _memory(spec8, acc8, gc=True)
    assert mem8["paged_optimizer_bytes"] == 0 and mem8["allocated_peak_bytes"] == mem8["peak_bytes"]


def test_more_tokens_cost_more_memory_and_time(plan):
    spec, acc = plan(*QLORA_R64)
    for gc in (True, False):
        sizes = [(4, 256), (4, 512), (8, 512), (8, 1024)]
        peaks = [_memory(spec, acc, gc=gc, batch=b, seq=s)["allocated_peak_bytes"] for b, s in sizes]
        flops = [_flops(spec, acc, gc=gc, batch=b, seq=s) for b, s in sizes]
        assert peaks == sorted(set(peaks)) and flops == sorted(set(flops))


def test_checkpointing_trades_memory_for_time(plan):
    spec, acc = plan(*QLORA_R64)
    with_gc, without = _memory(spec, acc, gc=True), _memory(spec, acc, gc=False)
    assert with_gc["activation_bytes"] < without["activation_bytes"]
    assert with_gc["peak_bytes"] < without["peak_bytes"]
    assert _flops(spec, acc, gc=True) > _flops(spec, acc, gc=False)


def test_higher_rank_needs_more_optimizer_memory(plan):
    low, high = (_memory(*plan(f"peft.r={r}"), gc=True) for r in (16, 64))
    assert high["optimizer_bytes"] > low["optimizer_bytes"]
    assert high["trainable_bytes"] > low["trainable_bytes"] and high["peak_bytes"] > low["peak_bytes"]


def test_norm_upcast_widens_norms_and_with_bitsandbytes_the_stream(plan):
    spec, acc = plan(*QLORA_R64)
    plain, up = _memory(spec, acc, gc=True), _memory(spec, acc, gc=True, upcast=True)
    norms = sum(
        p.numel()
        for n, p in models.build_meta_model(spec.model.arch_dict(), spec.model.dtype).named_parameters()
        if models.is_norm_param(n)
    )
    assert up["norm_upcast_bytes"] == norms * (4 - 2) and plain["norm_upcast_bytes"] == 0
    # bitsandbytes returns its input's dtype: the fp32 norm output turns the checkpointed hidden states fp32
    assert up["activation_bytes"] > plain["activation_bytes"]


def test_opt_1_3b_runs(compose):
    spec = validate(compose(["mode=plan", "model=opt_1_3b", "quant=nf4", "peft.r=16"]))
    acc = plan_accounting(spec)
    with_gc, without = _memory(spec, acc, gc=True), _memory(spec, acc, gc=False)
    assert acc["quantized_model_bytes"] < with_gc["allocated_peak_bytes"] < without["allocated_peak_bytes"]
    arch = spec.model.arch_dict()
    linear_params = sum(
        i * o for i, o in models.linear_shapes(arch, spec.model.dtype, spec.model.linear_names).values()
    )
    flops = _flops(spec, acc, gc=False)
    # at least forward and input-gradient backward of the block linears; attention and lm_head add to it
    assert flops > 2 * 2 * BATCH * SEQ * linear_params
    assert estimate.run_seconds(100, estimate.step_seconds(flops)) == pytest.approx(100 * estimate.step_seconds(flops))


def test_unusable_inputs_raise_config_errors(plan):
    spec, acc = plan(*QLORA_R64)
    arch = spec.model.arch_dict()
    kwargs = dict(
        batch_size=1,
        seq_len=8,
        gradient_checkpointing=True,
        upcast_norms_fp32=False,
        compute_dtype="bfloat16",
        adapter_dtype="bfloat16",
        trainable_params=1,
        quantized_bytes=1,
        adapter_rank=8,
        adapter_dropout=0.0,
    )
    with pytest.raises(ConfigError, match="model_type"):
        estimate.train_memory({**arch, "model_type": "gpt2"}, **kwargs)
    with pytest.raises(ConfigError, match="compute_dtype='auto'"):
        estimate.train_memory(arch, **{**kwargs, "compute_dtype": "auto"})
    with pytest.raises(ConfigError, match="fc1"):
        estimate.train_memory(arch, **kwargs, adapter_targets=["fc1"])
    with pytest.raises(ConfigError, match="intermediate_size"):
        estimate.step_flops(
            {k: v for k, v in arch.items() if k != "intermediate_size"},
            batch_size=1,
            seq_len=8,
            gradient_checkpointing=False,
            trainable_params=0,
        )


# ---------------------------------------------------------------------------------------------------------------
# The formulas against autograd on tiny models (CPU)
# ---------------------------------------------------------------------------------------------------------------

TINY_BATCH, TINY_SEQ, TINY_R = 2, 64, 8


def _tiny_model(arch: dict, qname: str, upcast: bool, gc: bool):
    torch.manual_seed(0)
    model = _from_config(arch)
    model.config.use_cache = False
    names = list(estimate.model_shape(arch).linears)
    targets = list(models.find_linears(model, names))
    qmod = quant.get(qname)
    qcfg = qmod.Config(**quant.preset(qname))
    for t in targets:
        parent, _, leaf = t.rpartition(".")
        setattr(
            model.get_submodule(parent), leaf, qmod.quantize_linear(model.get_submodule(t), qcfg, "bfloat16", "cpu")
        )
    model = lora.attach(model, targets, lora.Config(r=TINY_R, alpha=16, dropout=0.05, adapter_dtype="bfloat16"))
    prepare_for_training(model, upcast_norms_fp32=upcast, gradient_checkpointing=gc)
    model.enable_input_require_grads()  # as with checkpointing: every block computes its input gradients
    model.train()
    return model


def _from_config(arch: dict):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(models.hf_config(arch, "bfloat16"), dtype=torch.bfloat16)


def _tiny_arch(compose, family: str) -> dict:
    if family == "llama":  # the embedded tiny LLaMA (grouped-query attention: 2 key/value heads for 4 heads)
        return validate(compose([])).model.arch_dict()
    arch = validate(compose(["mode=plan", "model=opt_1_3b"])).model.arch_dict()  # the OPT-1.3B card, shrunk
    return {
        **arch,
        "hidden_size": 128,
        "ffn_dim": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 2048,
        "word_embed_proj_dim": 128,
    }


# LLaMA only: CPU autocast runs LayerNorm in bf16 where CUDA's runs it in fp32 (the OPT block's case in the estimate),
# so a tiny OPT on the CPU saves other tensors than on the GPU the estimate describes.
@pytest.mark.parametrize(("qname", "upcast"), [("nf4", False), ("nf4", True), ("none", True)])
def test_activation_bytes_equal_what_autograd_saves(compose, monkeypatch, qname, upcast):
    arch = _tiny_arch(compose, "llama")
    model = _tiny_model(arch, qname, upcast, gc=False)
    vocab = arch["vocab_size"]
    kept = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        # the loss tensors (last dim vocab) are the estimate's transient term; token ids/labels are not activations
        if ptr not in kept and t.shape[-1:] != (vocab,) and (t.is_floating_point() or t.dtype == torch.bool):
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, vocab, (TINY_BATCH, TINY_SEQ))
    mask = torch.ones_like(ids)
    mask[0, TINY_SEQ // 2 :] = 0  # a padded batch, as the estimate assumes (it decides how SDPA treats k and v)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast("cpu", torch.bfloat16):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    # CPU dropout multiplies by a noise tensor of its input's dtype (the bf16 adapter input) where CUDA keeps bools
    monkeypatch.setattr(estimate, "DROPOUT_MASK_BYTES", 2)
    mem = estimate.train_memory(
        arch,
        batch_size=TINY_BATCH,
        seq_len=TINY_SEQ,
        gradient_checkpointing=False,
        upcast_norms_fp32=upcast,
        compute_dtype="bfloat16",
        adapter_dtype="bfloat16",
        trainable_params=0,
        quantized_bytes=0,
        adapter_rank=TINY_R,
        adapter_dropout=0.05,
        output_follows_input_dtype=qname == "nf4",
    )
    # what the estimate leaves out: RoPE's cos/sin tables, shared by the layers (a fraction of a percent here)
    assert sum(saved.values()) == pytest.approx(mem["activation_bytes"], rel=0.005)


def _register_cpu_attention_flops():
    """FlopCounterMode knows the CUDA attention kernels, not the CPU flash kernel; count it with torch's formulas."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("gc", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_step_flops_equal_torch_flop_counter(compose, gc, family):
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_attention_flops()
    arch = _tiny_arch(compose, family)
    model = _tiny_model(arch, "none", upcast=False, gc=gc)  # bitsandbytes' kernels are invisible to the counter
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ids = torch.randint(0, arch["vocab_size"], (TINY_BATCH, TINY_SEQ))
    with FlopCounterMode(display=False) as counter, autocast("cpu", torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    expected = estimate.step_flops(
        arch, batch_size=TINY_BATCH, seq_len=TINY_SEQ, gradient_checkpointing=gc, trainable_params=trainable
    )
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.005)


# ---------------------------------------------------------------------------------------------------------------
# Calibration (calibration_memory, calibration_seconds, plan mode's "calibration" section)
# ---------------------------------------------------------------------------------------------------------------

# A small LLaMA with grouped-query attention and head_dim != hidden / heads, so that q, k, v, o have four
# different widths and a wrong input group would change the count.
SMALL_ARCH = {
    "model_type": "llama",
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 96,
    "max_position_embeddings": 64,
}


def _calib_memory(arch, sequential, statistic="hessian", samples=4, seq_len=8, base=1000, quantized=300, by_block=True):
    return estimate.calibration_memory(
        arch,
        samples=samples,
        seq_len=seq_len,
        sequential=sequential,
        statistic=statistic,
        model_dtype="bfloat16",
        base_model_bytes=base,
        quantized_model_bytes=quantized,
        loaded_by_block=by_block,
    )


def test_calibration_statistics_bytes_by_hand():
    a = SMALL_ARCH
    h, i, layers = a["hidden_size"], a["intermediate_size"], a["num_hidden_layers"]
    q_dim = a["num_attention_heads"] * a["head_dim"]
    # one fp32 in x in Hessian per distinct input of a block: q, k and v read the normed hidden state (h wide),
    # o_proj the attention output (heads x head_dim), gate and up the second normed state (h), down_proj the
    # MLP product (intermediate)
    per_block = 4 * (h * h + q_dim * q_dim + h * h + i * i)
    one, seq = _calib_memory(a, False), _calib_memory(a, True)
    assert one["stats_peak_bytes"] == layers * per_block
    assert seq["stats_peak_bytes"] == per_block == seq["stats_per_block_bytes"]
    assert one["stats_peak_bytes"] == layers * seq["stats_peak_bytes"]  # the block count factor, exactly
    # SmoothQuant-style per-channel statistics: one fp32 value per input channel of each distinct input
    assert _calib_memory(a, False, "channel")["stats_peak_bytes"] == layers * 4 * (h + q_dim + h + i)
    # sequential holds every window's block input and output in the model dtype (bf16)
    assert seq["held_activations_bytes"] == 2 * 4 * 8 * h * 2 and one["held_activations_bytes"] == 0
    # weights: the whole unquantized model in one pass; the quantized model plus one bf16 block in sequential
    linear = h * q_dim + 2 * h * (a["num_key_value_heads"] * a["head_dim"]) + q_dim * h + 3 * h * i
    assert one["weights_bytes"] == 1000
    assert seq["weights_quantized_bytes"] == 300
    assert seq["weights_unquantized_block_bytes"] == 2 * (linear + 2 * h)  # + its two RMSNorm weights
    for mem in (one, seq):
        parts = ("stats_peak_bytes", "held_activations_bytes", "weights_bytes")
        transient = max(mem["window_bytes"], mem["quantize_work_bytes"])
        assert mem["peak_bytes"] == sum(mem[k] for k in parts) + transient
        assert mem["activations_bytes"] == mem["held_activations_bytes"] + mem["window_bytes"]


def test_one_pass_statistics_equal_what_capture_inputs_holds():
    # The real one-pass hook (calibration.capture_inputs with calibration.hessian) on a model of SMALL_ARCH:
    # the distinct fp32 matrices it keeps are exactly what the estimate counts.
    from qpeft_bench import calibration

    model = models.build_meta_model(SMALL_ARCH, "float32").to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    targets = list(models.find_linears(model, LLAMA_LINEARS))
    windows = calibration.random_windows(SMALL_ARCH["vocab_size"], 2, 8, 0)
    states = calibration.capture_inputs(model, targets, windows, calibration.hessian, "cpu")
    held = {id(s[0]): s[0] for s in states.values()}
    assert (
        sum(t.numel() * t.element_size() for t in held.values()) == _calib_memory(SMALL_ARCH, False)["stats_peak_bytes"]
    )


LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _gptq_plan(compose, model, *extra):
    # act_order off: the reference's default, and the storage format of dynamic groups needs it
    spec = validate(compose(["mode=plan", f"model={model}", "quant=gptq", "quant.act_order=false", *extra]))
    from qpeft_bench import plan

    return plan.plan_estimate(spec, plan_accounting(spec))


def test_plan_mode_has_a_calibration_section_for_gptq_and_not_for_nf4(compose, plan):
    from qpeft_bench import plan as plan_mod

    spec, acc = plan()  # the default quantizer, nf4: no calibration
    assert not quant.needs_calibration(quant.get(spec.quant_name))
    assert "calibration" not in plan_mod.plan_estimate(spec, acc)
    seq, one = (_gptq_plan(compose, "llama2_7b", f"calib.sequential={s}")["calibration"] for s in ("true", "false"))
    assert seq["sequential"] is True and one["sequential"] is False
    for c in (seq, one):
        assert {"stats_peak_bytes", "activations_bytes", "weights_bytes", "peak_bytes", "seconds"} <= set(c)
    blocks = validate(compose(["model=llama2_7b"])).model.arch_dict()["num_hidden_layers"]
    assert one["stats_peak_bytes"] == blocks * seq["stats_peak_bytes"]
    assert seq["peak_bytes"] < one["peak_bytes"]
    # the arithmetic: one-pass Hessians of LLaMA-2-7B are about 22 GB in fp32
    assert one["stats_peak_bytes"] / 1e9 == pytest.approx(22, rel=0.02)


def test_llama2_70b_gptq_fits_one_gpu_only_block_by_block(compose):
    seq, one = (_gptq_plan(compose, "llama2_70b", f"calib.sequential={s}")["calibration"] for s in ("true", "false"))
    assert one["stats_peak_bytes"] > 300e9  # the issue: "over 300 GB for LLaMA-2-70B"
    assert one["weights_bytes"] > 128 * GIB  # and the bf16 model itself does not fit one GPU either
    assert one["loaded_by_block"] is False and one["peak_bytes"] > 78 * GIB
    # block by block, a run reads the checkpoint one block at a time (calib.load_by_block=auto; a hub checkpoint
    # not downloaded yet is planned as safetensors): it fits an 80 GB H100's usable memory
    assert seq["loaded_by_block"] is True and "one block at a time" in seq["basis"]
    assert seq["peak_bytes"] < 78 * GIB
    assert seq["weights_bytes"] == seq["weights_quantized_bytes"] + seq["weights_unquantized_block_bytes"]
    # loaded whole first (calib.load_by_block=false) the unquantized model alone is over one GPU
    whole = _gptq_plan(compose, "llama2_70b", "calib.load_by_block=false")["calibration"]
    assert whole["loaded_by_block"] is False and "loaded whole" in whole["basis"]
    assert whole["weights_bytes"] == one["weights_bytes"] and whole["peak_bytes"] > 78 * GIB


def test_plan_reads_a_local_checkpoint_without_safetensors_whole(compose, tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    c = _gptq_plan(compose, "llama2_7b", f"model.path={tmp_path}")["calibration"]
    assert c["loaded_by_block"] is False
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert _gptq_plan(compose, "llama2_7b", f"model.path={tmp_path}")["calibration"]["loaded_by_block"] is True


def test_smoothquant_stays_one_pass_with_channel_statistics(compose):
    spec = validate(compose(["mode=plan", "model=opt_1_3b", "quant=smoothquant", "calib.sequential=true"]))
    from qpeft_bench import plan

    c = plan.plan_estimate(spec, plan_accounting(spec))["calibration"]
    assert c["sequential"] is False and c["statistic"] == "channel"
    assert c["quantize_work_bytes"] == 0 and c["quantize_seconds"] == 0
    a = spec.model.arch_dict()
    # absmax vectors of q/k/v's, out_proj's, fc1's (hidden wide) and fc2's (ffn_dim) inputs: 1.4 MB for 1.3B
    assert c["stats_peak_bytes"] == a["num_hidden_layers"] * 4 * (3 * a["hidden_size"] + a["ffn_dim"])


def test_gptq_seconds_reproduce_their_calibration_row(plan):
    # results/bench/h100_2026-12-07_calibration: GPTQ 4-bit g128 of 8 LLaMA-2-7B-shaped blocks quantized in 68.64 s
    measured = json.loads((ROOT / "results/bench/h100_2026-12-07_calibration/calib_llama2_7b_8blocks.json").read_text())
    spec, _ = plan()
    arch = {**spec.model.arch_dict(), "num_hidden_layers": measured["blocks"]}
    t = estimate.calibration_seconds(arch, samples=16, seq_len=512, sequential=False, statistic="hessian")
    assert t["quantize_seconds"] == pytest.approx(round(measured["quantize_time_s"], 2), rel=1e-6)
    assert t["seconds"] == pytest.approx(
        sum(t[k] for k in ("forward_seconds", "statistics_seconds", "quantize_seconds"))
    )
    seq = estimate.calibration_seconds(arch, samples=16, seq_len=512, sequential=True, statistic="hessian")
    assert seq["forward_flops"] > t["forward_flops"]  # two passes over the blocks (statistics and propagation)


def test_calibration_estimates_refuse_unusable_inputs():
    with pytest.raises(ConfigError, match="calibration statistic 'median'"):
        _calib_memory(SMALL_ARCH, True, "median")
    with pytest.raises(ConfigError, match="must be > 0"):
        estimate.calibration_seconds(SMALL_ARCH, samples=0, seq_len=8, sequential=True, statistic="hessian")
