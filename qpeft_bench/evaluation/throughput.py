"""Speed measures of the QEFT study: generated tokens/s at batch 1, and forward / backward time of one step.

Both time `repeats` runs after one warm-up run (kernel selection, allocator growth, lazy dequantization
buffers) and report the median, which a single slow run on a shared machine does not move; on CUDA every
timer reads after `torch.cuda.synchronize`, since kernels run asynchronously. Neither changes the model: the
training mode, `use_cache`, gradient-checkpointing flags, gradients and the global RNG streams are restored.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from qpeft_bench.evaluation.perplexity import context_length
from qpeft_bench.train import autocast

DEFAULT_PROMPT = "Once upon a time, in a small town by a river, there lived"
WARMUP_REPEATS = 1


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")


def _check_context(model, tokens: int, what: str) -> None:
    context = context_length(model)
    if context is not None and tokens > context:
        raise ValueError(f"{what} = {tokens} tokens exceeds the model's context length {context}; lower it")


@torch.no_grad()
def generation_speed(
    model,
    tokenizer,
    *,
    new_tokens: int = 256,
    prompt: str = DEFAULT_PROMPT,
    repeats: int = 5,
    device: str,
    compute_dtype: torch.dtype = torch.float32,
) -> dict:
    """Greedy generation of exactly `new_tokens` tokens at batch 1, with the KV cache.

    EOS is ignored (min_new_tokens = max_new_tokens masks it), so every run does the same work whatever the
    model says. tokens/s = new_tokens / wall time of `generate`, which includes the prompt's one prefill
    pass (a dozen tokens by default, small against 256 decoding steps).
    """
    _check_counts(new_tokens=new_tokens, repeats=repeats)
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    prompt_tokens = inputs["input_ids"].shape[1]
    _check_context(model, prompt_tokens + new_tokens, "prompt + new_tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = model.config  # peft wrappers forward it to the base model's config
    was_training, use_cache = model.training, config.use_cache
    # The recipe turns the cache off for training; decoding without it recomputes the whole prefix per token.
    model.eval()
    config.use_cache = True
    per_repeat: list[float] = []
    try:
        for i in range(WARMUP_REPEATS + repeats):
            _sync(device)
            t0 = time.perf_counter()
            with autocast(device, compute_dtype):
                out = model.generate(
                    **inputs,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,
                    pad_token_id=pad_id,
                )
            _sync(device)
            seconds = time.perf_counter() - t0
            generated = out.shape[1] - prompt_tokens
            if generated != new_tokens:
                raise RuntimeError(f"generate produced {generated} new tokens instead of {new_tokens}")
            if i >= WARMUP_REPEATS:
                per_repeat.append(new_tokens / seconds)
    finally:
        config.use_cache = use_cache
        model.train(was_training)
    return {
        "tokens_per_s": statistics.median(per_repeat),
        "tokens_per_s_all": per_repeat,
        "new_tokens": new_tokens,
        "prompt_tokens": prompt_tokens,
        "batch_size": 1,
        "repeats": repeats,
        "warmup_repeats": WARMUP_REPEATS,
        "decoding": "greedy, KV cache, EOS ignored",
    }


def _checkpointing_flags(model) -> dict[torch.nn.Module, bool]:
    # transformers keeps the switch as a `gradient_checkpointing` attribute on the model and on each block.
    return {m: m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")}


@contextlib.contextmanager
def _checkpointing(model, enabled: bool):
    """Gradient checkpointing on or off for the block, then exactly as it was."""
    flags = _checkpointing_flags(model)
    if not flags and enabled:
        raise ValueError(
            f"{type(model).__name__} does not support gradient checkpointing; measure with gradient_checkpointing=False"
        )
    had_hooks = bool(getattr(model, "_require_grads_hooks", None))
    turned_on = enabled and not any(flags.values())
    if turned_on:  # as train.prepare_for_training, so the measured step is the trained one
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not had_hooks:  # a second set would leave hooks behind that we could not remove
            model.enable_input_require_grads()
    elif not enabled:
        for m in flags:
            m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.gradient_checkpointing = flag
        if turned_on and not had_hooks:
            model.disable_input_require_grads()


def step_speed(
    model,
    *,
    seq_len: int = 512,
    batch_size: int = 1,
    repeats: int = 5,
    device: str,
    compute_dtype: torch.dtype,
    gradient_checkpointing: bool = True,
    seed: int = 0,
) -> dict:
    """Forward and backward wall time (ms) of one training step on random token ids (labels = inputs).

    Runs in train mode, since transformers checkpoints (and peft applies dropout) only in train mode. The
    forward includes the loss. The backward must reach every trainable parameter (else a ValueError: the
    step timed would not be the one trained); no optimizer steps, and the gradients are put back as they
    were, so no weight changes. Dropout's random draws come from a forked RNG, so measuring does not shift a
    training run that follows.
    """
    _check_counts(seq_len=seq_len, batch_size=batch_size, repeats=repeats)
    _check_context(model, seq_len, "seq_len")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters: attach adapters (or unfreeze weights) first")
    params = [p for _, p in named]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    saved_grads = [p.grad for p in params]
    was_training = model.training
    forward_ms: list[float] = []
    backward_ms: list[float] = []
    cuda_devices = [torch.device(device)] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda_devices), _checkpointing(model, gradient_checkpointing):
        try:
            model.train()
            for i in range(WARMUP_REPEATS + repeats):
                for p in params:  # a training step starts from no gradients (zero_grad(set_to_none=True))
                    p.grad = None
                _sync(device)
                t0 = time.perf_counter()
                with autocast(device, compute_dtype):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                _sync(device)
                t1 = time.perf_counter()
                loss.backward()
                _sync(device)
                t2 = time.perf_counter()
                del loss
                if i < WARMUP_REPEATS:
                    missing = [n for n, p in named if p.grad is None]
                    if missing:
                        raise ValueError(
                            f"the loss's backward reaches no gradient of {len(missing)} of {len(named)} "
                            f"trainable tensors (e.g. {missing[:3]}); the timed step would not be "
                            "a training step"
                        )
                else:
                    forward_ms.append(1000 * (t1 - t0))
                    backward_ms.append(1000 * (t2 - t1))
        finally:
            for p, grad in zip(params, saved_grads, strict=True):
                p.grad = grad
            model.train(was_training)
    steps = [f + b for f, b in zip(forward_ms, backward_ms, strict=True)]
    return {
        "forward_ms": statistics.median(forward_ms),
        "backward_ms": statistics.median(backward_ms),
        "step_ms": statistics.median(steps),
        "forward_ms_all": forward_ms,
        "backward_ms_all": backward_ms,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "repeats": repeats,
        "warmup_repeats": WARMUP_REPEATS,
        "gradient_checkpointing": gradient_checkpointing,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "trainable_tensors": len(named),
    }
