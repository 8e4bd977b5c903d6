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
FAMILIES = ("llama", "opt")  # the norm -> consumer wiring below is known for these only
QMAX = 127  # symmetric int8: codes in [-127, 127], so the grid is the same on both sides of zero

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


@dataclass
class Config:
    alpha: float = 0.5  # migration strength in [0, 1]
    smooth: bool = True  # false: plain W8A8 with no smoothing (the baseline SmoothQuant is measured against)

    def check(self, where: str) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{where}.alpha={self.alpha} must lie in [0, 1] (the migration strength)")


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    pass  # per-output-channel weights and per-token activations fit any size


# ---------------------------------------------------------------------------------------------------------------
# Smoothing (model-level, before any layer is quantized)
# ---------------------------------------------------------------------------------------------------------------


def smoothing_factors(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (in,) in fp32 from the per-channel activation maxima and the (out_k, in) weights reading them."""
    w_max = torch.cat([w.detach().float().abs() for w in weights]).amax(0)
    act_max = act_max.float().to(w_max.device)
    s = act_max.pow(alpha) / w_max.pow(1 - alpha)
    # A channel that is always zero (or whose columns are all zero) has nothing to migrate; s = 1 also keeps
    # 0 and inf out of the folded weights.
    return torch.where((act_max > 0) & (w_max > 0), s, torch.ones_like(s))


@torch.no_grad()
def fold(norm: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """norm(x) / s feeds linears whose columns are multiplied by s: the product, hence the function, is unchanged.
    Computed in fp32 and stored back in each tensor's own dtype."""
    norm.weight.copy_(norm.weight.float() / s)
    if getattr(norm, "bias", None) is not None:  # LayerNorm: (x - mu) / sigma * gamma + beta, both scale with 1/s
        norm.bias.copy_(norm.bias.float() / s)
    for lin in linears:
        lin.weight.copy_(lin.weight.float() * s)


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


@torch.no_grad()
def prepare(model: nn.Module, targets: list[str], cfg: Config, windows: torch.Tensor, device: str) -> dict:
    """Measure max|X_j| on `windows` and fold the smoothing into every norm whose readers include a target.

    All norms' statistics come from one calibration pass over the unsmoothed model: folding one group does not
    change what any other norm outputs, since the function is preserved. Every reader of a smoothed norm is
    rescaled, target or not, or the ones left out would compute with divided inputs."""
    if not cfg.smooth:
        return {}
    from qpeft_bench.calibration import absmax, capture_inputs

    wanted = set(targets)
    groups = [(norm, readers) for norm, readers in smoothing_groups(model) if wanted.intersection(readers)]
    if not groups:  # e.g. only o_proj/down_proj are targets: nothing to smooth, no calibration pass needed
        return {}
    # readers of one norm get the very same tensor, so the first reader's input is the norm's output
    act_max = capture_inputs(model, [readers[0] for _, readers in groups], windows, absmax, device)
    for norm, readers in groups:
        linears = [model.get_submodule(r) for r in readers]
        s = smoothing_factors(act_max[readers[0]], [lin.weight for lin in linears], cfg.alpha)
        fold(model.get_submodule(norm), linears, s)
    return {}


# ---------------------------------------------------------------------------------------------------------------
# The W8A8 layer
# ---------------------------------------------------------------------------------------------------------------


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> int8 codes and one scale per output channel (max|w| / 127) stored in `dtype`.

    The codes are rounded against the *stored* scale, so that codes * scale is the nearest grid point of w."""
    w = weight.detach().float()
    scale = (w.abs().amax(1) / QMAX).clamp(min=1e-12).to(dtype)  # an all-zero row: any scale reproduces it
    codes = torch.clamp(torch.round(w / scale.float().unsqueeze(1)), -QMAX, QMAX)
    return codes.to(torch.int8), scale


def fake_quantize_tokens(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per token (last dimension), symmetric with scale max|x_t| / 127, returned dequantized
    in x's dtype. The rounding is done in fp32 so that bf16/fp16 inputs get exactly the codes an int8 kernel's
    quantization step would produce."""
    xf = x.detach().float()
    scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / QMAX
    return (torch.clamp(torch.round(xf / scale), -QMAX, QMAX) * scale).to(x.dtype)


class W8A8Linear(QuantLinear):
    """y = Q_tok(x) W_hat^T (+ b): int8 weights (per output channel) and int8 activations (per token, dynamic).

    Simulated in floating point ("fake quantization"): the activation codes times their token scale, and the
    weight codes times their channel scale, go through an ordinary matmul. Every product is
    (q_x * s_x) * (q_w * s_w), so the result equals an int8 GEMM with int32 accumulation rescaled by s_x * s_w,
    up to floating-point rounding of the matmul in x's dtype. The rounding of x is a straight-through estimator:
    the gradient with respect to x is that of x W_hat^T, so adapters in earlier layers keep training."""

    def __init__(
        self, in_features: int, out_features: int, bias: torch.Tensor | None, codes: torch.Tensor, scales: torch.Tensor
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", codes)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) in the model's dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.to(self.scales.dtype) * self.scales.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = x + (fake_quantize_tokens(x) - x).detach()  # value of the int8 codes, gradient of the identity
        return F.linear(x_q, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w8a8 (per-channel weights, per-token activations)"


def quantize_linear(old, cfg: Config, compute_dtype: str, device: str, stats=None):
    codes, scales = quantize_weight(old.weight.data.to(device), old.weight.dtype)
    bias = None if old.bias is None else old.bias.data.to(device)
    return W8A8Linear(old.in_features, old.out_features, bias, codes, scales).to(device)


def linear_storage(in_f: int, out_f: int, bias: bool, cfg: Config, dtype: str) -> tuple[int, int]:
    elem = DTYPE[dtype].itemsize
    return in_f * out_f + out_f * elem + (out_f * elem if bias else 0), 0  # int8 codes, scales, bias


def dequantize(module) -> torch.Tensor:
    return module.dequantize()


def state_bytes(module) -> int:
    return 0  # everything is a buffer or a parameter


def layer_classes() -> tuple[type, ...]:
    return (W8A8Linear,)
