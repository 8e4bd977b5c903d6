"""Models: build from an architecture card on the meta device (plan mode), or load weights (train mode)."""

from __future__ import annotations

import contextlib
import functools
import json

import torch
from torch import nn

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config(arch: dict, dtype: str):
    """A transformers config from plain architecture fields (`model_type` selects the class)."""
    from transformers import AutoConfig

    fields = dict(arch)
    model_type = fields.pop("model_type")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        fields.pop(key, None)
    config = AutoConfig.for_model(model_type, **fields)
    config.dtype = dtype
    return config


def build_meta_model(arch: dict, dtype: str) -> nn.Module:
    """The model with every tensor on the meta device: shapes and dtypes are real, no memory, no download.

    `from_config(dtype=...)` keeps buffers such as rotary `inv_freq` in float32, exactly as `from_pretrained`
    does, so byte counts of the meta model equal those of a loaded one.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config(arch, dtype), dtype=DTYPE[dtype])


def random_model(arch: dict, dtype: str, device: str) -> nn.Module:
    """The model of an architecture card with random weights, made directly on `device` (benchmarks: the shape,
    not the weights, decides sizes, memory and speed)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf_config(arch, dtype), dtype=DTYPE[dtype])


def load_model(path_or_hub_id: str, dtype: str, device: str) -> nn.Module:
    """Load weights (local directory or hub id; offline machines must pass a local directory)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path_or_hub_id, dtype=DTYPE[dtype])
    return model.to(device)


def load_tokenizer(path_or_hub_id: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path_or_hub_id)
    if tok.pad_token_id is None:
        # LLaMA tokenizers ship without a pad token; padding positions are masked out of the loss and
        # attention anyway, so reusing unk (or eos) changes no number and, unlike adding a token, no shape.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def find_linears(model: nn.Module, linear_names: list[str]) -> dict[str, nn.Module]:
    """Linear layers of the decoder blocks whose last name is in `linear_names` (lm_head is never included).

    Raises if a requested name matches nothing: peft silently accepts target names that match nothing, and a
    typo would then train fewer layers than the table claims.
    """
    found = {
        name: mod
        for name, mod in model.named_modules()
        if name.rsplit(".", 1)[-1] in linear_names and hasattr(mod, "in_features") and "lm_head" not in name
    }
    missing = [n for n in linear_names if not any(k.rsplit(".", 1)[-1] == n for k in found)]
    if missing:
        present = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"linear layer name(s) {missing} match no module of this model; its linear layers are {present}"
        )
    return found


def linear_shapes(arch: dict, dtype: str, linear_names: list[str]) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of the target linears, from the architecture alone."""
    return dict(_linear_shapes(json.dumps(arch, sort_keys=True), dtype, tuple(linear_names)))


@functools.lru_cache(maxsize=64)
def _linear_shapes(arch_json: str, dtype: str, linear_names: tuple[str, ...]) -> tuple:
    # Cached: a sweep validates every grid point, and building a 70B model even on meta takes a second.
    model = build_meta_model(json.loads(arch_json), dtype)
    return tuple((n, (m.in_features, m.out_features)) for n, m in find_linears(model, list(linear_names)).items())


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={device!r} but CUDA is not available on this machine")
    return device


def is_norm_param(name: str) -> bool:
    """A normalisation weight (RMSNorm/LayerNorm): its module's own name contains 'norm'."""
    parts = name.split(".")
    return len(parts) >= 2 and "norm" in parts[-2]


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch's generators for a block (adapter init, data order) so a run is reproducible."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
