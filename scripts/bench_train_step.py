"""Time and memory of fine-tuning steps on a real-shape model with random weights (the shape, not the
weights, decides speed and memory), through the project's own quantizers, adapters and training loop.

    python scripts/bench_train_step.py model=llama2_7b quant=nf4 peft.r=64 train=qlora --steps 10 --seq 512
    python scripts/bench_train_step.py model=llama2_7b quant=hqq peft.r=64 train=qlora --steps 10 --seq 512
    torchrun --nproc-per-node 2 scripts/bench_train_step.py model=llama2_7b train=qlora train.distributed=ddp train.gpus=2
    torchrun --nproc-per-node 2 scripts/bench_train_step.py model=llama2_70b train=qlora train.distributed=fsdp train.gpus=2

Arguments are the usual `qpeft-bench` overrides plus --steps, --seq (tokens per sequence) and --json FILE.
Batches are random tokens of full length (no padding), batch size from train.batch_size. The first
train.measure_after steps are warm-up. Prints s/step, tokens/s and peak/mean allocated memory, and the memory
held after each stage (load, quantize, adapters), which is where a quantizer's extra memory shows up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from hydra import compose, initialize_config_dir

from qpeft_bench import accounting, adapters, calibration, distributed, models, quant, speedups
from qpeft_bench.cli import CONF_DIR, job_config
from qpeft_bench.recipe import budgeted
from qpeft_bench.spec import validate
from qpeft_bench.train import make_optimizer, make_scheduler, prepare_for_training, train

GIB = 2**30


def allocated(device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def random_batches(vocab: int, batch: int, seq: int, device: str):
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def step_line(result: dict) -> str:
    """'0.424 s/step, 9661 tokens/s, peak 6.53 GiB, mean ... first losses [...]': a train() result on one line."""
    return (
        f"{result['s_per_step']:.3f} s/step, {result['tokens_per_s']:.0f} tokens/s, peak "
        f"{result['peak_memory_bytes'] / GIB:.2f} GiB, mean {result['mean_memory_bytes'] / GIB:.2f} GiB "
        f"({result['memory_kind']}), first losses {[round(x, 3) for x in result['losses'][:4]]}"
    )


def dump_json(path: str | None, out: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=2, default=str)


def load_adapter_weights(model, path: str) -> None:
    """Copy saved trainable tensors into the model by name; every trainable tensor must be found with its shape."""
    from safetensors.torch import load_file

    saved = load_file(path)
    mine = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(mine) - set(saved))
    if missing:
        raise SystemExit(f"--init-adapters {path}: no tensor for {missing[:3]} ({len(missing)} missing)")
    with torch.no_grad():
        for name, param in mine.items():
            param.copy_(saved[name].to(param.device, param.dtype))


def profile_steps(model, batches, optimizer, max_grad_norm: float, device: str, compute_dtype, path: str) -> None:
    """Two optimizer steps under torch.profiler: the kernels that take the time, for finding what to fuse."""
    from torch.profiler import ProfilerActivity, profile

    from qpeft_bench.train import accumulate

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    params = accounting.trainable_parameters(model)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(2):
            accumulate(model, [next(batches)], device, compute_dtype)
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(f"2 steps profiled, wall {wall:.3f} s (with profiler overhead)\n")
        f.write(prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--peft-prepare",
        action="store_true",
        help="set up as the reference recipe does: peft's prepare_model_for_kbit_training("
        "use_gradient_checkpointing=train.gradient_checkpointing) before the adapters, "
        "instead of our prepare_for_training after them",
    )
    parser.add_argument(
        "--no-hqq-flag",
        action="store_true",
        help="drop model.hqq_quantized after quantizing (what a recipe unaware of docs/design.md §7 has)",
    )
    parser.add_argument(
        "--init-adapters",
        default=None,
        metavar="FILE",
        help="start from these adapter weights (safetensors, peft names; scripts/bench_reference.py "
        "--save-init writes them): the same start as the reference run, for comparing losses",
    )
    parser.add_argument(
        "--layerwise",
        action="store_true",
        help="make the random weights one layer at a time, each quantized at once, as FSDP always does: "
        "a 70B shape never exists in 16 bits on the GPU",
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help="after the measured steps, profile 2 more with torch.profiler and write the top kernels "
        "(by device time) to FILE",
    )
    args, overrides = parser.parse_known_args(argv)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        spec = validate(job_config(compose(config_name="run", overrides=overrides)))
    device = models.resolve_device(spec.train.device)
    spec, budget = budgeted(spec, device)  # train.memory_budget: checkpointing, upcast and chunking chosen to fit
    t = spec.train
    compute = spec.model.dtype if t.compute_dtype == "auto" else t.compute_dtype
    arch = spec.model.arch_dict()
    stages = {}

    world, device = distributed.setup(t.distributed, device, t.gpus)  # torchrun ... train.distributed=ddp: one per GPU
    torch.manual_seed(0)
    sharded = t.distributed == "fsdp"
    layerwise = sharded or args.layerwise  # as a run loads its checkpoint under FSDP (quantized_base.load_base)
    model = (
        models.empty_model(arch, spec.model.dtype) if layerwise else models.random_model(arch, spec.model.dtype, device)
    )
    model.config.use_cache = False
    targets = list(models.find_linears(model, spec.model.linear_names))
    fill = models.layerwise(model, targets, models.TensorSource(None, spec.model.dtype), device) if layerwise else None
    stages["loaded"] = allocated(device)
    # random tokens for calibrating quantizers: speed and memory do not depend on what the windows say
    windows = calibration.random_windows(arch["vocab_size"], spec.calib.samples, spec.calib.seq_len, spec.seed)
    t0 = time.perf_counter()
    quant.quantize_model(spec.quant_name, model, targets, spec.quant, compute, device, windows=windows, fill=fill)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    stages["quantize_s"] = time.perf_counter() - t0
    stages["quantized"] = allocated(device)
    if args.no_hqq_flag and hasattr(model, "hqq_quantized"):
        del model.hqq_quantized
    if args.peft_prepare:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    with models.seeded(spec.seed):
        model = adapters.get(spec.peft_method).attach(model, targets, spec.peft)
    if args.init_adapters:
        load_adapter_weights(model, args.init_adapters)
    if not args.peft_prepare:
        prepare_for_training(
            model, upcast_norms_fp32=t.upcast_norms_fp32, gradient_checkpointing=t.gradient_checkpointing
        )
    stages["speed"] = speedups.setup(
        model,
        method=spec.peft_method,
        quant_name=spec.quant_name,
        device=device,
        fused_lora=t.fused_lora,
        compile=t.compile,
        sharded=sharded,
    )
    model.train()
    stages["checkpointing_active"] = bool(getattr(model, "is_gradient_checkpointing", False))
    stages["adapters"] = allocated(device)
    trainable = sum(p.numel() for p in accounting.trainable_parameters(model))
    wrapped = distributed.wrap(model, world, device, t.distributed, models.DTYPE[spec.model.dtype])
    stages["wrapped"] = allocated(device)
    optimizer, opt_name = make_optimizer(
        accounting.trainable_parameters(wrapped), t.optimizer, t.lr, t.weight_decay, device
    )
    batches = random_batches(arch["vocab_size"], t.batch_size, args.seq, device)
    chunk = 0 if sharded else t.chunked_loss  # as the run does (recipe.fine_tune)
    with speedups.loss_context(model, chunk):
        result = train(
            wrapped,
            batches,
            optimizer,
            make_scheduler(optimizer, t.lr_scheduler, t.warmup_steps, args.steps),
            max_steps=args.steps,
            grad_accum=t.grad_accum,
            max_grad_norm=t.max_grad_norm,
            device=device,
            compute_dtype=models.DTYPE[compute],
            measure_after=t.measure_after,
            diverge_loss=float("inf"),
            log_every=t.log_every,
            progress=False,
            world=world,
        )
        if args.profile and world.main:
            profile_steps(wrapped, batches, optimizer, t.max_grad_norm, device, models.DTYPE[compute], args.profile)
    if not world.main:
        return 0
    out = {
        "model": spec.model.name,
        "quant": spec.quant_name,
        "quant_cfg": vars(spec.quant),
        "peft": spec.peft_method,
        "peft_cfg": vars(spec.peft),
        "batch": t.batch_size,
        "seq": args.seq,
        "gradient_checkpointing": t.gradient_checkpointing,
        "upcast_norms_fp32": t.upcast_norms_fp32,
        "setup": "peft.prepare_model_for_kbit_training" if args.peft_prepare else "qpeft_bench",
        "hqq_flag": bool(getattr(model, "hqq_quantized", False)) if spec.quant_name == "hqq" else None,
        "optimizer": opt_name,
        "device": device,
        "stages_bytes": stages,
        "world_size": world.size,
        "distributed": t.distributed,
        "speed": {**stages["speed"], "chunked_loss": chunk, "memory_budget": budget},
        "trainable_params": trainable,
        "adapter_init": args.init_adapters,
        **{k: v for k, v in result.items() if k != "losses"},
        "losses": result["losses"],
        "first_losses": result["losses"][:4],
    }
    print(
        f"{spec.model.name} {spec.quant_name} {vars(spec.quant)} {spec.peft_method} r={getattr(spec.peft, 'r', '-')}"
        f" batch {t.batch_size}x{args.seq} GC={t.gradient_checkpointing} (active: {stages['checkpointing_active']})"
        f" upcast={t.upcast_norms_fp32} {opt_name} set-up: {out['setup']} processes: {world.size}"
    )
    print(
        f"  allocated after load {stages['loaded'] / GIB:.2f} GiB, after quantize {stages['quantized'] / GIB:.2f} "
        f"GiB ({stages['quantize_s']:.1f} s), after adapters {stages['adapters'] / GIB:.2f} GiB, after "
        f"{t.distributed if world.active else 'no'} wrap {stages['wrapped'] / GIB:.2f} GiB"
    )
    print(f"  {step_line(result)}")
    dump_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
