"""Running a decoder-only model one block at a time, for block-by-block calibration (quant.quantize_model with
calib.sequential).

The reference GPTQ/OWQ/QEFT code catches the hidden states entering the first decoder block (and the keyword
arguments the model passes every block: attention mask, rotary embeddings, positions), then walks the blocks: each
block's statistics are gathered on its inputs, the block is quantized, and its outputs *as quantized* become the
next block's inputs. Only one block's statistics and the hidden states of the calibration windows (twice: inputs
and outputs) are held at any time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qpeft_bench import families


class _Caught(Exception):
    """Raised by the hook on the first block: everything after it is not needed."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(module name prefix, the list of decoder blocks) where the model's family declares them (families.py)."""
    family = families.get(getattr(model.config, "model_type", None))
    try:
        blocks = model.get_submodule(family.blocks)
    except AttributeError:
        blocks = None
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__}: no decoder blocks at {family.blocks}, where {family.model_type} keeps them; "
            "calibrate it in one pass (calib.sequential=false)"
        )
    return family.blocks, blocks


@torch.no_grad()
def first_block_inputs(model: nn.Module, windows: torch.Tensor, device: str) -> tuple[list[torch.Tensor], dict]:
    """([hidden states entering the first decoder block, one per window], the keyword arguments the model passes
    every block). The windows have one length, so those arguments (mask, positions, rotary embeddings) are the
    same for all: they are kept once, as the reference does."""
    _, blocks = decoder_blocks(model)
    caught: list[torch.Tensor] = []
    shared: dict = {}

    def catch(module, args, kwargs):
        kwargs = dict(kwargs)
        caught.append(args[0] if args else kwargs.pop("hidden_states"))
        shared.clear()
        shared.update(kwargs)
        raise _Caught

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        for i in range(windows.shape[0]):
            try:
                model(input_ids=windows[i : i + 1].to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
        model.train(was_training)
    return caught, shared


def _forward(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    y = block(hidden, **kwargs)
    return y[0] if isinstance(y, tuple) else y  # older transformers return (hidden, ...)


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """The block's outputs for each input (the next block's inputs)."""
    was_training = block.training
    block.eval()
    try:
        return [_forward(block, h, kwargs) for h in inputs]
    finally:
        block.train(was_training)


def block_capture(model: nn.Module, block: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> Callable:
    """capture(targets, reduce) for quantizers' `prepare`: runs `inputs` through `block` only, folding the targets'
    input statistics with `reduce` (calibration.capture_with's contract)."""
    from qpeft_bench.calibration import capture_with

    def capture(targets: list[str], reduce) -> dict:
        was_training = block.training
        block.eval()
        try:
            steps = ((lambda h=h: _forward(block, h, kwargs)) for h in inputs)
            return capture_with(model, targets, reduce, steps)
        finally:
            block.train(was_training)

    return capture
