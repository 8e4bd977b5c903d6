"""IA3 through peft: learned vectors, initialised to ones, rescale activations of the target linears.

    non-feed-forward targets (q, k, v, o, gate, up; OPT's q, k, v, out_proj, fc1)   y = l ⊙ (W x + b)
    feed-forward targets (`feedforward`: LLaMA's down_proj, OPT's fc2)               y = W (l ⊙ x) + b

One vector per target: out_features elements, or in_features for feed-forward targets. On LLaMA-2-7B with every
linear targeted that is 32 x (4 x 4096 + 2 x 11008 + 11008) = 1,581,056 parameters, the thesis' count; the thesis
kept them in fp32 (6.03 MiB), hence `adapter_dtype: float32`.

peft's IA3 wraps nn.Linear and bitsandbytes' 4- and 8-bit layers only; it refuses HQQ's layers and our own packed
formats, and `unsupported` says so at compose time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qpeft_bench import families
from qpeft_bench.adapters import base
from qpeft_bench.adapters.lora import load_peft_state, merge_layers, tuner_layers
from qpeft_bench.config import DTYPES, ConfigError
from qpeft_bench.models import DTYPE

ADAPTER = "default"
QUANTIZERS = ("none", "nf4", "fp4", "int8")  # the base layers peft's IA3 accepts (and whose gradients we test)


@dataclass
class Config:
    # dtype of the IA3 vectors: fp32 as the thesis counted them (they are tiny; bf16 would round 1 + small
    # updates away: bf16 resolves 1 +- 2^-8)
    adapter_dtype: str = "float32"
    # linear names whose *inputs* are scaled (the MLP's output linears of every family: down_proj, OPT's fc2); other
    # targets scale outputs
    feedforward: list[str] = field(default_factory=lambda: families.names_with_role("mlp_out"))

    def check(self, where: str) -> None:
        if self.adapter_dtype not in DTYPES:
            raise ConfigError(f"{where}.adapter_dtype={self.adapter_dtype!r}; choose one of {', '.join(DTYPES)}")


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    return None  # a vector fits every shape


def unsupported(quant_name: str, qcfg, cfg: Config) -> str | None:
    if quant_name in QUANTIZERS:
        return None
    return "peft's IA3 wraps only nn.Linear and bitsandbytes' layers"


def is_feedforward(name: str, cfg: Config) -> bool:
    return name.rsplit(".", 1)[-1] in cfg.feedforward


def attach(model, targets: list[str], cfg: Config):
    peft_model = _wrap(model, targets, cfg)
    verify(peft_model, targets, cfg)
    return peft_model


def _wrap(model, targets: list[str], cfg: Config):
    from peft import IA3Config, get_peft_model

    config = IA3Config(
        target_modules=targets,
        feedforward_modules=[t for t in targets if is_feedforward(t, cfg)],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    for name, param in model.named_parameters():
        if "ia3_l" in name:
            param.data = param.data.to(DTYPE[cfg.adapter_dtype])
    return model


def ia3_layers(model) -> dict:
    from peft.tuners.ia3 import IA3Layer

    return tuner_layers(model, IA3Layer)


def verify(model, targets: list[str], cfg: Config) -> None:
    """Every target, and nothing else, has one trainable vector in adapter_dtype, on its inputs exactly where the
    layer is a feed-forward one."""
    layers = ia3_layers(model)
    missing, extra = sorted(set(targets) - set(layers)), sorted(set(layers) - set(targets))
    if missing or extra:
        raise RuntimeError(
            f"IA3 on the wrong modules: missing {missing[:3]} ({len(missing)}), unexpected {extra[:3]} ({len(extra)})"
        )
    for name in targets:
        layer, ff = layers[name], is_feedforward(name, cfg)
        vec = layer.ia3_l[ADAPTER]
        want = (1, layer.in_features) if ff else (layer.out_features, 1)
        if layer.is_feedforward != ff or tuple(vec.shape) != want:
            raise RuntimeError(
                f"{name}: IA3 {'input' if layer.is_feedforward else 'output'} scaling of shape "
                f"{tuple(vec.shape)}; asked {'input' if ff else 'output'} scaling of shape {want}"
            )
        if vec.dtype != DTYPE[cfg.adapter_dtype] or not vec.requires_grad:
            raise RuntimeError(
                f"{name}: IA3 vector {vec.dtype} (trainable: {vec.requires_grad}); asked trainable {cfg.adapter_dtype}"
            )


def save(model, path, cfg: Config) -> None:
    model.save_pretrained(str(path))  # peft's format: adapter_config.json + adapter_model.safetensors


def load(model, targets: list[str], cfg: Config, path):
    import json

    path = Path(path)
    saved = json.loads((path / "adapter_config.json").read_text())
    want_ff = sorted(t for t in targets if is_feedforward(t, cfg))
    got_ff = sorted(saved.get("feedforward_modules") or [])
    if sorted(saved.get("target_modules") or []) != sorted(targets) or got_ff != want_ff:
        raise ValueError(f"{path}: saved IA3 targets / feed-forward modules differ from this config's")
    peft_model = _wrap(model, targets, cfg)
    load_peft_state(peft_model, path, "ia3_l")
    verify(peft_model, targets, cfg)
    return peft_model


def merge(model):
    """The plain model with each IA3 layer replaced by an nn.Linear holding the scaled dequantized weight
    (outputs scaled: rows and bias; inputs scaled: columns)."""
    return merge_layers(model, ia3_layers(model), _merged)


@torch.no_grad()
def _merged(name: str, layer, dtype: torch.dtype) -> nn.Linear:
    base_layer = layer.get_base_layer()
    weight = base.dense_weight(base_layer).float()
    vec = layer.ia3_l[ADAPTER].float().to(weight.device)  # (1, in) or (out, 1): broadcasts over the weight
    merged = base.merge_dense(base_layer, weight * vec - weight, dtype)
    if not layer.is_feedforward and merged.bias is not None:
        merged.bias.mul_(vec.flatten().to(merged.bias.dtype))
    return merged
