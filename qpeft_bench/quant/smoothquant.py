"""SmoothQuant W8A8: int8 weights and int8 activations, with activation outliers migrated into the weights first.

Per-token int8 activations fail on LLMs because a few input channels carry values 10-100x larger than the rest:
the token's scale follows the outlier and every other channel is left with a handful of levels. SmoothQuant
divides each input channel j of the linears that read a normalisation's output by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(max|X_j| over calibration tokens, max|W_j| over the j-th column of *all* linears reading that norm, so q, k, v
share one s and gate, up share another) and multiplies the weight columns by s_j. Both changes are folded offline
into parameters that already exist -- the norm's weight (and LayerNorm's bias) divided by s, the linears' columns
multiplied by s -- so the floating-point function is unchanged and inference costs nothing extra. alpha is the
migration strength: 0 puts all the difficulty on the activations, 1 all of it on the weights.

Then every target linear becomes a `W8A8Linear`: weights int8, symmetric, one scale per output channel;
activations quantized per token in the forward. Linears that do not read a norm (o_proj / out_proj,
down_proj / fc2) have no parameter before them to fold s into: they are quantized the same way, unsmoothed.

By default this is the authors' evaluation (mit-han-lab/smoothquant: `smooth.py`, `fake_quant.py`, `ppl_eval.py`,
which calls `quantize_model(..., "per_channel", "per_token", quantize_bmm_input=True)`), step for step:
every scale, quotient and product is computed in the tensors' own dtype (in bf16 a quotient w/s is itself rounded
to 8 bits before `round`, so codes reach +-128), maxima are clamped at 1e-5 before dividing by 127, the q/k/v
outputs (the inputs of the attention's batched matmuls) are rounded per token too, and the readers of one norm
output after the first round it again, because the reference rounds that shared tensor in place.
docs/fidelity/smoothquant.md lists what is identical and what each knob changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qpeft_bench.config import ConfigError
from qpeft_bench.models import DTYPE
from qpeft_bench.quant.qlinear import QuantLinear

QUANTIZES_ACTIVATIONS = True  # W8A8: each token is rounded to int8 in the forward
NEEDS_CALIBRATION = True  # max|X_j| comes from activations (and the error probe needs inputs anyway)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt")
FAMILIES_WHY = (
    "the norm -> linear wiring the smoothing folds into is known for these; Gemma's (1 + w) norms and post-norms "
    "are not, and Phi-3's fused qkv_proj would round q, k and v as one tensor, not as the reference's three"
)
QMAX = 127  # symmetric int8: scale = max|x| / 127, so the grid is the same on both sides of zero
MIN_MAX = 1e-5  # the reference clamps every max|.| (weight row, token, smoothing column and factor) at this

# Inside each decoder layer: a normalisation and the linears that read its output. Only pre-norm layers have
# this shape (OPT's post-norm variants such as OPT-350m do not, and are refused in `prepare`).
NORM_CONSUMERS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "llama": (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    "opt": (
        ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("final_layer_norm", ("fc1",)),
    ),
}
NORM_CONSUMERS |= dict.fromkeys(("mistral", "qwen2", "qwen3"), NORM_CONSUMERS["llama"])  # LLaMA's block layout
# The projections whose outputs feed the attention's batched matmuls (Q K^T and P V): the reference rounds their
# outputs per token to simulate int8 matmul inputs (`quantize_output=quantize_bmm_input` in both families).
BMM_INPUT_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
}
BMM_INPUT_PROJECTIONS |= dict.fromkeys(("mistral", "qwen2", "qwen3"), BMM_INPUT_PROJECTIONS["llama"])


@dataclass
class Config:
    alpha: float = 0.5  # migration strength in [0, 1]
    smooth: bool = True  # false: plain W8A8 with no smoothing (the baseline SmoothQuant is measured against)
    # round the q/k/v projections' outputs per token as well (the inputs of Q K^T and P V), as the reference's
    # evaluation does; false: only the linears' inputs and weights are rounded (our behaviour before issue 22)
    quantize_bmm_input: bool = True
    # the second and third reader of one norm output (k_proj, v_proj; up_proj) round their input again after the
    # first reader's rounding, as the reference does by rounding that shared tensor in place: idempotent in fp32
    # and fp16, not in bf16 (a rounded tensor's max|x| can move the token scale); false: each rounds x once
    requantize_shared_inputs: bool = True
    # scales, codes and smoothing factors computed in fp32 and rounded once into the model dtype, codes clamped to
    # [-127, 127], zero maxima guarded rather than clamped at 1e-5 (our arithmetic before issue 22); false: each
    # step in the tensors' own dtype, as the reference computes it. The same in an fp32 model up to those guards
    fp32_arithmetic: bool = False

    def check(self, where: str) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{where}.alpha={self.alpha} must lie in [0, 1] (the migration strength)")


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    pass  # per-output-channel weights and per-token activations fit any size


# ---------------------------------------------------------------------------------------------------------------
# Smoothing (model-level, before any layer is quantized)
# ---------------------------------------------------------------------------------------------------------------


def smoothing_factors(
    act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float, fp32_arithmetic: bool = False
) -> torch.Tensor:
    """s (in,) from the per-channel activation maxima and the (out_k, in) weights reading them.

    As the reference: in the weights' dtype, max|W_j| and then s clamped at 1e-5 (so an all-zero channel gets
    s = 1e-5, not 1). `fp32_arithmetic`: in fp32, with s = 1 where either maximum is zero."""
    if fp32_arithmetic:
        w_max = torch.cat([w.detach().float().abs() for w in weights]).amax(0)
        act_max = act_max.float().to(w_max.device)
        s = act_max.pow(alpha) / w_max.pow(1 - alpha)
        # a channel that is always zero (or whose columns are all zero) has nothing to migrate
        return torch.where((act_max > 0) & (w_max > 0), s, torch.ones_like(s))
    w_max = torch.cat([w.detach().abs() for w in weights]).amax(0).clamp(min=MIN_MAX)
    act_max = act_max.to(w_max.device, w_max.dtype)  # the reference casts its fp32 statistics to the weights' dtype
    return (act_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=MIN_MAX)


@torch.no_grad()
def fold(norm: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """norm(x) / s feeds linears whose columns are multiplied by s: the product, hence the function, is unchanged.
    In place, in the promoted dtype of each tensor and s (so in the model dtype when s is, as in the reference;
    in fp32 and rounded once when s is fp32)."""
    norm.weight.div_(s)
    if getattr(norm, "bias", None) is not None:  # LayerNorm: (x - mu) / sigma * gamma + beta, both scale with 1/s
        norm.bias.div_(s)
    for lin in linears:
        lin.weight.mul_(s)  # broadcasts over the rows: column j times s_j


def smoothing_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """[(norm module name, [names of the linears reading it])] over all decoder layers of a pre-norm model."""
    family = model.config.model_type
    if family not in NORM_CONSUMERS:
        raise ValueError(f"smoothquant knows the norm/linear wiring of {', '.join(NORM_CONSUMERS)}, not {family!r}")
    if family == "opt" and not model.config.do_layer_norm_before:
        raise ValueError(
            "smoothquant needs pre-norm layers; this OPT applies its layer norms after the linears "
            "(do_layer_norm_before=false), so there is no norm to fold the smoothing into"
        )
    wiring = NORM_CONSUMERS[family]

    def has(module: nn.Module, path: str) -> bool:
        try:
            module.get_submodule(path)
        except AttributeError:
            return False
        return True

    groups = []
    for name, module in model.named_modules():
        if all(has(module, norm) and all(has(module, c) for c in consumers) for norm, consumers in wiring):
            for norm, consumers in wiring:
                if getattr(module.get_submodule(norm), "weight", None) is None:
                    raise ValueError(
                        f"{name}.{norm} has no weight to fold the smoothing into (layer_norm_elementwise_affine=false)"
                    )
                groups.append((f"{name}.{norm}", [f"{name}.{c}" for c in consumers]))
    expected = len(wiring) * model.config.num_hidden_layers
    if len(groups) != expected:  # a layout we do not know: refuse rather than smooth only part of the model
        raise ValueError(f"found {len(groups)} norm/linear groups in this {family} model, expected {expected}")
    return groups


def layer_settings(model: nn.Module, targets: list[str], cfg: Config) -> dict[str, dict]:
    """{target: what its W8A8 layer does besides rounding its input once and its weights}: `quantize_output` for the
    q/k/v projections (cfg.quantize_bmm_input), `input_roundings` > 1 for a later reader of a norm output that an
    earlier target already rounded in the reference's in-place order (cfg.requantize_shared_inputs). Found from
    the names alone, so it holds with smooth=false too."""
    family = model.config.model_type
    bmm = BMM_INPUT_PROJECTIONS.get(family, ()) if cfg.quantize_bmm_input else ()
    groups = [readers for _, readers in NORM_CONSUMERS.get(family, ())] if cfg.requantize_shared_inputs else []
    wanted = set(targets)
    out: dict[str, dict] = {}
    for target in targets:
        settings = {}
        if any(target.endswith("." + p) for p in bmm):
            settings["quantize_output"] = True
        for readers in groups:
            for k, reader in enumerate(readers):
                if target.endswith("." + reader):
                    layer = target[: -len(reader) - 1]
                    # HF's forward calls the readers in this order (q, k, v; gate, up), each rounding the shared
                    # tensor in place in the reference: this one sees it rounded once per earlier quantized reader
                    earlier = sum(f"{layer}.{r}" in wanted for r in readers[:k])
                    if earlier:
                        settings["input_roundings"] = 1 + earlier
        if settings:
            out[target] = settings
    return out


@torch.no_grad()
def prepare(model: nn.Module, targets: list[str], cfg: Config, capture, device: str) -> dict:
    """Measure max|X_j| on the calibration windows (`capture`, the quantizer protocol's) and fold the smoothing into every norm whose readers include a target; return
    each target's layer settings (`layer_settings`).

    All norms' statistics come from one calibration pass over the unsmoothed model: folding one group does not
    change what any other norm outputs, since the function is preserved. Every reader of a smoothed norm is
    rescaled, target or not, or the ones left out would compute with divided inputs."""
    settings = layer_settings(model, targets, cfg)
    if not cfg.smooth:
        return settings
    from qpeft_bench.calibration import absmax

    wanted = set(targets)
    groups = [(norm, readers) for norm, readers in smoothing_groups(model) if wanted.intersection(readers)]
    if not groups:  # e.g. only o_proj/down_proj are targets: nothing to smooth, no calibration pass needed
        return settings
    # readers of one norm get the very same tensor, so the first reader's input is the norm's output
    first_readers = [readers[0] for _, readers in groups]
    act_max = capture(first_readers, absmax)
    for norm, readers in groups:
        linears = [model.get_submodule(r) for r in readers]
        s = smoothing_factors(act_max[readers[0]], [lin.weight for lin in linears], cfg.alpha, cfg.fp32_arithmetic)
        fold(model.get_submodule(norm), linears, s)
    return settings


# ---------------------------------------------------------------------------------------------------------------
# The W8A8 layer
# ---------------------------------------------------------------------------------------------------------------


def quantize_weight(
    weight: torch.Tensor, dtype: torch.dtype, fp32_arithmetic: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> int8 codes and one scale per output channel (max|w| / 127) stored in `dtype`, such that
    codes * scale (in `dtype`) is the reference's fake-quantized weight.

    As the reference: scale = max(max|w|, 1e-5) / 127 and codes = round(w / scale), each step in `dtype`. In bf16
    the quotient is rounded to 8 bits first, so a code can be +-128 (about 6% of the rows of a 4096-wide Gaussian
    weight): int8 holds -128 but not +128, so a row reaching +128 and not -128 is stored negated, codes and scale
    ((-c) * (-s) rounds exactly as c * s). Only a row reaching both (about 0.05%) has its +128 clamped to 127.
    `fp32_arithmetic`: quotient in fp32 against the stored scale, codes clamped to [-127, 127]."""
    if fp32_arithmetic:
        w = weight.detach().float()
        scale = (w.abs().amax(1, keepdim=True) / QMAX).clamp(min=1e-12).to(dtype)  # an all-zero row: any scale
        codes = torch.clamp(torch.round(w / scale.float()), -QMAX, QMAX)
        return codes.to(torch.int8), scale.squeeze(1)
    w = weight.detach().to(dtype)
    scale = w.abs().amax(1, keepdim=True).clamp(min=MIN_MAX) / QMAX
    codes = torch.round(w / scale)
    flip = (codes.amax(1, keepdim=True) > QMAX) & (codes.amin(1, keepdim=True) >= -QMAX)
    sign = 1 - 2 * flip.to(codes.dtype)
    codes, scale = codes * sign, scale * sign
    return codes.clamp(-QMAX - 1, QMAX).to(torch.int8), scale.squeeze(1)


def fake_quantize_tokens(x: torch.Tensor, fp32_arithmetic: bool = False) -> torch.Tensor:
    """x rounded to int8 per token (last dimension), symmetric, returned dequantized in x's dtype, without gradient.

    As the reference's `act_quant`: scale = max(max|x_t|, 1e-5) / 127, round(x / scale) * scale, each step in x's
    dtype (in bf16 a code can reach +-128, as there). `fp32_arithmetic`: every step in fp32, codes clamped to
    [-127, 127], rounded once into x's dtype."""
    if fp32_arithmetic:
        xf = x.detach().float()
        scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / QMAX
        return (torch.clamp(torch.round(xf / scale), -QMAX, QMAX) * scale).to(x.dtype)
    t = x.detach()
    scale = t.abs().amax(-1, keepdim=True).clamp(min=MIN_MAX) / QMAX
    return torch.round(t / scale) * scale


def _straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """The value of `rounded`, bit for bit (x - x.detach() is exactly zero), with the gradient of the identity."""
    return rounded + (x - x.detach()) if x.requires_grad else rounded


class W8A8Linear(QuantLinear):
    """y = Q_tok(x) W_hat^T (+ b): int8 weights (per output channel) and int8 activations (per token, dynamic);
    with `quantize_output` (q/k/v projections) y is rounded per token too, the reference's simulation of int8
    inputs to the attention's batched matmuls.

    Simulated in floating point ("fake quantization"): the activation codes times their token scale, and the
    weight codes times their channel scale, go through an ordinary matmul. Every product is
    (q_x * s_x) * (q_w * s_w), so the result equals an int8 GEMM with int32 accumulation rescaled by s_x * s_w,
    up to floating-point rounding of the matmul in x's dtype. Each rounding is a straight-through estimator: the
    gradient with respect to x is that of x W_hat^T, so adapters in earlier layers keep training.

    Under an adapter (peft's LoRA adds its B A x to what this layer returns) only the base output is rounded: the
    fine-tuned model is the reference's W8A8 base plus a full-precision adapter path. The input is never changed
    in place (the reference rounds it in place; `input_roundings` reproduces what its later readers see)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        codes: torch.Tensor,
        scales: torch.Tensor,
        quantize_output: bool = False,
        input_roundings: int = 1,
        fp32_arithmetic: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", codes)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) in the model's dtype; negative for a row stored negated
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.quantize_output, self.input_roundings, self.fp32_arithmetic = (
            quantize_output,
            input_roundings,
            fp32_arithmetic,
        )

    def dequantize(self) -> torch.Tensor:
        return self.qweight.to(self.scales.dtype) * self.scales.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = x
        for _ in range(self.input_roundings):
            x_q = fake_quantize_tokens(x_q, self.fp32_arithmetic)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(_straight_through(x, x_q), self.dequantize().to(x.dtype), bias)
        if self.quantize_output:
            y = _straight_through(y, fake_quantize_tokens(y, self.fp32_arithmetic))
        return y

    def extra_repr(self) -> str:
        extra = (", outputs per token" if self.quantize_output else "") + (
            f", input rounded {self.input_roundings}x" if self.input_roundings > 1 else ""
        )
        return (
            f"in={self.in_features}, out={self.out_features}, w8a8 (per-channel weights, per-token activations{extra})"
        )


def quantize_linear(old, cfg: Config, compute_dtype: str, device: str, stats=None):
    codes, scales = quantize_weight(old.weight.data.to(device), old.weight.dtype, cfg.fp32_arithmetic)
    bias = None if old.bias is None else old.bias.data.to(device)
    settings = stats or {}  # prepare's layer_settings for this target
    return W8A8Linear(
        old.in_features,
        old.out_features,
        bias,
        codes,
        scales,
        quantize_output=settings.get("quantize_output", False),
        input_roundings=settings.get("input_roundings", 1),
        fp32_arithmetic=cfg.fp32_arithmetic,
    ).to(device)


def linear_storage(in_f: int, out_f: int, bias: bool, cfg: Config, dtype: str) -> tuple[int, int]:
    elem = DTYPE[dtype].itemsize
    return in_f * out_f + out_f * elem + (out_f * elem if bias else 0), 0  # int8 codes, scales, bias


def dequantize(module) -> torch.Tensor:
    return module.dequantize()


def state_bytes(module) -> int:
    return 0  # everything is a buffer or a parameter


def layer_classes() -> tuple[type, ...]:
    return (W8A8Linear,)
