"""Held-out perplexity: exp(mean NLL) over the labelled tokens of the validation split."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qpeft_bench.train import autocast, to_device


@torch.no_grad()
def heldout_perplexity(model, batches: Iterable[dict], device: str, compute_dtype: torch.dtype = torch.float32,
                       progress: bool = True, desc: str = "eval") -> dict:
    """Token-level NLL summed over every labelled (non -100) position, then averaged: batches of different
    lengths weigh by their tokens, not by their count."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
            batch = to_device(batch, device)
            with autocast(device, compute_dtype):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            logits = logits[:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum").item()
            count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    mean = nll / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count}
