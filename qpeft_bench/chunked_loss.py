"""Chunked lm_head + cross-entropy (the ``train.chunked_loss`` speed switch): the loss in chunks of tokens with the
logits recomputed in backward, so the (tokens x vocab) fp32 logits and their gradient never exist whole (~1 GiB at
8 x 512 x 32k). The same mean next-token NLL as the model's own loss, up to float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qpeft_bench.config import ConfigError


class _ChunkedNLL(torch.autograd.Function):
    """Sum over tokens of -log softmax(h W^T)[label] (labels -100 ignored), chunk by chunk; backward recomputes each
    chunk's logits. W (the lm_head) is frozen."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, hidden.shape[0], chunk):
            logits = (hidden[i : i + chunk] @ weight.t()).float()
            total += F.cross_entropy(logits, labels[i : i + chunk], ignore_index=-100, reduction="sum")
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, dtotal):
        hidden, weight, labels = ctx.saved_tensors
        dh = torch.empty_like(hidden)
        for i in range(0, hidden.shape[0], ctx.chunk):
            lab = labels[i : i + ctx.chunk]
            probs = torch.softmax((hidden[i : i + ctx.chunk] @ weight.t()).float(), dim=-1)
            valid = lab != -100
            probs[valid, lab[valid]] -= 1.0
            probs[~valid] = 0.0
            dh[i : i + ctx.chunk] = ((probs * dtotal).to(weight.dtype) @ weight).to(hidden.dtype)
        return dh, None, None, None


class _Hidden(nn.Module):
    """Stands in for lm_head while chunked: the model's 'logits' are its last hidden states."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.weight = head.weight  # what generation-side code reads (shape, dtype, device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM module inside peft / DDP wrappers."""
    inner = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


@contextlib.contextmanager
def chunked_loss(model: nn.Module, chunk: int) -> Iterator[None]:
    """While active, model(**batch).loss is the same mean next-token NLL computed chunk by chunk."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None or head.weight.requires_grad:
        raise ConfigError("train.chunked_loss needs a frozen lm_head without bias; set train.chunked_loss=0")
    weight = head.weight

    def loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs):
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        hidden = logits.reshape(-1, logits.shape[-1])
        target = shift_labels.reshape(-1).to(hidden.device)
        cdt = (
            torch.get_autocast_dtype(hidden.device.type)
            if torch.is_autocast_enabled(hidden.device.type)
            else weight.dtype
        )
        with torch.autocast(hidden.device.type, enabled=False):
            total = _ChunkedNLL.apply(hidden.to(cdt), weight.to(cdt), target, chunk)
        n = num_items_in_batch if num_items_in_batch is not None else (target != ignore_index).sum()
        return total / n

    lm.set_output_embeddings(_Hidden(head))
    lm.loss_function = loss
    try:
        yield
    finally:
        lm.set_output_embeddings(head)
        del lm._loss_function
