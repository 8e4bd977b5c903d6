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
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except Exception as err:  # transformers' own field checks (types, ranges): one line, not its traceback
        raise ValueError(f"transformers rejects this {model_type} architecture: {' '.join(str(err).split())}") from err
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


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters registered inside the block move to the meta device as they are created, before their init runs
    (so a 70B model costs no memory and no init time); buffers stay real: rotary tables and the like are computed
    at construction and are in no checkpoint."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(arch: dict, dtype: str) -> nn.Module:
    """The model of an architecture card with its parameters on the meta device and its buffers on the CPU: the
    start of a layer-by-layer load (fill), where no full-precision copy of the model ever exists at once."""
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        return AutoModelForCausalLM.from_config(hf_config(arch, dtype), dtype=DTYPE[dtype])


class TensorSource:
    """Tensors by parameter name, read one at a time straight to the device: from a local checkpoint directory's
    safetensors files (sharded or not), or random (path None: benchmarks, where the shape decides speed and
    memory; N(0, 0.02) as transformers initialises)."""

    def __init__(self, path: str | None, dtype: str):
        self.path, self.dtype, self.files, self._open = path, DTYPE[dtype], {}, {}
        if path is None:
            return
        from pathlib import Path

        root = Path(path)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: root / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (root / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(root / "model.safetensors", framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), root / "model.safetensors")
        else:
            raise FileNotFoundError(
                f"{path}: no model.safetensors(.index.json); a layer-by-layer load reads safetensors checkpoints only"
            )

    def get(self, name: str, shape: torch.Size, device: str) -> torch.Tensor:
        if not self.files:
            return torch.randn(shape, device=device, dtype=self.dtype) * 0.02
        if name not in self.files:
            raise KeyError(f"{self.path}: the checkpoint has no tensor {name!r}")
        from safetensors import safe_open

        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="pt", device=str(device))
        tensor = self._open[file].get_tensor(name)
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(shape)}")
        return tensor.to(device=device, dtype=self.dtype)


def fill(model: nn.Module, names: list[str], source: TensorSource, device: str) -> None:
    """Give the meta parameters `names` of `model` their values from `source`, on `device` (with the reorderings
    recorded while they were on the meta device, index_select_)."""
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        old = module._parameters[leaf]
        if old is None or not old.is_meta:
            continue
        value = source.get(name, old.shape, device)
        for dim, index in getattr(old, "_pending_index", ()):
            value = value.index_select(dim, index.to(value.device)).contiguous()
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)


def unload(model: nn.Module, names: list[str]) -> None:
    """Send the parameters `names` back to the meta device (their memory freed; a later `fill` reads them again)."""
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        old = module._parameters[leaf]
        if old is not None and not old.is_meta:
            module._parameters[leaf] = nn.Parameter(old.detach().to("meta"), requires_grad=old.requires_grad)


@torch.no_grad()
def index_select_(param: torch.Tensor | None, dim: int, index: torch.Tensor) -> None:
    """In place: `param` indexed by `index` along `dim` (a reordering, so the shape stays). A parameter still on the
    meta device (a by-block load that has not reached it) keeps the index and `fill` applies it to its values."""
    if param is None:
        return
    if param.is_meta:
        param._pending_index = [*getattr(param, "_pending_index", ()), (dim, index.detach().cpu())]
        return
    param.data = param.data.index_select(dim, index.to(param.device)).contiguous()


def fill_rest(model: nn.Module, skip: list[str], source: TensorSource, device: str) -> None:
    """Every meta parameter outside the modules `skip` (the quantizer's targets, filled one at a time as they are
    quantized), then the buffers to `device` and the tied embeddings re-tied."""
    prefixes = tuple(f"{s}." for s in skip)
    fill(model, [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefixes)], source, device)
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None:
                module._buffers[key] = buf.to(device)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


class BlockLoader:
    """A model brought in from its checkpoint one target linear at a time: everything else (embeddings, norms, the
    head) is filled at once; `loader(target)` fills one target just before it is used, `loader.unload(target)`
    frees it again (QEFT's global vote runs every block once before quantizing any)."""

    def __init__(self, model: nn.Module, targets: list[str], source: TensorSource, device: str):
        self.model, self.source, self.device = model, source, device
        fill_rest(model, targets, source, device)

    def _names(self, target: str) -> list[str]:
        return [n for n, _ in self.model.get_submodule(target).named_parameters(prefix=target)]

    def __call__(self, target: str) -> None:
        fill(self.model, self._names(target), self.source, self.device)

    def unload(self, target: str) -> None:
        unload(self.model, self._names(target))


def layerwise(model: nn.Module, targets: list[str], source: TensorSource, device: str) -> BlockLoader:
    """Fill an empty model's parameters outside `targets` now; returns the loader whose call fills one target, for
    quant.quantize_model, which fills each target just before quantizing it."""
    return BlockLoader(model, targets, source, device)


def checkpoint_dir(path: str | None, hub_id: str | None) -> str | None:
    """The local directory of safetensors weights a by-block load reads (model.path, else the hub id's snapshot
    in the local Hugging Face cache), or None where there is none (a .bin checkpoint, a hub id not cached)."""
    from pathlib import Path

    from qpeft_bench.config import cached_hub_file

    if path is not None:
        root = Path(path)
        has = any((root / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))
        return str(root) if has else None
    if hub_id:
        for name in ("model.safetensors.index.json", "model.safetensors"):
            found = cached_hub_file(hub_id, name)
            if found is not None:
                return str(found.parent)
    return None


def load_model(path_or_hub_id: str, dtype: str, device: str) -> nn.Module:
    """Load weights (local directory or hub id; offline machines must pass a local directory)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path_or_hub_id, dtype=DTYPE[dtype])
    return model.to(device)


# Files a tokenizer's vocabulary comes from (fast, SentencePiece, BPE, WordPiece)
VOCAB_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def load_tokenizer(path_or_hub_id: str):
    from pathlib import Path

    from transformers import AutoTokenizer

    from qpeft_bench.config import ConfigError

    def refuse(why: str, err: Exception | None = None):
        raise ConfigError(
            f"no tokenizer could be loaded from {path_or_hub_id} ({why}): a checkpoint needs its tokenizer files "
            f"({', '.join(VOCAB_FILES[:2])}, or the others transformers reads, with tokenizer_config.json)"
        ) from err

    # transformers builds an empty tokenizer of the model's class from a directory with no vocabulary file, which
    # turns every text into no tokens: refuse it rather than train on nothing
    root = Path(path_or_hub_id)
    if root.is_dir() and not any((root / f).is_file() for f in VOCAB_FILES):
        refuse("no vocabulary file in the directory")
    try:
        tok = AutoTokenizer.from_pretrained(path_or_hub_id)
    except Exception as err:  # unreadable tokenizer files: transformers says so over many lines
        refuse(str(err).strip().splitlines()[0].rstrip(": ") if str(err).strip() else type(err).__name__, err)
    if len(tok) < 2:
        refuse(f"it has {len(tok)} token")
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
