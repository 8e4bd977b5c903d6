"""Speed switches of the training step: 'auto' resolved, refused where they cannot apply, turned on and off, and the
memory budget that picks the fastest settings that fit. Each switch computes the same function as the plain path
(up to float rounding); the benchmark (scripts/bench_vs_reference.py) checks that by the loss trajectory and
measures what each buys.

- ``fused_lora``: every peft LoRA/DoRA layer on a frozen base runs as one autograd function (fused_lora.py).
- ``chunked_loss``: lm_head + cross-entropy in chunks of tokens (chunked_loss.py).
- ``compile``: torch.compile each decoder layer (regional compilation: one compiled graph reused by every layer),
  which fuses the norms, rotary embedding, activation and residual adds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from qpeft_bench import adapters, quant
from qpeft_bench.chunked_loss import causal_lm, chunked_loss
from qpeft_bench.config import ConfigError
from qpeft_bench.fused_lora import fuse_lora, unfuse_lora

# compile=auto compiles only what was measured to compile and train (results/bench/h200.md), the quantizers with
# COMPILE_TESTED: NF4, HQQ and RTN bases with the LoRA family, IA3, Q-BaRA, QA-HiRA and QA-LoRA (FP4 is the same
# bitsandbytes layer as NF4), and QEFT with weak-column tuning, 4x faster compiled since its group dequantization is
# a chain of small kernels eager (OWQ is the same layer class). Others stay eager unless compile=true asks for it.


def resolve(
    method: str, quant_name: str, device: str, fused_lora: bool | str, compile: bool | str, sharded: bool = False
) -> tuple[bool, bool]:
    """The switches' 'auto' made concrete: fused LoRA for peft's LoRA family, compilation on CUDA for the
    quantizers it was measured with; neither under FSDP (`sharded`), whose gathered weights reach a layer only
    through its own forward (check refuses asking for them)."""
    fused = adapters.capability(method, "FUSED_LORA") and not sharded if fused_lora == "auto" else bool(fused_lora)
    if compile == "auto":
        compiled = device.startswith("cuda") and quant.capability(quant_name, "COMPILE_TESTED") and not sharded
    else:
        compiled = bool(compile)
    return fused, compiled


def setup(
    model: nn.Module,
    *,
    method: str,
    quant_name: str,
    device: str,
    fused_lora: bool | str,
    compile: bool | str,
    sharded: bool = False,
) -> dict:
    """Turn on the model-side switches (after adapters and checkpointing are set up, before any DDP wrap); returns
    what was done, for the record."""
    fused, compiled = resolve(method, quant_name, device, fused_lora, compile, sharded)
    done = {"fused_lora": fused, "compile": compiled}
    if fused:
        done["fused_lora_layers"] = fuse_lora(model)
    if compiled:
        done["compiled_layers"] = compile_layers(model)
    return done


def teardown(model: nn.Module) -> None:
    """Back to peft's layers and eager decoder layers after training, so that evaluation computes exactly what a
    re-evaluation from the saved adapter (mode=eval) or any user of it computes (bf16 rounds the fused sum
    differently: the tiny model's perplexity moved by 0.4%)."""
    unfuse_lora(model)
    layers = getattr(getattr(causal_lm(model), "model", None), "layers", None) or []
    for layer in layers:
        layer._compiled_call_impl = None  # what nn.Module.compile() set


def loss_context(model: nn.Module, chunk: int) -> contextlib.AbstractContextManager:
    """The training loss as the switch asks: chunked (chunk > 0) or the model's own."""
    return chunked_loss(model, chunk) if chunk > 0 else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# Memory budget
# ---------------------------------------------------------------------------------------------------------------

GIB = 2**30
AUTO_FRACTION = 0.9  # memory_budget=auto: this share of the device (the rest: CUDA context, fragmentation, NVML)
BUDGET_CHUNK = 2048  # the loss chunk a budgeted run uses when none is set (measured: -0.3 GiB and faster at 7B)
# Settings to try, fastest first (results/bench/h200.md: without checkpointing a QLoRA step is ~1.4x faster; the
# fp32 upcast of the norms costs ~1.1x and ~1 GiB at 7B). The first whose plan-mode estimate fits is taken.
BUDGET_CANDIDATES = (
    {"gradient_checkpointing": False, "upcast_norms_fp32": False},
    {"gradient_checkpointing": True, "upcast_norms_fp32": False},
)


def budget_bytes(budget: str | float, device: str) -> int:
    """train.memory_budget in bytes: GiB as given, or for auto AUTO_FRACTION of the device's memory."""
    if budget != "auto":
        return int(float(budget) * GIB)
    if device.startswith("cuda"):
        return int(AUTO_FRACTION * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    import os

    return int(AUTO_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def choose(budget: int, estimate: Callable[[dict], int | None]) -> tuple[dict, int]:
    """The fastest candidate whose estimated peak fits in `budget` bytes, and that estimate."""
    tried = []
    for settings in BUDGET_CANDIDATES:
        peak = estimate(settings)
        if peak is None:
            raise ConfigError(
                "train.memory_budget needs plan mode's memory estimate, which this architecture does "
                "not have; set train.gradient_checkpointing yourself and train.memory_budget=null"
            )
        if peak <= budget:
            return settings, peak
        tried.append(f"{settings} needs ~{peak / GIB:.1f} GiB")
    raise ConfigError(
        f"train.memory_budget={budget / GIB:.1f} GiB is too small for this run: "
        f"{'; '.join(tried)}; lower train.batch_size or the sequence lengths, or raise the budget"
    )


def check(method: str, fused_lora: bool | str, compile: bool | str = "auto", distributed: str = "none") -> None:
    """Refuse switches that cannot apply to the run (before any model is loaded)."""
    if distributed == "fsdp" and (fused_lora is True or compile is True):
        raise ConfigError(
            "train.fused_lora=true and train.compile=true do not apply under train.distributed=fsdp "
            "(FSDP gathers a layer's weights only inside its own forward): set them to auto or false"
        )
    if fused_lora is True and not adapters.capability(method, "FUSED_LORA"):
        raise ConfigError(
            f"train.fused_lora=true applies to peft.method in {adapters.names_where('FUSED_LORA')} (LoRA, rsLoRA, DoRA, "
            f"LoftQ); peft.method={method} has its own layers: set train.fused_lora=false"
        )


# ---------------------------------------------------------------------------------------------------------------
# Regional compilation
# ---------------------------------------------------------------------------------------------------------------


def compile_layers(model: nn.Module) -> int:
    """torch.compile every decoder layer in place (nn.Module.compile); returns how many."""
    lm = causal_lm(model)
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"train.compile: {type(lm).__name__} has no model.layers to compile")
    for layer in layers:
        layer.compile()
    return len(layers)
