"""QEFT (Lee et al. 2024): weak columns as ONE global set of hidden channels, made contiguous by Offline Global
Reordering; the other columns are quantized with GPTQ (or, as the paper does for 70B, rounded to nearest).

As the reference runs (xvyaward/qeft README commands; `extract_outidx.py`, `main.py`, `recon.py`
`hessian_sorting` and `fasterquant_reorder`; docs/fidelity.md):
- The global set: every layer reading the residual stream (q, k, v, gate, up) votes with its normalised Hessian
  diagonal H_jj / mean(H_jj), measured on the unquantized model (`--no_frob_norm` in the extraction command); q,
  k and v vote separately though they share one input, so attention outweighs the MLP 3:2. The k channels with the
  largest summed vote are kept.
- Permuting the hidden dimension of the whole model (embedding columns, every norm, the rows of every layer writing
  the stream, the columns of every layer reading it, lm_head's columns) puts those channels first and changes no
  output: RMSNorm is permutation-invariant and rotary embeddings act on q/k *outputs*.
- o_proj and down_proj choose their own k weak columns from H_jj * ||dW_j||^2 (the main command scores them with
  the error term). down_proj's input (the MLP's intermediate dimension) is reordered per layer (gate/up rows with
  down columns); o_proj's input (the heads' concatenated values) is not, and keeps per-layer indices.
Storage and layer: weakcol.py (reordered layers hold their weak columns first and read them with a concatenation).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
from torch import nn

from qpeft_bench.calibration import hessian, square_sum
from qpeft_bench.config import ConfigError
from qpeft_bench.models import index_select_  # a linear not yet brought in keeps the permutation for later
from qpeft_bench.quant import fit, weakcol
from qpeft_bench.quant.gptq import finish_hessians
from qpeft_bench.quant.owq import weak_columns
from qpeft_bench.quant.weakcol import (  # noqa: F401 - the quantizer protocol, shared with OWQ
    check_against_arch,
    dequantize,
    layer_classes,
    linear_storage,
    quantize_with_weak_columns,
    state_bytes,
)

NEEDS_CALIBRATION = True
SEQUENTIAL = True  # the reference calibrates block by block on the quantized blocks' outputs
COMPILE_TESTED = True  # with weak-column tuning 4x faster compiled: its group dequantization is many small kernels
WEAK_COLUMNS = True  # OWQ's layer
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
FAMILIES_WHY = (
    "its channel reordering walks LLaMA's block layout, two norms and separate q/k/v and gate/up linears; Gemma's "
    "extra norms, Phi-3's fused linears and OPT's LayerNorm biases and learned positions are not written"
)
STREAM_READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


@dataclass
class Config(weakcol.Config):
    k: int = 32  # weak columns per layer (QEFT's paper: 128 on 7B); k < in_features of every layer
    global_vote: typing.Literal["layers", "inputs"] = "layers"  # layers: q, k, v, gate, up vote (reference, 3:2)
    # inputs (ours): each distinct input votes once (1:1)
    method: typing.Literal["gptq", "nearest"] = "gptq"  # nearest: round to nearest, no Hessians (the paper's 70B)

    def check(self, where: str) -> None:
        if self.method == "nearest":
            for knob in ("act_order", "static_groups"):
                if getattr(self, knob):
                    raise ConfigError(f"{where}.{knob} applies to method=gptq only; method=nearest has no sweep")
        super().check(where)


def _normalised(d: torch.Tensor) -> torch.Tensor:
    return d / d.mean()  # every layer votes with the same weight


def global_weak_columns(diagonals: list[torch.Tensor], k: int) -> torch.Tensor:
    """The k hidden channels with the largest summed normalised H_jj (one vote per tensor given), sorted."""
    score = torch.zeros_like(diagonals[0])
    for d in diagonals:
        score += _normalised(d)
    return torch.sort(torch.topk(score, k).indices).values


def weak_first(weak: torch.Tensor, n: int) -> torch.Tensor:
    """A permutation of range(n) with `weak` first, the others after in their order."""
    rest = torch.ones(n, dtype=torch.bool, device=weak.device)
    rest[weak] = False
    return torch.cat([weak, torch.arange(n, device=weak.device)[rest]])


@torch.no_grad()
def reorder_hidden(model: nn.Module, perm: torch.Tensor) -> None:
    """Permute the hidden dimension of a LLaMA-family model; the function it computes does not change."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    index_select_(emb.weight, 1, perm)
    if head is not None and head.weight is not emb.weight:  # tied weights are permuted once
        index_select_(head.weight, 1, perm)
    index_select_(model.model.norm.weight, 0, perm)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            index_select_(norm.weight, 0, perm)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            index_select_(lin.weight, 1, perm)
        for lin in (attn.o_proj, mlp.down_proj):  # they write the stream: rows
            index_select_(lin.weight, 0, perm)
            index_select_(lin.bias, 0, perm)


@torch.no_grad()
def reorder_intermediate(mlp: nn.Module, perm: torch.Tensor) -> None:
    """Permute one MLP's intermediate dimension: gate/up rows with down_proj's columns."""
    for lin in (mlp.gate_proj, mlp.up_proj):
        index_select_(lin.weight, 0, perm)
        index_select_(lin.bias, 0, perm)
    index_select_(mlp.down_proj.weight, 1, perm)


def _diagonals(states: dict, targets: list[str], vote: str) -> list[torch.Tensor]:
    """The readers' H_jj (up to one factor per input, which normalising removes); with vote=inputs, one per
    distinct input (layers fed the same tensor share one state)."""
    if vote == "inputs":
        states = {id(states[t]): states[t] for t in targets}
        return [s[0] for s in states.values()]
    return [states[t][0] for t in targets]


def prepare_global(model, targets: list[str], cfg: Config, capture, device: str) -> None:
    """The global weak set, from the unquantized model, and the reordering that puts it first."""
    readers = [t for t in targets if t.rsplit(".", 1)[-1] in STREAM_READERS]
    if not readers:
        return
    states = capture(readers, square_sum)
    weak = global_weak_columns(_diagonals(states, readers, cfg.global_vote), cfg.k)
    reorder_hidden(model, weak_first(weak, states[readers[0]][0].shape[0]))


def prepare(model, targets: list[str], cfg: Config, capture, device: str) -> dict:
    """Per block (or all at once): each target's Hessian (or, for method=nearest, its diagonal) and weak columns.
    The hidden dimension is already reordered (prepare_global): stream readers keep columns 0..k-1."""
    if cfg.method == "nearest":  # only the diagonals: no in x in matrix is ever formed (70B's down_proj: 3.3 GB)
        stats_in = {t: state[0] * (2.0 / state[1]) for t, state in capture(targets, square_sum).items()}
    else:
        stats_in = finish_hessians(capture(targets, hessian))
    stats: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    for t in targets:
        H, kind = stats_in[t], t.rsplit(".", 1)[-1]
        diag = H if H.dim() == 1 else torch.diagonal(H)
        first_k = torch.arange(cfg.k, device=H.device)
        if kind in STREAM_READERS:
            stats[t] = (H, first_k)
            continue
        weak, _ = weak_columns(model.get_submodule(t).weight.data.to(H.device), diag, cfg)
        if kind == "down_proj":  # weak columns first, in the reference's processing order
            perm = weak_first(weak, diag.shape[0])
            reorder_intermediate(model.get_submodule(t.rsplit(".", 1)[0]), perm)
            stats[t] = (H[perm] if H.dim() == 1 else H[perm][:, perm], first_k)
        else:  # o_proj: per-layer indices, no reordering
            stats[t] = (H, weak)
    return stats


def nearest(old, weak: torch.Tensor, cfg: Config, device: str):
    """Round to nearest over compact groups of the other columns, weak columns kept as they are (the reference's
    `fasterquant_nearest_owq_reorder`: each group fitted once, its MSE search on a single range fraction)."""
    W = old.weight.data.float().to(weak.device)
    order = weakcol.processing_order(W.shape[1], weak, None, act_order=False)
    rest = W[:, order[: W.shape[1] - weak.numel()]]
    codes, scales, zeros = [], [], []
    for x in (rest[:, i : i + cfg.group_size] for i in range(0, rest.shape[1], cfg.group_size)):
        s, z = fit.fit(x, cfg.bits, cfg.tuning, num=1)
        codes.append(fit.encode(x, s.unsqueeze(1), z.unsqueeze(1), cfg.bits))
        scales.append(s)
        zeros.append(z)
    return weakcol.weak_layer(
        old,
        cfg,
        torch.cat(codes, 1).to(torch.uint8),
        torch.stack(scales, 1),
        torch.stack(zeros, 1),
        W[:, weak],
        weak,
        device,
    )


def quantize_linear(old, cfg: Config, compute_dtype: str, device: str, stats):
    if stats is None:
        raise ValueError("qeft: no Hessian for this layer; the calibration pass did not reach it")
    H, weak = stats
    if cfg.method == "nearest":
        return nearest(old, weak, cfg, device)
    return quantize_with_weak_columns(old, H, weak, cfg, device)
