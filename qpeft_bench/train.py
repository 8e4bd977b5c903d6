"""The training loop: plain PyTorch, so that what is timed and measured is exactly the step and nothing else."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from qpeft_bench import distributed
from qpeft_bench.accounting import trainable_parameters
from qpeft_bench.distributed import SINGLE, World
from qpeft_bench.memory import MemoryProbe


class Diverged(RuntimeError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"training diverged at step {step}: loss {loss}")
        self.step, self.loss = step, loss


def prepare_for_training(model, *, upcast_norms_fp32: bool, gradient_checkpointing: bool) -> None:
    """The two set-up switches that move peak memory by gigabytes on 7B models (docs/design.md §6)."""
    from qpeft_bench.models import is_norm_param

    if upcast_norms_fp32:  # qlora.py's end state after prepare_model_for_kbit_training
        for name, p in model.named_parameters():
            if is_norm_param(name) and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen embeddings would otherwise cut the graph


def make_optimizer(params: list, name: str, lr: float, weight_decay: float, device: str):
    if name == "auto":
        name = "paged_adamw_32bit" if device.startswith("cuda") else "adamw"
    if name == "paged_adamw_32bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(params, lr=lr, weight_decay=weight_decay), name
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), name


def make_scheduler(optimizer, name: str, warmup_steps: int, max_steps: int):
    def factor(step: int) -> float:
        # (step + 1): the first update already gets a non-zero rate; HF's step / warmup wastes a step at 0.
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast(device: str, compute_dtype: torch.dtype):
    """Mixed precision as HF's Trainer runs it with bf16=True: needed once some weights are upcast to fp32
    (norms, as prepare_model_for_kbit_training does) while others stay in bf16."""
    if compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=compute_dtype)


def accumulate(
    model, micro_batches: list[dict], device: str, compute_dtype: torch.dtype, scaler=None, world: World = SINGLE
) -> tuple[float, int]:
    """Forward and backward over the micro-batches of one optimizer step, weighting each by its labelled
    tokens so the gradient is that of the mean NLL over the whole window (as one big batch would give),
    not a mean of per-batch means. Returns (mean loss, tokens seen).

    Data parallel (distributed.py): `micro_batches` are the step's batches of every process; this one runs its own
    slice, weighted by the tokens of all of them, times the world size because DDP averages the gradients."""
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches]
    total = max(1, sum(counts))
    per = len(micro_batches) // world.size
    mine = range(world.rank * per, (world.rank + 1) * per)
    step_loss, tokens = 0.0, 0
    for k, i in enumerate(mine):
        batch = to_device(micro_batches[i], device)
        last = k == per - 1
        # DDP all-reduces gradients in every backward unless told otherwise: once per step is enough
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, compute_dtype):
                loss = model(**batch).loss * (counts[i] / total)  # the model's loss: mean over this batch's tokens
            scaled = loss * world.size
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        step_loss += loss.item()
        tokens += int(batch["attention_mask"].sum())
    return distributed.sum_all(step_loss, device, world), tokens


def train(
    model,
    batches: Iterator[dict],
    optimizer,
    scheduler,
    *,
    max_steps: int,
    grad_accum: int,
    max_grad_norm: float,
    device: str,
    compute_dtype: torch.dtype,
    measure_after: int,
    diverge_loss: float,
    log_every: int,
    progress: bool = True,
    world: World = SINGLE,
    start_step: int = 0,
    losses: list[float] | None = None,
    on_step: Callable[[int, list[float]], None] | None = None,
) -> dict:
    """Run `max_steps` optimizer steps; time and memory are measured on the steps after `measure_after`.
    With several processes (`world`), each step draws grad_accum micro-batches per process from `batches`.
    Resuming (`start_step` steps done, their `losses`): `batches` must continue where they stopped, and time and
    memory are measured on the resumed part only, after its own `measure_after` warm-up steps. `on_step(done,
    losses)` runs after each optimizer step but the last (checkpoints)."""
    params = trainable_parameters(model)
    # FSDP's gradients are shards: only its own method knows the whole norm (a collective)
    clip = getattr(model, "clip_grad_norm_", None) or (lambda norm: torch.nn.utils.clip_grad_norm_(params, norm))
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
    scaler = torch.amp.GradScaler(device.split(":")[0]) if compute_dtype == torch.float16 else None
    probe = MemoryProbe(device)
    losses = list(losses or [])
    tokens = 0
    begin = measure_after if start_step == 0 else min(start_step + measure_after, max_steps - 1)
    model.train()  # transformers applies gradient checkpointing (and LoRA dropout) only in train mode
    bar = tqdm(
        range(start_step, max_steps),
        desc="train",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
        initial=start_step,
        total=max_steps,
    )
    t_start, t_loop = None, time.perf_counter()
    for step in bar:
        if step == begin:
            probe.reset()
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            t_start, tokens = time.perf_counter(), 0
        step_loss, n_tokens = accumulate(
            model, [next(batches) for _ in range(grad_accum * world.size)], device, compute_dtype, scaler, world
        )
        tokens += n_tokens
        if not math.isfinite(step_loss) or step_loss > diverge_loss:
            raise Diverged(step, step_loss)
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        if max_grad_norm > 0:
            clip(max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if step >= measure_after:
            probe.step()
        if (step + 1) % log_every == 0 or step + 1 == max_steps:
            bar.set_postfix(loss=f"{sum(losses[-log_every:]) / len(losses[-log_every:]):.4f}")
        if on_step is not None and step + 1 < max_steps:  # after the last step there is nothing to resume: a run
            on_step(
                step + 1, losses
            )  # killed later (saving, evaluating) redoes that step instead of resuming at the end
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t_start
    measured = max_steps - begin
    s_per_step = elapsed / measured
    tokens = int(distributed.sum_all(tokens, device, world))  # every process' tokens: the job's throughput
    memory = probe.summary()
    if world.active:  # the largest per-process peak: what each GPU must hold
        memory["peak_memory_bytes"] = distributed.max_all(memory["peak_memory_bytes"], device, world)
    return {
        "steps": max_steps,
        "measured_steps": measured,
        "losses": losses,
        "final_loss": losses[-1],
        "s_per_step": s_per_step,
        "tokens_per_s": tokens / elapsed,
        "time_500_steps_s": 500 * s_per_step,  # the unit of the thesis' runtime tables
        "loop_s": time.perf_counter() - t_loop,  # every step, warm-up included: the rest of a run is fixed overhead
        **memory,
    }
