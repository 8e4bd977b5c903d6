"""Model families: what each decoder-only architecture's blocks are made of, declared once and read by accounting,
plan-mode estimates, layer groups, quantizers, adapters and FSDP.

A family is selected by the checkpoint's `model_type` (config.json). For each: the linears of a block, the *role*
each plays (attention in/out, MLP in/out) and its (in, out) shape from the config fields, which linears read the
same input tensor (their calibration statistics are shared), the block's norms, biases, the MLP's form (gated or
not) and where the blocks are. A fused linear (Phi-3's `qkv_proj`, `gate_up_proj`) is one linear with one role:
per-type knobs (`peft.by_layer.attn.r`) apply to it whole.

Only the field values are read here; transformers builds the model. A `model_type` not declared here is refused
with one line naming what is known (docs/families.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from qpeft_bench.config import ConfigError

ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out")
GROUP_ROLES = {"attn": ("attn_in", "attn_out"), "mlp": ("mlp_in", "mlp_out")}


@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes a block's shapes are made of, from the config fields."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim


@dataclasses.dataclass(frozen=True)
class Linear:
    name: str  # the module's own name (the last part of its path)
    path: str  # under a block, e.g. self_attn.q_proj
    role: str  # one of ROLES
    shape: Callable[[Dims], tuple[int, int]]  # (in_features, out_features)
    bias: Callable[[dict], bool]  # whether it has a bias, from the config fields


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    blocks: str  # where the decoder blocks are, from the model's root
    linears: tuple[Linear, ...]
    inputs: tuple[tuple[str, ...], ...]  # linears that read the same input tensor
    norm: str  # rms | layer (LayerNorm: a weight and a bias)
    block_norms: tuple[str, ...]  # hidden-wide norms of a block
    head_norms: tuple[str, ...] = ()  # head_dim-wide norms of the attention (Qwen3, Gemma-3: q_norm, k_norm)
    gated_mlp: bool = True  # SwiGLU/GeGLU (act(gate) * up) rather than act(fc1)
    final_norm: Callable[[dict], bool] = lambda a: True
    mlp_field: str = "intermediate_size"
    notes: str = ""

    @property
    def linear_names(self) -> list[str]:
        return [lin.name for lin in self.linears]

    @property
    def roles(self) -> dict[str, str]:
        return {lin.name: lin.role for lin in self.linears}

    def names_of(self, *roles: str) -> list[str]:
        return [lin.name for lin in self.linears if lin.role in roles]

    def dims(self, arch: dict) -> Dims:
        h, heads = arch["hidden_size"], arch["num_attention_heads"]
        return Dims(
            hidden=h,
            heads=heads,
            kv_heads=arch.get("num_key_value_heads") or heads,
            head_dim=arch.get("head_dim") or h // heads,
            mlp=arch[self.mlp_field],
        )

    def shapes(self, arch: dict) -> dict[str, tuple[int, int]]:
        d = self.dims(arch)
        return {lin.name: lin.shape(d) for lin in self.linears}

    def biased(self, arch: dict) -> list[str]:
        return [lin.name for lin in self.linears if lin.bias(arch)]


def _flag(name: str, default: bool) -> Callable[[dict], bool]:
    return lambda arch: bool(arch.get(name, default))


_NO = _flag("__never__", False)
_YES = _flag("__always__", True)
_ATTENTION_BIAS = _flag("attention_bias", False)  # LlamaConfig's attention_bias: q, k, v and o
_MLP_BIAS = _flag("mlp_bias", False)


def _llama_like(
    model_type: str,
    attention_bias: Callable[[dict], bool] = _ATTENTION_BIAS,
    qkv_bias: Callable[[dict], bool] | None = None,
    mlp_bias: Callable[[dict], bool] = _MLP_BIAS,
    block_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm"),
    head_norms: tuple[str, ...] = (),
    notes: str = "",
) -> Family:
    qkv = qkv_bias or attention_bias
    return Family(
        model_type=model_type,
        blocks="model.layers",
        linears=(
            Linear("q_proj", "self_attn.q_proj", "attn_in", lambda d: (d.hidden, d.q), qkv),
            Linear("k_proj", "self_attn.k_proj", "attn_in", lambda d: (d.hidden, d.kv), qkv),
            Linear("v_proj", "self_attn.v_proj", "attn_in", lambda d: (d.hidden, d.kv), qkv),
            Linear("o_proj", "self_attn.o_proj", "attn_out", lambda d: (d.q, d.hidden), attention_bias),
            Linear("gate_proj", "mlp.gate_proj", "mlp_in", lambda d: (d.hidden, d.mlp), mlp_bias),
            Linear("up_proj", "mlp.up_proj", "mlp_in", lambda d: (d.hidden, d.mlp), mlp_bias),
            Linear("down_proj", "mlp.down_proj", "mlp_out", lambda d: (d.mlp, d.hidden), mlp_bias),
        ),
        inputs=(("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)),
        norm="rms",
        block_norms=block_norms,
        head_norms=head_norms,
        notes=notes,
    )


GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        _llama_like("llama", notes="LLaMA-1/2/3, Llama-3.1/3.2 (RoPE scaling, tied embeddings in 3.2 1B/3B)"),
        _llama_like("mistral", attention_bias=_NO, mlp_bias=_NO, notes="Mistral-7B (sliding-window attention)"),
        _llama_like("qwen2", attention_bias=_NO, qkv_bias=_YES, mlp_bias=_NO, notes="Qwen2/Qwen2.5: q, k, v biases"),
        _llama_like(
            "qwen3",
            mlp_bias=_NO,
            head_norms=("self_attn.q_norm", "self_attn.k_norm"),
            notes="Qwen3: RMSNorm on q and k heads",
        ),
        _llama_like(
            "gemma2",
            mlp_bias=_NO,
            block_norms=GEMMA_NORMS,
            notes="Gemma-2: norms before and after attention and MLP, (1 + w) RMSNorm, logit soft-capping, tied",
        ),
        _llama_like(
            "gemma3_text",
            mlp_bias=_NO,
            block_norms=GEMMA_NORMS,
            head_norms=("self_attn.q_norm", "self_attn.k_norm"),
            notes="Gemma-3 text models: Gemma-2's norm layout plus q/k norms, tied embeddings",
        ),
        Family(
            model_type="phi3",
            blocks="model.layers",
            linears=(
                Linear("qkv_proj", "self_attn.qkv_proj", "attn_in", lambda d: (d.hidden, d.q + 2 * d.kv), _NO),
                Linear("o_proj", "self_attn.o_proj", "attn_out", lambda d: (d.q, d.hidden), _NO),
                Linear("gate_up_proj", "mlp.gate_up_proj", "mlp_in", lambda d: (d.hidden, 2 * d.mlp), _NO),
                Linear("down_proj", "mlp.down_proj", "mlp_out", lambda d: (d.mlp, d.hidden), _NO),
            ),
            inputs=(("qkv_proj",), ("o_proj",), ("gate_up_proj",), ("down_proj",)),
            norm="rms",
            block_norms=("input_layernorm", "post_attention_layernorm"),
            notes="Phi-3/3.5: fused qkv_proj and gate_up_proj, each one linear of its role",
        ),
        Family(
            model_type="opt",
            blocks="model.decoder.layers",
            linears=(
                Linear(
                    "q_proj", "self_attn.q_proj", "attn_in", lambda d: (d.hidden, d.hidden), _flag("enable_bias", True)
                ),
                Linear(
                    "k_proj", "self_attn.k_proj", "attn_in", lambda d: (d.hidden, d.hidden), _flag("enable_bias", True)
                ),
                Linear(
                    "v_proj", "self_attn.v_proj", "attn_in", lambda d: (d.hidden, d.hidden), _flag("enable_bias", True)
                ),
                Linear(
                    "out_proj",
                    "self_attn.out_proj",
                    "attn_out",
                    lambda d: (d.hidden, d.hidden),
                    _flag("enable_bias", True),
                ),
                Linear("fc1", "fc1", "mlp_in", lambda d: (d.hidden, d.mlp), _flag("enable_bias", True)),
                Linear("fc2", "fc2", "mlp_out", lambda d: (d.mlp, d.hidden), _flag("enable_bias", True)),
            ),
            inputs=(("q_proj", "k_proj", "v_proj"), ("out_proj",), ("fc1",), ("fc2",)),
            norm="layer",
            block_norms=("self_attn_layer_norm", "final_layer_norm"),
            gated_mlp=False,
            final_norm=_flag("do_layer_norm_before", True),
            mlp_field="ffn_dim",
            notes="OPT: LayerNorm, biases, learned positions, ReLU MLP",
        ),
    )
}

# model_types that are not their own family, with what to do instead
NOT_FAMILIES = {
    "gemma3": "the multimodal Gemma-3 checkpoint (model_type gemma3); its text model is model_type gemma3_text",
}


def _role_of_names() -> dict[str, str]:
    """{linear name: role} over every family. A name plays the same role in every family that has it (q_proj is
    always an attention input), so layer groups can go by name; a new family that broke this would fail here."""
    out: dict[str, str] = {}
    for family in FAMILIES.values():
        for lin in family.linears:
            if out.setdefault(lin.name, lin.role) != lin.role:
                raise AssertionError(f"{family.model_type}.{lin.name} is {lin.role}, elsewhere {out[lin.name]}")
    return out


ROLE_OF = _role_of_names()


def type_groups() -> dict[str, tuple[str, ...]]:
    """The layer groups by role (`attn`, `mlp`) as the linear names that play them in any family."""
    return {g: tuple(n for n, r in ROLE_OF.items() if r in roles) for g, roles in GROUP_ROLES.items()}


def names_with_role(role: str) -> list[str]:
    """The linear names that play `role` in any family (e.g. mlp_out: down_proj, fc2)."""
    return [n for n, r in ROLE_OF.items() if r == role]


# A small architecture every family builds with (config fields a family does not read are ignored by its config):
# the tests' random models of each family and the support matrix's family columns.
TINY_ARCH = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "ffn_dim": 256,
    "word_embed_proj_dim": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 2048,  # the embedded tokenizer's
    "max_position_embeddings": 1024,  # eval.speed.seq_len (512) must fit
    "pad_token_id": 3,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def get(model_type: str | None) -> Family:
    """The family of a `model_type`, or a one-line ConfigError naming the known ones."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    why = NOT_FAMILIES.get(model_type or "", "")
    raise ConfigError(
        f"model_type {model_type!r} is no family qpeft-bench knows{': ' + why if why else ''}; known: "
        + ", ".join(FAMILIES)
        + " (qpeft_bench/families.py declares each one's linears, roles and norms)"
    )


def names() -> list[str]:
    return list(FAMILIES)
