"""Plan-mode estimates of a run's peak GPU memory and of its time, from the architecture alone (no weights).

The estimate describes our training loop (qpeft_bench/train.py: autocast to the compute dtype, LoRA-style adapters
through peft, SDPA attention, transformers' cross entropy) on one H100-class GPU with the efficiency the reference
stack reaches there (docs/reference/gpu_baseline.md). Memory is counted the way a real run records it
(docs/design.md §6): what PyTorch's allocator holds at the peak step, plus, separately, the optimizer state that
bitsandbytes' paged optimizers keep in CUDA managed memory, which the allocator never sees.

Activations are counted from what autograd keeps for backward, layer by layer, for a LLaMA block (RMSNorm, SDPA,
SwiGLU MLP) and an OPT block (LayerNorm, SDPA, ReLU MLP, residual dropout, learned positions); a test checks the
per-block count against the tensors autograd really saves on a tiny model. Not modelled: DoRA's weight norms
(a dequantized weight per layer and far more time), quantizers that keep dequantized weights around (HQQ's
measured peak is ~3x NF4's), allocator fragmentation (reserved > allocated), the CUDA context.
"""

from __future__ import annotations

from dataclasses import dataclass

from qpeft_bench import families
from qpeft_bench.config import ConfigError
from qpeft_bench.models import DTYPE

FP32 = 4  # bytes
# bf16 matrix product 8192^3 on the lent H100, measured with the reference stack (gpu_baseline.md). fp16 runs at
# the same rate on that card; fp32 matmuls are far slower and not measured, so fp32 runs are underestimated.
H100_BF16_MATMUL_FLOPS = 770e12
# Fraction of that ceiling our FLOP count of a step reaches with the reference stack, calibrated on ONE row of
# gpu_baseline.md: "no fp32 upcast (checkpointing + input grads only)", QLoRA r64 NF4+DQ LLaMA-2-7B, batch 8 x 512,
# 0.755 s/step; step_flops gives 1.715e14 FLOP for it, and 1.715e14 / (0.755 s * 770e12 FLOP/s) = 0.295. It
# absorbs what FLOPs do not count: dequantizing the 4-bit weights in every pass, elementwise work, the optimizer.
EFFICIENCY = 0.295
# Flash and memory-efficient attention recompute the s x s scores in backward: 5 matrix products against the
# forward's 2 (PyTorch's FlopCounterMode counts the same).
SDPA_BACKWARD_FACTOR = 2.5
# CUDA's fused dropout keeps a bool mask per element (the CPU path keeps a mask in the input's dtype).
DROPOUT_MASK_BYTES = 1
# bitsandbytes' paged optimizers page the state of tensors with at least this many elements; smaller ones get
# ordinary allocator tensors (bitsandbytes.optim.optimizer.Optimizer8bit.get_state_buffer).
PAGED_MIN_ELEMENTS = 100_000
OPTIMIZERS = ("auto", "adamw", "paged_adamw_32bit")
# OPTConfig's default residual dropout, which OPT checkpoints keep (0.1) and our cards leave unset.
OPT_DEFAULT_DROPOUT = 0.1


@dataclass(frozen=True)
class Shape:
    """The sizes that decide memory and time, read from transformers config fields (families.py's declarations)."""

    family: str
    layers: int
    hidden: int
    heads: int
    q_dim: int  # heads x head_dim
    kv_dim: int  # key-value heads x head_dim
    mlp: int  # intermediate_size (LLaMA) or ffn_dim (OPT)
    vocab: int
    lm_head_in: int  # OPT's word_embed_proj_dim may differ from hidden_size
    norm_elems: int  # elements of all norm parameters (what upcast_norms_fp32 widens)
    residual_dropout: float  # OPT drops out the attention and MLP outputs before each residual add
    linears: dict  # {name: (in_features, out_features)} of the linears of one block
    input_groups: tuple  # tuples of linear names that read the same input tensor
    gated_mlp: bool = True  # act(gate) * up (SwiGLU, GeGLU; fused or not) rather than act(fc1)
    layer_norm: bool = False  # LayerNorm (autocast runs it in fp32) rather than RMSNorm
    block_norms: int = 2  # hidden-wide norms a token passes in a block
    head_norm_elems: int = 0  # q/k head norms' elements per block (Qwen3, Gemma-3)
    attn_out: str = "o_proj"  # the linear reading the attention's output
    mlp_out: str = "down_proj"  # the linear reading the MLP's intermediate
    biases: int = 0  # bias elements of one block's linears


def model_shape(arch: dict) -> Shape:
    """The Shape of an architecture given as transformers config fields (with `model_type`, a family of
    families.py)."""
    family = families.get(arch.get("model_type"))
    try:
        d = family.dims(arch)
        layers, vocab = arch["num_hidden_layers"], arch["vocab_size"]
    except KeyError as err:
        raise ConfigError(
            f"architecture of model_type {family.model_type!r} lacks the field {err.args[0]!r} that the "
            "memory and time estimates need"
        ) from err
    linears = family.shapes(arch)
    per_norm = (2 if family.norm == "layer" else 1) * d.hidden  # LayerNorm: a weight and a bias
    head_norms = len(family.head_norms) * d.head_dim
    norms = (layers * len(family.block_norms) + int(family.final_norm(arch))) * per_norm + layers * head_norms
    opt = family.model_type == "opt"
    # Learned positions (OPT) are an embedding lookup: weights (in quantized_bytes), nothing kept for backward.
    # project_in/out (word_embed_proj_dim != hidden_size, OPT-350m) are left out of the FLOPs.
    return Shape(
        family=family.model_type,
        layers=layers,
        hidden=d.hidden,
        heads=d.heads,
        q_dim=d.q,
        kv_dim=d.kv,
        mlp=d.mlp,
        vocab=vocab,
        lm_head_in=(arch.get("word_embed_proj_dim") or d.hidden) if opt else d.hidden,
        norm_elems=norms,
        residual_dropout=arch.get("dropout", OPT_DEFAULT_DROPOUT) if opt else 0.0,
        linears=linears,
        input_groups=family.inputs,
        gated_mlp=family.gated_mlp,
        layer_norm=family.norm == "layer",
        block_norms=len(family.block_norms),
        head_norm_elems=head_norms,
        attn_out=family.names_of("attn_out")[0],
        mlp_out=family.names_of("mlp_out")[0],
        biases=sum(linears[n][1] for n in family.biased(arch)),
    )


def _bytes(dtype: str, what: str) -> int:
    if dtype not in DTYPE:
        raise ConfigError(f"{what}={dtype!r}; the estimates need a resolved dtype: one of {', '.join(DTYPE)}")
    return DTYPE[dtype].itemsize


def _norm_bytes_per_token(s: Shape) -> int:
    # RMSNorm upcasts its input to fp32 and keeps it (plus a per-token statistic); LayerNorm under autocast runs
    # in fp32 and keeps its fp32 input, mean and rstd. The frozen norm weight spares keeping the normalised output.
    return FP32 * (s.hidden + 2)


def _adapter_bytes_per_token(
    s: Shape, targets: list[str], rank: int, dropout: float, input_dtype: dict, adapter: int, compute: int
) -> int:
    """What the adapters of one block keep per token: the copies of their inputs that the adapter weight gradient
    needs, dropout masks, and the rank-r activations between A and B."""
    # Under autocast (compute < fp32) the adapter matmul keeps its input cast to the compute dtype; without it,
    # peft casts the input to the adapter's dtype and the matmul keeps that.
    kept = compute if compute < FP32 else adapter
    total = 0
    for group in s.input_groups:
        names = [n for n in group if n in targets]
        if not names:
            continue
        width = s.linears[names[0]][0]
        if dropout > 0:  # each linear's own dropout makes its own copy, and keeps a mask
            total += len(names) * width * (kept + DROPOUT_MASK_BYTES)
        elif input_dtype[names[0]] == adapter == kept:  # no cast, no dropout: linears reading one tensor share it
            total += width * kept
        else:  # each linear casts its input itself
            total += len(names) * width * kept
    return total + len(targets) * rank * kept


def _block_bytes_per_token(
    s: Shape,
    seq_len: int,
    compute: int,
    stream: int,
    norm_out: int,
    adapter: int,
    targets: list[str],
    rank: int,
    dropout: float,
) -> int:
    """Bytes one decoder block keeps for backward per token."""
    norms = s.block_norms * _norm_bytes_per_token(s)
    if s.head_norm_elems:  # q/k head norms keep their fp32 inputs and a statistic per head
        norms += FP32 * (s.q_dim + s.kv_dim) + FP32 * 2 * s.heads
    # SDPA's efficient kernels keep q, k, v and the output (autocast casts them to the compute dtype) and an fp32
    # log-sum-exp per head; no s x s score matrix. With grouped-query attention and a padding mask (our padded
    # batches), transformers repeats k and v to every query head before SDPA, and those copies are what is kept.
    # SDPA turns the boolean padding mask into an additive bias of the compute dtype in every layer and keeps it
    # (batch x seq x seq, i.e. seq per token). RoPE keeps only the shared cos/sin tables.
    attention = compute * (4 * s.q_dim + seq_len) + FP32 * s.heads
    if s.gated_mlp:
        # SwiGLU: SiLU keeps its input (gate's output) and the product keeps both factors (SiLU's and up's outputs)
        mlp = 3 * stream * s.mlp
    else:
        mlp = stream * s.mlp  # ReLU keeps its output, which is also fc2's input
    # OPT's dropout on the attention and MLP outputs before the residual adds keeps two masks
    residual_dropout = 2 * s.hidden * DROPOUT_MASK_BYTES if s.residual_dropout > 0 else 0
    # The frozen base linears keep no input: their weight needs no gradient, and bitsandbytes' matmul and
    # F.linear with a frozen weight keep only the weight.
    input_dtype = {n: norm_out for n in s.linears} | {s.attn_out: compute, s.mlp_out: stream}
    adapters = _adapter_bytes_per_token(s, targets, rank, dropout, input_dtype, adapter, compute)
    return norms + attention + mlp + residual_dropout + adapters


def train_memory(
    arch: dict,
    *,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    upcast_norms_fp32: bool,
    compute_dtype: str,
    adapter_dtype: str,
    trainable_params: int,
    quantized_bytes: int,
    adapter_rank: int,
    adapter_dropout: float,
    adapter_targets: list[str] | None = None,
    model_dtype: str = "bfloat16",
    optimizer: str = "paged_adamw_32bit",
    output_follows_input_dtype: bool = True,
    dequantizes: bool = True,
) -> dict:
    """Peak GPU memory of one training step, by component, in bytes.

    `quantized_bytes`: the model as stored (accounting's quantized_model_bytes). `adapter_rank` and
    `adapter_dropout`: LoRA's r and dropout (0 for adapters without them, e.g. IA3). `adapter_targets`: the linear
    names of a block that carry adapters (None: all of them). `optimizer`: as train.optimizer (auto is the paged
    one, which a GPU gets). `output_follows_input_dtype`: the quantized linears return their input's dtype, as
    bitsandbytes' layers do (nf4, fp4, int8); autocast-aware layers (F.linear-based formats, no quantization)
    return the compute dtype. `dequantizes`: the base weights are dequantized for each matmul (any quantizer).

    Returns the components, `peak_bytes` (their sum: what the GPU must hold), `paged_optimizer_bytes` (the part
    of the optimizer state bitsandbytes keeps in CUDA managed memory) and `allocated_peak_bytes` (peak minus the
    paged part: what torch.cuda.max_memory_allocated, the figure runs record, reports).
    """
    s = model_shape(arch)
    compute = _bytes(compute_dtype, "compute_dtype")
    adapter = _bytes(adapter_dtype, "adapter_dtype")
    model = _bytes(model_dtype, "model_dtype")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer={optimizer!r}; the estimates know {', '.join(OPTIMIZERS)}")
    targets = list(s.linears) if adapter_targets is None else list(adapter_targets)
    unknown = sorted(set(targets) - set(s.linears))
    if unknown:
        raise ConfigError(f"adapter targets {unknown} are no linear of a {s.family} block ({', '.join(s.linears)})")
    tokens = batch_size * seq_len

    # A norm's output is fp32 when its weight is (upcast) or, for LayerNorm, because autocast runs it in fp32.
    # Layers that return their input's dtype (bitsandbytes) then carry fp32 on through the MLP into the residual
    # stream; autocast-aware layers bring it back to the compute dtype.
    norm_out_fp32 = compute < FP32 and (upcast_norms_fp32 or s.layer_norm)
    norm_out = FP32 if norm_out_fp32 else compute
    stream = FP32 if norm_out_fp32 and output_follows_input_dtype else compute
    block = _block_bytes_per_token(
        s, seq_len, compute, stream, norm_out, adapter, targets, adapter_rank, adapter_dropout
    )
    final_norm = _norm_bytes_per_token(s)  # outside the checkpointed blocks: kept in both cases
    if gradient_checkpointing:
        # Only each block's input survives the forward; in backward one block at a time is recomputed and its
        # activations exist until its backward is done.
        activations = tokens * (s.layers * stream * s.hidden + final_norm)
        recompute = tokens * block
    else:
        activations = tokens * (s.layers * block + final_norm)
        recompute = 0
    # transformers' loss upcasts the logits to fp32; cross entropy keeps its fp32 log-probabilities, and at the
    # start of backward the gradient nll_loss returns and log_softmax's input gradient join them: three fp32
    # tokens x vocab tensors (more than the compute-dtype logits + fp32 copy + log-probs of the forward).
    loss = tokens * s.vocab * 3 * FP32
    # bitsandbytes and our packed formats dequantize one weight at a time to the compute dtype for each matmul
    largest = max(i * o for i, o in s.linears.values())
    dequant = largest * compute if dequantizes else 0
    # The loss tensors are freed before the first block's backward, so the transients do not add up.
    transient = max(loss, recompute + dequant)

    # Our optimizer steps the adapter parameters directly (no fp32 master copy; train.py). bitsandbytes' 32-bit
    # AdamW keeps two fp32 states per element whatever the parameter dtype; torch's AdamW keeps them in the
    # parameter's dtype (zeros_like).
    paged_opt = optimizer in ("auto", "paged_adamw_32bit")
    optimizer_bytes = 2 * (FP32 if paged_opt else adapter) * trainable_params
    paged = 0
    if paged_opt:
        # LoRA's A (r x in) and B (out x r) per adapted linear; those above bitsandbytes' threshold are paged
        big = sum(
            n
            for t in targets
            for n in (adapter_rank * s.linears[t][0], adapter_rank * s.linears[t][1])
            if n >= PAGED_MIN_ELEMENTS
        )
        paged = 2 * FP32 * min(trainable_params, s.layers * big)

    components = {
        "weights_bytes": quantized_bytes,  # the model as stored: quantized linears + embeddings, norms, lm_head
        # upcast_norms_fp32 widens the norm parameters from the model dtype to fp32
        "norm_upcast_bytes": s.norm_elems * (FP32 - model) if upcast_norms_fp32 and model < FP32 else 0,
        "trainable_bytes": trainable_params * adapter,
        "gradient_bytes": trainable_params * adapter,  # gradients take their parameter's dtype
        "optimizer_bytes": optimizer_bytes,
        "activation_bytes": activations,  # kept from the forward through the start of backward
        "transient_bytes": transient,
    }
    peak = sum(components.values())
    return {**components, "peak_bytes": peak, "paged_optimizer_bytes": paged, "allocated_peak_bytes": peak - paged}


def step_flops(
    arch: dict,
    *,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    trainable_params: int,
    grad_accum: int = 1,
) -> int:
    """Floating-point operations of one optimizer step (grad_accum micro-batches of batch_size x seq_len).

    Matrix products only: the frozen base linears, attention (QK^T and PV over the full s x s, since a padding
    mask keeps SDPA from skipping the causal half), lm_head and the adapters (counted as 2 FLOP per trainable
    parameter and token). Backward computes input gradients only for frozen weights (about one forward) and
    input plus weight gradients for the adapters; gradient checkpointing adds one more forward of the blocks.
    """
    s = model_shape(arch)
    tokens = batch_size * seq_len
    base = 2 * tokens * s.layers * sum(i * o for i, o in s.linears.values())
    head = 2 * tokens * s.lm_head_in * s.vocab
    attention = s.layers * 2 * (2 * batch_size * seq_len * seq_len * s.q_dim)
    adapters = 2 * tokens * trainable_params
    forward = base + head + attention + adapters
    backward = base + head + SDPA_BACKWARD_FACTOR * attention + 2 * adapters
    recompute = base + attention + adapters if gradient_checkpointing else 0  # lm_head is not checkpointed
    return round(grad_accum * (forward + backward + recompute))


def step_seconds(flops: float) -> float:
    """Seconds of one optimizer step on one H100-class GPU at the reference stack's efficiency (module constants)."""
    return flops / (H100_BF16_MATMUL_FLOPS * EFFICIENCY)


def run_seconds(steps: int, seconds_per_step: float) -> float:
    """Training time of a run: its optimizer steps (each of micro batch x grad_accum x seq_len tokens) at the
    estimated step time. Quantization, evaluation and loading are not included."""
    return steps * seconds_per_step


def per_gpu(memory: dict, kind: str, gpus: int, blocks: int) -> dict:
    """`train_memory`'s components for one of `gpus` data-parallel GPUs (train.distributed).

    ddp: every GPU holds the whole job of one process, plus DDP's gradient buckets (a flat copy of the trainable
    gradients it all-reduces). fsdp: weights, trainable parameters, gradients and optimizer state are sharded
    1/gpus; each GPU also holds one gathered block (the unit FSDP materialises for its forward and backward, about
    1/blocks of the weights); activations and transients are per GPU as before. Not measured here: NCCL buffers.
    """
    out = dict(memory)
    if kind == "ddp":
        out["ddp_bucket_bytes"] = memory["gradient_bytes"]
    elif kind == "fsdp":
        for key in ("weights_bytes", "norm_upcast_bytes", "trainable_bytes", "gradient_bytes", "optimizer_bytes"):
            out[key] = -(-memory[key] // gpus)
        out["fsdp_gathered_block_bytes"] = memory["weights_bytes"] // max(blocks, 1)
    elif kind != "none":
        raise ConfigError(f"train.distributed={kind!r}: no per-GPU estimate")
    parts = [
        k
        for k in out
        if k.endswith("_bytes") and k not in ("peak_bytes", "paged_optimizer_bytes", "allocated_peak_bytes")
    ]
    paged = memory["paged_optimizer_bytes"] // (gpus if kind == "fsdp" else 1)
    peak = sum(out[k] for k in parts)
    return {**out, "peak_bytes": peak, "paged_optimizer_bytes": paged, "allocated_peak_bytes": peak - paged}


# ---------------------------------------------------------------------------------------------------------------
# Calibration (gptq, owq, qeft, smoothquant): statistics, activations and weights held, and time
# ---------------------------------------------------------------------------------------------------------------

# What each calibrated quantizer collects per distinct layer input. hessian: sum x x^T, fp32 in x in (GPTQ, OWQ,
# QEFT); channel: one fp32 value per input channel (SmoothQuant's max |x_j|, QEFT method=nearest's diagonal).
STATISTICS = ("hessian", "channel")
# The quantizers calibrated block by block when calib.sequential is on; SmoothQuant stays one pass.
SEQUENTIAL_QUANTIZERS = ("gptq", "owq", "qeft")
# H100 SXM's fp32 rate without tensor cores, from NVIDIA's datasheet: NOT measured on the lent card. Calibration
# runs its Hessian sums and GPTQ's factorisations in fp32, and torch leaves TF32 off for matmuls by default.
H100_FP32_FLOPS = 67e12
# GPTQ's sweep (quant/gptq.py, like the reference) is a Python loop over the input columns, a few small kernels
# each: at LLM shapes its time is set by the column count, not by FLOPs. Calibrated on ONE measurement,
# results/bench/h100_2026-12-07_calibration/calib_llama2_7b_8blocks.json (scripts/bench_calibration.py): GPTQ 4-bit
# g128, block by block, of 8 LLaMA-2-7B-shaped blocks (56 linears, 8 x (6 x 4096 + 11008) = 219,136 columns)
# quantized in 68.6 s on the lent H100. The FLOPs of that row (gptq_flops below) take some of it at
# H100_FP32_FLOPS; the rest, per column (the 70B-shaped row of the same run is within 20% of what this predicts):
GPTQ_CALIBRATION_BLOCKS = 8
GPTQ_CALIBRATION_S, GPTQ_CALIBRATION_COLUMNS = 68.64, GPTQ_CALIBRATION_BLOCKS * (6 * 4096 + 11008)
# Cholesky, its inverse and the upper factor of the inverse (gptq.inverse_factor): n^3/3 + 2n^3/3 + n^3/3.
INVERSE_FLOPS_PER_N3 = 4 / 3


def _distinct_input_widths(s: Shape) -> list[int]:
    """in_features of each distinct input of a block: q, k, v read one tensor, gate and up another (input_groups)."""
    return [s.linears[group[0]][0] for group in s.input_groups]


def gptq_flops(linears: dict) -> float:
    """fp32 FLOPs of GPTQ on `linears` ({name: (in, out)}): per layer the inverse factor of its H (done per layer,
    even where layers share H) and the column sweep, whose lazy-batch updates of the columns after each block of
    128 add up to about out x in^2."""
    return sum(INVERSE_FLOPS_PER_N3 * i**3 + o * i * i for i, o in linears.values())


def _gptq_seconds_per_column() -> float:
    h, m = 4096, 11008  # LLaMA-2-7B, the calibration row's shapes
    block = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (h, m), "up": (h, m), "down": (m, h)}
    flops_s = GPTQ_CALIBRATION_BLOCKS * gptq_flops(block) / H100_FP32_FLOPS
    return (GPTQ_CALIBRATION_S - flops_s) / GPTQ_CALIBRATION_COLUMNS


GPTQ_SECONDS_PER_COLUMN = _gptq_seconds_per_column()  # ~240 us


def _check_calibration(statistic: str, samples: int, seq_len: int) -> None:
    if statistic not in STATISTICS:
        raise ConfigError(f"calibration statistic {statistic!r}; the estimates know {', '.join(STATISTICS)}")
    if samples <= 0 or seq_len <= 0:
        raise ConfigError(f"calibration of {samples} windows of {seq_len} tokens: both must be > 0")


def calibration_memory(
    arch: dict,
    *,
    samples: int,
    seq_len: int,
    sequential: bool,
    statistic: str,
    model_dtype: str,
    base_model_bytes: int,
    quantized_model_bytes: int,
    loaded_by_block: bool = False,
) -> dict:
    """Peak device memory of calibrating and quantizing the model, by component, in bytes.

    `samples` windows of `seq_len` tokens (calib.samples, calib.seq_len); `statistic`: one of STATISTICS;
    `base_model_bytes` / `quantized_model_bytes`: accounting's. One pass (`sequential` false): the unquantized
    model runs one window at a time with every block's statistics held, then each layer is quantized. Sequential:
    block by block, each block's statistics from the quantized blocks' outputs, one block's statistics at a time,
    the windows' hidden states held between blocks. `loaded_by_block`: the unquantized model is brought in one
    block at a time (quant.quantize_model's `fill`, as scripts/bench_calibration.py does); a run (qpeft-bench) loads
    it whole before calibrating, so by default the whole unquantized model is counted in both modes.

    Components: `stats_peak_bytes` (statistics held at once; `stats_per_block_bytes` one block's),
    `activations_bytes` (`held_activations_bytes`: sequential's block inputs and outputs of all windows;
    `window_bytes`: one window's forward at batch 1), `weights_bytes` (one pass: `weights_unquantized_bytes`, the
    whole model in its dtype; sequential: `weights_quantized_bytes`, the quantized model as stored, i.e. at the
    last block, assuming quantized blocks stay on the device, plus `weights_unquantized_block_bytes`, one block in
    the model dtype), `quantize_work_bytes` (GPTQ's working copies for the largest layer). The window's forward and
    the quantization of a layer do not overlap, so `peak_bytes` counts the larger of the two.
    """
    _check_calibration(statistic, samples, seq_len)
    s = model_shape(arch)
    m = _bytes(model_dtype, "model_dtype")
    widths = _distinct_input_widths(s)
    per_block = FP32 * (sum(w * w for w in widths) if statistic == "hessian" else sum(widths))
    # One window's forward at batch 1: the residual stream and the normed input, the larger of attention's q, k, v
    # and output and the MLP's two or three intermediates, and the fp32 copy the statistic hook makes of the widest
    # input. One pass also runs lm_head (its logits, in the model dtype).
    kv = s.kv_dim
    mlp = (3 if s.gated_mlp else 1) * s.mlp
    window = seq_len * ((2 * s.hidden + max(2 * s.q_dim + 2 * kv, mlp)) * m + FP32 * max(widths))
    if not sequential:
        window += seq_len * s.vocab * m
    held = 2 * samples * seq_len * s.hidden * m if sequential else 0
    # GPTQ per layer: fp32 W and its codes (out x in each), and up to four in x in fp32 matrices (the permuted H and
    # inverse_factor's clone, Cholesky factor and inverse) next to the held statistic.
    work = max(FP32 * (2 * o * i + 4 * i * i) for i, o in s.linears.values()) if statistic == "hessian" else 0
    out = {
        "sequential": sequential,
        "loaded_by_block": sequential and loaded_by_block,
        "statistic": statistic,
        "stats_per_block_bytes": per_block,
    }
    if sequential and loaded_by_block:
        norms = s.block_norms * (2 if s.layer_norm else 1) * s.hidden + s.head_norm_elems
        block = (sum(i * o for i, o in s.linears.values()) + norms + s.biases) * m
        weights = {"weights_quantized_bytes": quantized_model_bytes, "weights_unquantized_block_bytes": block}
    else:
        weights = {"weights_unquantized_bytes": base_model_bytes}
    stats = per_block if sequential else s.layers * per_block
    weights_bytes = sum(weights.values())
    out |= {
        "stats_peak_bytes": stats,
        "held_activations_bytes": held,
        "window_bytes": window,
        "activations_bytes": held + window,
        **weights,
        "weights_bytes": weights_bytes,
        "quantize_work_bytes": work,
        "peak_bytes": stats + held + weights_bytes + max(window, work),
    }
    return out


def calibration_seconds(arch: dict, *, samples: int, seq_len: int, sequential: bool, statistic: str) -> dict:
    """Estimated seconds of calibration and quantization on one H100-class GPU, by component.

    Forward passes over the windows (2 x linear parameters x tokens, plus attention; sequential runs each block
    twice, for its statistics and to propagate the quantized block's outputs; one pass runs the whole model once,
    lm_head included) at the training estimate's bf16 rate and EFFICIENCY; the statistics (hessian: 2 x tokens x
    in^2 per distinct input) and GPTQ's factorisations and sweep (gptq_flops) at H100_FP32_FLOPS; the sweep's
    per-column overhead at GPTQ_SECONDS_PER_COLUMN. `channel` statistics quantize without a sweep (round to
    nearest), which is taken as free. An estimate: loading the weights from disk is not included."""
    _check_calibration(statistic, samples, seq_len)
    s = model_shape(arch)
    tokens = samples * seq_len
    linear = sum(i * o for i, o in s.linears.values())
    attention = 2 * (2 * samples * seq_len * seq_len * s.q_dim)  # QK^T and PV per block, as step_flops
    block_forward = 2 * tokens * linear + attention
    if sequential:
        forward = 2 * s.layers * block_forward
    else:
        forward = s.layers * block_forward + 2 * tokens * s.lm_head_in * s.vocab
    widths = _distinct_input_widths(s)
    stats = s.layers * 2 * tokens * (sum(w * w for w in widths) if statistic == "hessian" else sum(widths))
    if statistic == "hessian":
        sweep_flops = s.layers * gptq_flops(s.linears)
        columns = s.layers * sum(i for i, _ in s.linears.values())
    else:
        sweep_flops = columns = 0
    parts = {
        "forward_seconds": forward / (H100_BF16_MATMUL_FLOPS * EFFICIENCY),
        "statistics_seconds": stats / H100_FP32_FLOPS,
        "quantize_seconds": sweep_flops / H100_FP32_FLOPS + columns * GPTQ_SECONDS_PER_COLUMN,
    }
    return {
        **parts,
        "seconds": sum(parts.values()),
        "forward_flops": forward,
        "statistics_flops": stats,
        "quantize_flops": round(sweep_flops),
        "sweep_columns": columns,
    }
