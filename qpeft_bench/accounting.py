"""Parameter and memory accounting (docs/design.md §5). Pure functions of a model; the same code runs on a meta-device
model in plan mode (sizes of quantized layers come from the quantizer's storage format) and on a real loaded
model (sizes come from the tensors actually held)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from qpeft_bench.models import is_norm_param


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def param_buffer_bytes(model: nn.Module) -> int:
    """Parameters + buffers as stored: what transformers' `get_memory_footprint()` returns and what the
    published tables print. It leaves out quantization state kept outside parameters."""
    return tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())


def base_sizes(model: nn.Module) -> dict:
    """Logical size of an *unquantized* model: element count and bytes in its dtype."""
    return {"total_params": sum(p.numel() for p in model.parameters()), "base_model_bytes": param_buffer_bytes(model)}


def planned_quantized_sizes(
    model: nn.Module, targets: list[str], linear_storage: Callable[[int, int, bool], tuple[int, int]]
) -> dict:
    """Sizes of `model` after quantizing `targets`, computed from the storage format without quantizing.

    `linear_storage(in_f, out_f, bias)` returns (parameter+buffer bytes, state bytes) of one quantized linear.
    """
    pb = param_buffer_bytes(model)
    q_bytes = state = numel = 0
    for name in targets:
        lin = model.get_submodule(name)
        params, st = linear_storage(lin.in_features, lin.out_features, lin.bias is not None)
        pb += params - param_buffer_bytes(lin)
        q_bytes += params + st
        state += st
        numel += lin.in_features * lin.out_features
    return _quantized_summary(pb, state, q_bytes, numel)


def measured_quantized_sizes(model: nn.Module, targets: list[str], state_bytes: Callable[[nn.Module], int]) -> dict:
    """Sizes of a really quantized model: its tensors, plus the state each quantized layer keeps aside."""
    pb = param_buffer_bytes(model)
    q_bytes = state = numel = 0
    for name in targets:
        lin = model.get_submodule(name)
        st = state_bytes(lin)
        q_bytes += param_buffer_bytes(lin) + st
        state += st
        numel += lin.in_features * lin.out_features
    return _quantized_summary(pb, state, q_bytes, numel)


def _quantized_summary(pb: int, state: int, q_bytes: int, numel: int) -> dict:
    return {
        "param_buffer_bytes": pb,
        "quantized_model_bytes": pb + state,
        "quant_state_bytes": state,
        "bits_per_weight": 8 * q_bytes / numel if numel else None,
    }


def adapter_sizes(model: nn.Module, param_buffer_bytes_before: int, total_params: int) -> dict:
    """Trainable parameters and the PEFT overhead: footprint with adapters minus footprint without, at the
    same stage and before any upcast of non-adapter weights."""
    trainable = trainable_parameters(model)
    n = sum(p.numel() for p in trainable)
    return {
        "trainable_params": n,
        "trainable_pct": 100.0 * n / total_params,
        "adapter_bytes": tensor_bytes(trainable),
        "peft_overhead_bytes": param_buffer_bytes(model) - param_buffer_bytes_before,
    }


def qlora_recipe_overhead_bytes(model: nn.Module, peft_overhead_bytes: int, added_tokens: int = 1) -> int:
    """The overhead as qlora.py's set-up shows it, which is what the published overhead tables measured.

    qlora.py ends its set-up with the norms in fp32 (up from bf16) and, for LLaMA tokenizers without a pad
    token, one more row in the input embedding and in lm_head. Measured against the plainly loaded model,
    that adds a constant to the adapter bytes: for LLaMA-2-7B 65 norms x 4096 x 2 B + 2 x 4096 x 2 B =
    548,864 B = 0.523 MiB, the constant visible in the thesis' table 4.4. We report it separately so our own
    `peft_overhead_bytes` stays the adapters alone.
    """
    norm_upcast = sum(
        p.numel() * (4 - p.element_size())
        for name, p in model.named_parameters()
        if is_norm_param(name) and p.element_size() < 4
    )
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    rows = added_tokens * (
        emb.shape[1] * emb.element_size() + (out.shape[1] * out.element_size() if out is not emb else 0)
    )
    return peft_overhead_bytes + norm_upcast + rows
