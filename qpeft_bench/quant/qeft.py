"""QEFT (Lee et al. 2024): weak columns chosen from lambda_j = H_jj alone, as ONE global set for the hidden
dimension, made contiguous by Offline Global Reordering; the other columns are quantized with GPTQ.

Why global: the residual stream's outlier channels are the same in every layer, so one set of hidden channels
serves every layer that reads the stream (q, k, v, gate, up). Permuting the hidden dimension of the whole model
(embedding columns, every norm, the rows of every layer writing the stream, the columns of every layer reading
it, lm_head's columns) puts those channels first and changes no output: RMSNorm is permutation-invariant and
rotary embeddings act on q/k *outputs*. down_proj's input (the MLP's intermediate dimension) is reordered per
layer (gate/up rows with down columns), from its own lambda. o_proj's input is the attention heads'
concatenated values; it is not reordered and keeps per-layer indices.
Storage and layer: weakcol.py (reordered layers hold their weak columns first and read them with a slice).
"""

from __future__ import annotations

import torch
from torch import nn

from qpeft_bench.quant.gptq import layer_hessians
from qpeft_bench.quant.weakcol import (  # noqa: F401 - the quantizer protocol, shared with OWQ
    Config,
    check_against_arch,
    dequantize,
    layer_classes,
    linear_storage,
    quantize_with_weak_columns,
    state_bytes,
)

NEEDS_CALIBRATION = True
COMPILE_TESTED = True  # with weak-column tuning 4x faster compiled: its group dequantization is many small kernels
WEAK_COLUMNS = True  # OWQ's layer
FAMILIES = ("llama",)  # the reordering walks LLaMA's module layout
STREAM_READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def _normalised_diag(H: torch.Tensor) -> torch.Tensor:
    d = torch.diagonal(H)
    return d / d.mean().clamp(min=1e-30)  # every layer votes with the same weight


def global_weak_columns(hessians: list[torch.Tensor], k: int) -> torch.Tensor:
    """The k hidden channels with the largest summed (per-layer normalised) H_jj, sorted."""
    score = sum(_normalised_diag(H) for H in hessians)
    return torch.topk(score, k).indices.sort().values


def weak_first(weak: torch.Tensor, n: int) -> torch.Tensor:
    """A permutation of range(n) with `weak` first, the others after in their order."""
    rest = torch.ones(n, dtype=torch.bool, device=weak.device)
    rest[weak] = False
    return torch.cat([weak, torch.arange(n, device=weak.device)[rest]])


def _permute_(param: torch.Tensor | None, perm: torch.Tensor, dim: int) -> None:
    if param is not None:
        param.data = param.data.index_select(dim, perm.to(param.device)).contiguous()


@torch.no_grad()
def reorder_hidden(model: nn.Module, perm: torch.Tensor) -> None:
    """Permute the hidden dimension of a LLaMA-family model; the function it computes does not change."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    _permute_(emb.weight, perm, 1)
    if head is not None and head.weight is not emb.weight:  # tied weights are permuted once
        _permute_(head.weight, perm, 1)
    _permute_(model.model.norm.weight, perm, 0)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            _permute_(norm.weight, perm, 0)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _permute_(lin.weight, perm, 1)
        for lin in (attn.o_proj, mlp.down_proj):  # they write the stream: rows
            _permute_(lin.weight, perm, 0)
            _permute_(lin.bias, perm, 0)


@torch.no_grad()
def reorder_intermediate(mlp: nn.Module, perm: torch.Tensor) -> None:
    """Permute one MLP's intermediate dimension: gate/up rows with down_proj's columns."""
    for lin in (mlp.gate_proj, mlp.up_proj):
        _permute_(lin.weight, perm, 0)
        _permute_(lin.bias, perm, 0)
    _permute_(mlp.down_proj.weight, perm, 1)


def prepare(model, targets: list[str], cfg: Config, windows: torch.Tensor, device: str) -> dict:
    hessians = layer_hessians(model, targets, windows, device)
    kind = {t: t.rsplit(".", 1)[-1] for t in targets}
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    readers = [t for t in targets if kind[t] in STREAM_READERS]
    if readers:
        unique = list({id(hessians[t]): hessians[t] for t in readers}.values())
        hidden = unique[0].shape[0]
        perm = weak_first(global_weak_columns(unique, cfg.k), hidden)
        reorder_hidden(model, perm)
        permuted = {}  # q, k, v (gate, up) share one Hessian: permute it once
        for t in readers:
            H = hessians[t]
            if id(H) not in permuted:
                permuted[id(H)] = H[perm][:, perm]
            stats[t] = (permuted[id(H)], torch.arange(cfg.k, device=H.device))

    for t in targets:
        H = hessians[t]
        if kind[t] == "down_proj":
            perm = weak_first(torch.topk(torch.diagonal(H), cfg.k).indices.sort().values, H.shape[0])
            reorder_intermediate(model.get_submodule(t.rsplit(".", 1)[0]), perm)
            stats[t] = (H[perm][:, perm], torch.arange(cfg.k, device=H.device))
        elif kind[t] not in STREAM_READERS:  # o_proj: per-layer indices, no reordering
            stats[t] = (H, torch.topk(torch.diagonal(H), cfg.k).indices.sort().values)
    return stats


def quantize_linear(old, cfg: Config, compute_dtype: str, device: str, stats):
    if stats is None:
        raise ValueError("qeft: no Hessian for this layer; the calibration pass did not reach it")
    H, weak = stats
    return quantize_with_weak_columns(old, H, weak, cfg, device)
