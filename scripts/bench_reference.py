"""The reference stack's fine-tuning step (qlora.py's recipe: transformers + peft + bitsandbytes), measured the way
scripts/bench_train_step.py measures ours (the same plain loop, batches and memory probe), for side-by-side ratios.

    python scripts/bench_reference.py --save-model DIR --arch llama2_7b          # random weights, seed 0, saved once
    python scripts/bench_reference.py --model-dir DIR --method qlora --json ref.json --save-init init.safetensors

Recipes (docs/reference/gpu_baseline.md):
- qlora / qdora / qia3: from_pretrained(BitsAndBytesConfig(nf4, double quant, bf16 compute)) ->
  prepare_model_for_kbit_training(use_gradient_checkpointing=True) -> get_peft_model(LoraConfig(r, alpha, dropout 0.05,
  every linear[, use_dora]) or IA3Config(k, v, down)) -> bitsandbytes PagedAdamW32bit, lr 2e-4, wd 0.001, clip 0.3,
  bf16 autocast (the Trainer's --bf16).
- hqq4 / hqq2: transformers 5 cannot load HqqConfig, so the hqq package's own API quantizes the bf16 model
  (AutoHQQHFModel.quantize_model, group size 64), model.hqq_quantized = True so that peft's preparation turns
  checkpointing on, then the same peft LoRA and torch AdamW.
The model is in train mode for every step (from_pretrained returns eval mode, where transformers skips
checkpointing).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from qpeft_bench import accounting, models
from qpeft_bench.train import make_scheduler, train

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("qlora", "qdora", "qia3", "hqq4", "hqq2")


def save_random_model(arch_name: str, out: str) -> None:
    """The architecture card's model with random bf16 weights made as bench_train_step.py makes them (seed 0, on the
    GPU), saved as safetensors: both sides then start from the same weights."""
    from hydra import compose, initialize_config_dir

    from qpeft_bench.cli import CONF_DIR, job_config
    from qpeft_bench.spec import validate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        arch = validate(job_config(compose(config_name="run", overrides=[f"model={arch_name}"]))).model.arch_dict()
    torch.manual_seed(0)
    model = models.random_model(arch, "bfloat16", "cuda" if torch.cuda.is_available() else "cpu")
    model.save_pretrained(out, safe_serialization=True)


def reference_model(model_dir: str, method: str, r: int, alpha: int, dropout: float):
    from peft import IA3Config, LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if method.startswith("hqq"):
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
        AutoHQQHFModel.quantize_model(
            model,
            quant_config=BaseQuantizeConfig(nbits=int(method[3:]), group_size=64),
            compute_dtype=torch.bfloat16,
            device=device,
        )
        model.hqq_quantized = True
    else:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=bnb, dtype=torch.bfloat16, device_map={"": 0} if device == "cuda" else None
        )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if method == "qia3":
        config = IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
        )
    else:
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=TARGETS,
            bias="none",
            task_type="CAUSAL_LM",
            use_dora=method == "qdora",
        )
    return get_peft_model(model, config), device


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save-model", metavar="DIR", help="write the random-weight model of --arch and exit")
    parser.add_argument("--arch", default="llama2_7b", help="architecture card (conf/model/<arch>.yaml)")
    parser.add_argument("--model-dir")
    parser.add_argument("--method", choices=METHODS, default="qlora")
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--save-init", metavar="FILE", help="write the initial trainable tensors (peft names)")
    parser.add_argument("--profile", metavar="FILE")
    args = parser.parse_args(argv)
    if args.save_model:
        save_random_model(args.arch, args.save_model)
        return 0
    from bench_train_step import dump_json, profile_steps, random_batches, step_line

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, device = reference_model(args.model_dir, args.method, args.r, args.alpha, args.dropout)
    setup_s = time.perf_counter() - t0
    model.train()
    params = accounting.trainable_parameters(model)
    if args.save_init:
        from safetensors.torch import save_file

        save_file(
            {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}, args.save_init
        )
    if device == "cuda" and not args.method.startswith("hqq"):
        import bitsandbytes as bnb

        optimizer, opt_name = bnb.optim.PagedAdamW32bit(params, lr=2e-4, weight_decay=0.001), "paged_adamw_32bit"
    else:
        optimizer, opt_name = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.001), "adamw"
    batches = random_batches(model.config.vocab_size, args.batch, args.seq, device)
    result = train(
        model,
        batches,
        optimizer,
        make_scheduler(optimizer, "constant", 0, args.steps),
        max_steps=args.steps,
        grad_accum=1,
        max_grad_norm=0.3,
        device=device,
        compute_dtype=torch.bfloat16,
        measure_after=args.warmup,
        diverge_loss=float("inf"),
        log_every=args.steps,
        progress=False,
    )
    if args.profile:
        profile_steps(model, batches, optimizer, 0.3, device, torch.bfloat16, args.profile)
    out = {
        "side": "reference",
        "method": args.method,
        "r": args.r,
        "alpha": args.alpha,
        "dropout": args.dropout,
        "batch": args.batch,
        "seq": args.seq,
        "optimizer": opt_name,
        "setup_s": setup_s,
        "checkpointing_active": bool(getattr(model, "is_gradient_checkpointing", False)),
        "trainable_params": sum(p.numel() for p in params),
        **result,
    }
    print(f"reference {args.method}: {step_line(result)}, set-up {setup_s:.1f} s")
    dump_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
