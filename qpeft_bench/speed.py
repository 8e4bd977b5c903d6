"""Speed switches of the training step. Each computes the same function as the plain path (up to float rounding);
the benchmark (scripts/bench_vs_reference.py) checks that by the loss trajectory and measures what each buys.

- ``fused_lora``: every peft LoRA/DoRA layer on a frozen base runs as one autograd function. The plain path is
  bitsandbytes' 4-bit matmul, then peft's ``result.clone()``, dropout, A, B, a scaling multiply and an add, each a
  pass over an activation-sized tensor, several of them repeated in backward. Here the base product and the
  scaled low-rank product share one output buffer (``addmm`` writes the sum in the GEMM's epilogue), the
  dequantized weight lives only for the matmul that needs it, and backward saves only the (dropped-out) input and
  the rank-r intermediate. DoRA's column norm ||W + sBA|| comes from ||W|| (once per layer) and two rank-r
  products, without forming W + sBA; with dropout 0 its base and low-rank terms share one GEMM (peft computes W·x twice when dropout is on,
  and so do we: that second product is part of DoRA's definition with dropout).
- ``chunked_loss``: lm_head + cross-entropy in chunks of tokens with the logits recomputed in backward, so the
  (tokens x vocab) fp32 logits and their gradient never exist whole (~1 GiB at 8 x 512 x 32k).
- ``compile``: torch.compile each decoder layer (regional compilation: one compiled graph reused by every layer),
  which fuses the norms, rotary embedding, activation and residual adds.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qpeft_bench import quant
from qpeft_bench.config import ConfigError

# The fused function stands in for peft's layer where the base computes exactly x @ dequantize(W)^T + bias (the
# quantizer's FUSED_LORA_BASE); layers that also round their activations (LLM.int8, SmoothQuant W8A8) compute
# something else and keep peft's path.
FUSED_METHODS = ("lora",)  # peft's LoRA family: LoRA, rsLoRA, DoRA, LoftQ-initialised LoRA
# compile=auto compiles only what was measured to compile and train (results/bench/h200.md), the quantizers with
# COMPILE_TESTED: NF4, HQQ and RTN bases with the LoRA family, IA3, Q-BaRA, QA-HiRA and QA-LoRA (FP4 is the same
# bitsandbytes layer as NF4), and QEFT with weak-column tuning, 4x faster compiled since its group dequantization is
# a chain of small kernels eager (OWQ is the same layer class). Others stay eager unless compile=true asks for it.


def resolve(
    method: str, quant_name: str, device: str, fused_lora: bool | str, compile: bool | str, sharded: bool = False
) -> tuple[bool, bool]:
    """The switches' 'auto' made concrete: fused LoRA for peft's LoRA family, compilation on CUDA for the
    quantizers it was measured with; neither under FSDP (`sharded`), whose gathered weights reach a layer only
    through its own forward (check refuses asking for them)."""
    fused = method in FUSED_METHODS and not sharded if fused_lora == "auto" else bool(fused_lora)
    if compile == "auto":
        compiled = device.startswith("cuda") and quant.capability(quant_name, "COMPILE_TESTED") and not sharded
    else:
        compiled = bool(compile)
    return fused, compiled


def setup(
    model: nn.Module,
    *,
    method: str,
    quant_name: str,
    device: str,
    fused_lora: bool | str,
    compile: bool | str,
    sharded: bool = False,
) -> dict:
    """Turn on the model-side switches (after adapters and checkpointing are set up, before any DDP wrap); returns
    what was done, for the record."""
    fused, compiled = resolve(method, quant_name, device, fused_lora, compile, sharded)
    done = {"fused_lora": fused, "compile": compiled}
    if fused:
        done["fused_lora_layers"] = fuse_lora(model)
    if compiled:
        done["compiled_layers"] = compile_layers(model)
    return done


def teardown(model: nn.Module) -> None:
    """Back to peft's layers and eager decoder layers after training, so that evaluation computes exactly what a
    re-evaluation from the saved adapter (mode=eval) or any user of it computes (bf16 rounds the fused sum
    differently: the tiny model's perplexity moved by 0.4%)."""
    unfuse_lora(model)
    layers = getattr(getattr(causal_lm(model), "model", None), "layers", None) or []
    for layer in layers:
        layer._compiled_call_impl = None  # what nn.Module.compile() set


def loss_context(model: nn.Module, chunk: int) -> contextlib.AbstractContextManager:
    """The training loss as the switch asks: chunked (chunk > 0) or the model's own."""
    return chunked_loss(model, chunk) if chunk > 0 else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# Memory budget
# ---------------------------------------------------------------------------------------------------------------

GIB = 2**30
AUTO_FRACTION = 0.9  # memory_budget=auto: this share of the device (the rest: CUDA context, fragmentation, NVML)
BUDGET_CHUNK = 2048  # the loss chunk a budgeted run uses when none is set (measured: -0.3 GiB and faster at 7B)
# Settings to try, fastest first (results/bench/h200.md: without checkpointing a QLoRA step is ~1.4x faster; the
# fp32 upcast of the norms costs ~1.1x and ~1 GiB at 7B). The first whose plan-mode estimate fits is taken.
BUDGET_CANDIDATES = (
    {"gradient_checkpointing": False, "upcast_norms_fp32": False},
    {"gradient_checkpointing": True, "upcast_norms_fp32": False},
)


def budget_bytes(budget: str | float, device: str) -> int:
    """train.memory_budget in bytes: GiB as given, or for auto AUTO_FRACTION of the device's memory."""
    if budget != "auto":
        return int(float(budget) * GIB)
    if device.startswith("cuda"):
        return int(AUTO_FRACTION * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    import os

    return int(AUTO_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def choose(budget: int, estimate: Callable[[dict], int | None]) -> tuple[dict, int]:
    """The fastest candidate whose estimated peak fits in `budget` bytes, and that estimate."""
    tried = []
    for settings in BUDGET_CANDIDATES:
        peak = estimate(settings)
        if peak is None:
            raise ConfigError(
                "train.memory_budget needs plan mode's memory estimate, which this architecture does "
                "not have; set train.gradient_checkpointing yourself and train.memory_budget=null"
            )
        if peak <= budget:
            return settings, peak
        tried.append(f"{settings} needs ~{peak / GIB:.1f} GiB")
    raise ConfigError(
        f"train.memory_budget={budget / GIB:.1f} GiB is too small for this run: "
        f"{'; '.join(tried)}; lower train.batch_size or the sequence lengths, or raise the budget"
    )


def check(method: str, fused_lora: bool | str, compile: bool | str = "auto", distributed: str = "none") -> None:
    """Refuse switches that cannot apply to the run (before any model is loaded)."""
    if distributed == "fsdp" and (fused_lora is True or compile is True):
        raise ConfigError(
            "train.fused_lora=true and train.compile=true do not apply under train.distributed=fsdp "
            "(FSDP gathers a layer's weights only inside its own forward): set them to auto or false"
        )
    if fused_lora is True and method not in FUSED_METHODS:
        raise ConfigError(
            f"train.fused_lora=true applies to peft.method in {FUSED_METHODS} (LoRA, rsLoRA, DoRA, "
            f"LoftQ); peft.method={method} has its own layers: set train.fused_lora=false"
        )


# ---------------------------------------------------------------------------------------------------------------
# Fused LoRA / DoRA
# ---------------------------------------------------------------------------------------------------------------


class _FusedLoRA(torch.autograd.Function):
    """out = x W^T + bias + s·(drop(x) A^T) B^T  (LoRA), or with a magnitude m (DoRA, peft's definition):
    out = x W^T + bias + (g - 1)·(drop(x) W^T) + g·s·(drop(x) A^T) B^T,  g = m / ||W + s B A||_row (no gradient
    through the norm, as in the paper and peft). With dropout off the DoRA output is g·(x W^T + s·x A^T B^T) + bias.

    `weight` is a zero-argument function returning the frozen base weight (out, in) in the compute dtype: the
    quantized layer is dequantized in forward and again in backward, never kept. `cache` is the layer's own dict
    for what depends on the frozen weight only (DoRA: its row norms)."""

    @staticmethod
    def forward(
        ctx,
        x,
        a,
        b,
        mag,
        bias,
        weight: Callable[[], torch.Tensor],
        scale: float,
        p: float,
        cdt: torch.dtype,
        out_dtype: torch.dtype,
        cache: dict,
    ):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(cdt)
        w = weight()
        a_c, b_c = a.to(cdt), b.to(cdt)
        out = x2 @ w.t()
        mask = None
        xd = x2
        if p > 0:
            xd, mask = torch.native_dropout(x2, p, True)
        h = xd @ a_c.t()  # (tokens, r): small, saved for B's gradient
        if mag is None:
            out.addmm_(h, b_c.t(), alpha=scale)
            g = norm = u = None
        else:
            with torch.no_grad():  # ||W + s B A|| per output row, a detached constant as in DoRA, without forming
                # W + s B A: ||W_i||^2 (W is frozen: computed once) + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i
                if "w_norm2" not in cache:
                    cache["w_norm2"] = w.float().pow(2).sum(1)
                b32, a32 = b.float(), a.float()
                cross = ((w @ a_c.t()).float() * b32).sum(1)
                lora2 = ((b32 @ (a32 @ a32.t())) * b32).sum(1)
                norm = (cache["w_norm2"] + 2 * scale * cross + scale * scale * lora2).clamp_min(0).sqrt()
            g = (mag.float() / norm).to(cdt)
            # u = drop(x) W^T + s·l is what the magnitude multiplies: its gradient needs it
            if p == 0:
                u = out.addmm_(h, b_c.t(), alpha=scale)
                out = u * g
            else:
                z = xd @ w.t()
                u = torch.addmm(z, h, b_c.t(), alpha=scale)
                out.add_(u * g).sub_(z)  # x W^T + g·u - z = x W^T + (g - 1)·z + g·s·l
        del w
        if bias is not None:
            out += bias.to(cdt)
        ctx.weight, ctx.scale, ctx.p, ctx.cdt, ctx.lead = weight, scale, p, cdt, lead
        ctx.dtypes = (x.dtype, a.dtype, b.dtype, None if mag is None else mag.dtype)
        ctx.save_for_backward(xd, mask, h, a, b, g, norm, u)
        return out.to(out_dtype).reshape(*lead, -1)

    @staticmethod
    def backward(ctx, dout):
        xd, mask, h, a, b, g, norm, u = ctx.saved_tensors
        scale, p, cdt = ctx.scale, ctx.p, ctx.cdt
        x_dtype, a_dtype, b_dtype, m_dtype = ctx.dtypes
        dy = dout.reshape(-1, dout.shape[-1]).to(cdt)
        a_c, b_c = a.to(cdt), b.to(cdt)
        dmag = None
        if g is None:
            dl = dy  # gradient reaching the low-rank product (before its scale)
            dbase = dy
        else:
            dmag = ((dy.float() * u.float()).sum(0) / norm).to(m_dtype)
            dl = dy * g
            dbase = dy * g if p == 0 else dy  # through x W^T: the g-scaled path when one GEMM carried both terms
        dh = (dl @ b_c) * scale  # (tokens, r)
        db = ((dl.t() @ h) * scale).to(b_dtype)
        da = (dh.t() @ xd).to(a_dtype)
        w = ctx.weight()
        dx = dbase @ w
        dxd = dh @ a_c
        if g is not None and p > 0:
            dxd.addmm_(dy * (g - 1), w)  # the (g - 1)·(drop(x) W^T) term
        del w
        if mask is not None:
            dxd = torch.ops.aten.native_dropout_backward(dxd, mask, 1.0 / (1.0 - p))
        dx += dxd
        dbias = None
        return dx.to(x_dtype).reshape(*ctx.lead, -1), da, db, dmag, dbias, None, None, None, None, None, None


def _base_weight(base: nn.Module, cdt: torch.dtype) -> Callable[[], torch.Tensor]:
    from qpeft_bench.adapters.base import dense_weight

    return lambda: dense_weight(base).to(cdt)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft LoraLayer.forward for one active vanilla/DoRA adapter, unmerged; anything else (merged weights, mixed
    adapter batches, disabled adapters) takes peft's own forward, which computes the same thing."""
    adapters = [n for n in self.active_adapters if n in self.lora_A]
    if args or kwargs or self.merged or self.disable_adapters or len(adapters) != 1:
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    base = self.get_base_layer()
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    mag = self.lora_magnitude_vector[name].weight if name in getattr(self, "lora_magnitude_vector", {}) else None
    device = x.device.type
    if torch.is_autocast_enabled(device):
        cdt = torch.get_autocast_dtype(device)
    else:
        cdt = getattr(base, "compute_dtype", None) or x.dtype
    # bitsandbytes' layers return their input's dtype (OUTPUT_FOLLOWS_INPUT_DTYPE); the others compute with F.linear
    # or matmul, which under autocast return the autocast dtype
    follows_input = quant.capability(quant.owner(base), "OUTPUT_FOLLOWS_INPUT_DTYPE")
    follows_input = follows_input or not torch.is_autocast_enabled(device)
    out_dtype = x.dtype if follows_input else cdt
    with torch.autocast(device, enabled=False):
        return _FusedLoRA.apply(
            x,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            mag,
            getattr(base, "bias", None),
            _base_weight(base, cdt),
            self.scaling[name],
            p,
            cdt,
            out_dtype,
            self.__dict__.setdefault("_qpeft_fused_cache", {}),
        )


def fuse_lora(model: nn.Module) -> int:
    """Route every peft LoRA layer with a fusable base through the fused function; returns how many. Layers with
    other bases keep peft's path (the record says how many were fused)."""
    from peft.tuners.lora.layer import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and quant.capability(quant.owner(module.get_base_layer()), "FUSED_LORA_BASE"):
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n


def unfuse_lora(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), types.MethodType):
            del module.forward
        module.__dict__.pop("_qpeft_fused_cache", None)


# ---------------------------------------------------------------------------------------------------------------
# Chunked lm_head + cross-entropy
# ---------------------------------------------------------------------------------------------------------------


class _ChunkedNLL(torch.autograd.Function):
    """Sum over tokens of -log softmax(h W^T)[label] (labels -100 ignored), chunk by chunk; backward recomputes each
    chunk's logits. W (the lm_head) is frozen."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, hidden.shape[0], chunk):
            logits = (hidden[i : i + chunk] @ weight.t()).float()
            total += F.cross_entropy(logits, labels[i : i + chunk], ignore_index=-100, reduction="sum")
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, dtotal):
        hidden, weight, labels = ctx.saved_tensors
        dh = torch.empty_like(hidden)
        for i in range(0, hidden.shape[0], ctx.chunk):
            lab = labels[i : i + ctx.chunk]
            probs = torch.softmax((hidden[i : i + ctx.chunk] @ weight.t()).float(), dim=-1)
            valid = lab != -100
            probs[valid, lab[valid]] -= 1.0
            probs[~valid] = 0.0
            dh[i : i + ctx.chunk] = ((probs * dtotal).to(weight.dtype) @ weight).to(hidden.dtype)
        return dh, None, None, None


class _Hidden(nn.Module):
    """Stands in for lm_head while chunked: the model's 'logits' are its last hidden states."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.weight = head.weight  # what generation-side code reads (shape, dtype, device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM module inside peft / DDP wrappers."""
    inner = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


@contextlib.contextmanager
def chunked_loss(model: nn.Module, chunk: int) -> Iterator[None]:
    """While active, model(**batch).loss is the same mean next-token NLL computed chunk by chunk."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None or head.weight.requires_grad:
        raise ConfigError("train.chunked_loss needs a frozen lm_head without bias; set train.chunked_loss=0")
    weight = head.weight

    def loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs):
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        hidden = logits.reshape(-1, logits.shape[-1])
        target = shift_labels.reshape(-1).to(hidden.device)
        cdt = (
            torch.get_autocast_dtype(hidden.device.type)
            if torch.is_autocast_enabled(hidden.device.type)
            else weight.dtype
        )
        with torch.autocast(hidden.device.type, enabled=False):
            total = _ChunkedNLL.apply(hidden.to(cdt), weight.to(cdt), target, chunk)
        n = num_items_in_batch if num_items_in_batch is not None else (target != ignore_index).sum()
        return total / n

    lm.set_output_embeddings(_Hidden(head))
    lm.loss_function = loss
    try:
        yield
    finally:
        lm.set_output_embeddings(head)
        del lm._loss_function


# ---------------------------------------------------------------------------------------------------------------
# Regional compilation
# ---------------------------------------------------------------------------------------------------------------


def compile_layers(model: nn.Module) -> int:
    """torch.compile every decoder layer in place (nn.Module.compile); returns how many."""
    lm = causal_lm(model)
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"train.compile: {type(lm).__name__} has no model.layers to compile")
    for layer in layers:
        layer.compile()
    return len(layers)
