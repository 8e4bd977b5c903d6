"""LoRA through peft: y = W x + s · B(A x), s = alpha / r, on every target linear (quantized or not)."""

from __future__ import annotations

from dataclasses import dataclass

from qpeft_bench.config import DTYPES, ConfigError, positive
from qpeft_bench.models import DTYPE


@dataclass
class Config:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    # dtype of the adapter weights. bfloat16 is what qlora.py trains in and what the published overhead
    # tables count; float32 trades memory for update precision.
    adapter_dtype: str = "bfloat16"

    def check(self, where: str) -> None:
        positive(where, "r", self.r)
        positive(where, "alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout={self.dropout} must lie in [0, 1)")
        if self.adapter_dtype not in DTYPES:
            raise ConfigError(f"{where}.adapter_dtype={self.adapter_dtype!r}; choose one of {', '.join(DTYPES)}")


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    # A rank above min(in, out) adds parameters without adding expressiveness: almost always a typo.
    for name, (in_f, out_f) in shapes.items():
        if cfg.r > min(in_f, out_f):
            raise ConfigError(
                f"peft.r={cfg.r} exceeds min(in, out)={min(in_f, out_f)} of {name} ({in_f} -> {out_f}); "
                "lower peft.r"
            )


def attach(model, targets: list[str], cfg: Config):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear as LoraLinear

    from qpeft_bench.quant.qlinear import QuantLinear

    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,  # full module names: peft matches them exactly
        bias="none",
        task_type="CAUSAL_LM",
    )
    # our own quantized layers compute y = W x like nn.Linear; peft's LoRA wrapper needs to be told so
    config._register_custom_module({QuantLinear: LoraLinear})
    # autocast_adapter_dtype=False: peft would otherwise upcast bf16 adapters to fp32 behind our back.
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(DTYPE[cfg.adapter_dtype])
    verify(model, targets, cfg)
    return model


def verify(model, targets: list[str], cfg: Config) -> None:
    """Every target must carry an adapter of rank r and scale alpha/r; peft does not check this for us."""
    from peft.tuners.lora import LoraLayer

    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    missing = sorted(set(targets) - set(layers))
    if missing:
        raise RuntimeError(f"LoRA was not attached to {len(missing)} target(s), e.g. {missing[:3]}")
    for name in targets:
        layer = layers[name]
        r, scale = layer.r["default"], layer.scaling["default"]
        if r != cfg.r or abs(scale - cfg.alpha / cfg.r) > 1e-12:
            raise RuntimeError(f"{name}: got r={r}, scale={scale}; asked r={cfg.r}, scale={cfg.alpha / cfg.r}")
