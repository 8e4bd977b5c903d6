"""Our fine-tuning step against the reference stack (qlora.py's recipe), side by side in one call.

    python scripts/bench_vs_reference.py --methods qlora,qdora --out results/bench/h200.md \\
        --variant recipe="train.upcast_norms_fp32=true" \\
        --variant fast="train.fused_lora=true train.chunked_loss=1024 train.upcast_norms_fp32=false"

For each method: the reference run (scripts/bench_reference.py), then each variant of ours
(scripts/bench_train_step.py with the method's overrides + train=qlora + the variant's overrides), each in its own
process (clean memory peaks), on the same random-weight model (saved once, seed 0), the same random batches and, for
LoRA-family methods, the same initial adapters (copied from the reference). Before them, a bf16 matmul ceiling
(8192^3) is measured on the card. The report gives s/step, tokens/s, peak and mean allocated memory, achieved TFLOP/s
(qpeft_bench/estimate.py's FLOP count of the step) and its fraction of the ceiling, the ratios ours/reference, and
the largest relative difference of the loss trajectories (dropout masks differ between the two stacks, so the
losses agree to a tolerance, LOSS_TOLERANCE, not exactly).

Methods without a peft implementation (qalora, qbara, qahira, weakcol) are compared with the QLoRA reference: the
recipe a user would otherwise run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GIB = 2**30
LOSS_TOLERANCE = 0.01  # max |ours - ref| / ref over the steps; bf16 rounding and different dropout masks

# method -> (reference recipe, our overrides, adapters copied from the reference)
METHODS = {
    "qlora": ("qlora", "quant=nf4 peft=lora", True),
    "qdora": ("qdora", "quant=nf4 peft=dora", True),
    "qia3": ("qia3", "quant=nf4 peft=ia3", False),
    "hqq4": ("hqq4", "quant=hqq quant.nbits=4 quant.group_size=64 peft=lora", True),
    "hqq2": ("hqq2", "quant=hqq quant.nbits=2 quant.group_size=64 peft=lora", True),
    # RTN instead of GPTQ for QA-LoRA's base: the same storage format and step, without GPTQ's ~3 min column loop
    "qalora": ("qlora", "quant=rtn quant.group_size=32 peft=qa_lora peft.group_size=32", False),
    "qbara": ("qlora", "method=qbara", False),
    "qahira": ("qlora", "method=qahira", False),
    "weakcol": ("qlora", "quant=qeft peft=weak_columns", False),
}
LORA_KNOBS = "peft.r={r} peft.alpha={alpha} peft.dropout=0.05 peft.adapter_dtype=float32"


def matmul_ceiling(n: int = 8192, iters: int = 20) -> float:
    """bf16 TFLOP/s of an n^3 matrix product on this card (the denominator of 'fraction of the ceiling')."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def step_flops(arch_name: str, batch: int, seq: int, checkpointing: bool, trainable: int) -> float:
    from hydra import compose, initialize_config_dir

    from qpeft_bench import estimate
    from qpeft_bench.cli import CONF_DIR, job_config
    from qpeft_bench.spec import validate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        arch = validate(job_config(compose(config_name="run", overrides=[f"model={arch_name}"]))).model.arch_dict()
    return estimate.step_flops(
        arch, batch_size=batch, seq_len=seq, gradient_checkpointing=checkpointing, trainable_params=trainable
    )


def run(cmd: list[str], log: Path, timeout: int) -> bool:
    print("$", shlex.join(cmd), flush=True)
    try:
        with log.open("w") as f:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout} s (log: {log})", flush=True)
        return False
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    print("\n".join(f"  {line}" for line in tail), flush=True)
    return done.returncode == 0


def loss_gap(ours: list[float], ref: list[float]) -> float | None:
    n = min(len(ours), len(ref))
    return max(abs(o - r) / abs(r) for o, r in zip(ours[:n], ref[:n], strict=True)) if n else None


def versions() -> str:
    import importlib.metadata as md

    names = ("torch", "transformers", "peft", "bitsandbytes", "hqq")
    have = []
    for name in names:
        try:
            have.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(have)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llama2_7b")
    parser.add_argument("--methods", default="qlora")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME[@M1+M2]=OVERRIDES",
        help="one of ours: a name and qpeft-bench overrides on top of train=qlora (repeatable); "
        "@M1+M2 runs it for those methods only",
    )
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model-dir", default="/tmp/qpeft_bench_random_model")
    parser.add_argument("--out", required=True, help="Markdown report; JSON and logs go to a folder beside it")
    parser.add_argument("--profile", action="store_true", help="also profile 2 steps of each run (kernel tables)")
    parser.add_argument("--timeout", type=int, default=400, help="seconds per run")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    variants = dict(v.split("=", 1) for v in args.variant) or {"ours": ""}
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    folder = out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    py = sys.executable

    cuda = args.device == "cuda" and torch.cuda.is_available()
    ceiling = matmul_ceiling() if cuda else None
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    if not Path(args.model_dir, "config.json").is_file():
        t0 = time.perf_counter()
        run(
            [py, str(HERE / "bench_reference.py"), "--save-model", args.model_dir, "--arch", args.arch],
            folder / "save_model.log",
            args.timeout,
        )
        print(f"  random model saved in {time.perf_counter() - t0:.1f} s", flush=True)
    common = ["--steps", str(args.steps), "--seq", str(args.seq)]
    rows, refs = [], {}
    for method in methods:
        recipe, ours, copy_init = METHODS[method]
        ref_json, init = folder / f"{recipe}_reference.json", folder / f"{recipe}_init.safetensors"
        if recipe not in refs:  # methods without a peft implementation share the QLoRA reference: run it once
            cmd = [
                py,
                str(HERE / "bench_reference.py"),
                "--model-dir",
                args.model_dir,
                "--method",
                recipe,
                "--r",
                str(args.r),
                "--alpha",
                str(args.alpha),
                "--batch",
                str(args.batch),
                "--json",
                str(ref_json),
                "--save-init",
                str(init),
                *common,
            ]
            if args.profile:
                cmd += ["--profile", str(folder / f"{recipe}_reference.prof.txt")]
            ok = run(cmd, folder / f"{recipe}_reference.log", args.timeout)
            refs[recipe] = json.loads(ref_json.read_text()) if ok else None
        ref = refs[recipe]
        for label, extra in variants.items():
            name, _, only = label.partition("@")
            if only and method not in only.split("+"):
                continue
            if "peft=lora" in ours or "peft=dora" in ours:
                knobs = LORA_KNOBS.format(r=args.r, alpha=args.alpha)
            elif method in ("qalora", "qbara"):  # rank and scale as the reference's LoRA; their own dropout default
                knobs = f"peft.r={args.r} peft.alpha={args.alpha}"
            else:
                knobs = ""
            if not copy_init or method == "qia3":  # fused_lora is for peft's LoRA family only; others keep theirs
                extra = " ".join(o for o in extra.split() if not o.startswith("train.fused_lora="))
            overrides = (
                f"model={args.arch} train=qlora train.batch_size={args.batch} train.device={args.device} "
                f"{ours} {knobs} {extra}"
            ).split()
            mine_json = folder / f"{method}_{name}.json"
            cmd = [py, str(HERE / "bench_train_step.py"), *overrides, "--json", str(mine_json), *common]
            if copy_init and ref is not None:
                cmd += ["--init-adapters", str(init)]
            if args.profile:
                cmd += ["--profile", str(folder / f"{method}_{name}.prof.txt")]
            mine = (
                json.loads(mine_json.read_text()) if run(cmd, folder / f"{method}_{name}.log", args.timeout) else None
            )
            rows.append((method, name, extra, ref, mine))
    report = render(rows, ceiling, device_name, args)
    out.write_text(report)
    print(report)
    return 0


def _flops(args, side: dict | None, checkpointing: bool) -> float | None:
    if side is None:
        return None
    trainable = side.get("trainable_params") or side.get("stages_bytes", {}).get("trainable_params") or 0
    return step_flops(args.arch, args.batch, args.seq, checkpointing, trainable) / side["s_per_step"] / 1e12


def render(rows, ceiling: float | None, device_name: str, args) -> str:
    lines = [
        f"# Ours vs the reference stack: {args.arch}, batch {args.batch} x {args.seq}, r {args.r}, alpha "
        f"{args.alpha}, dropout 0.05",
        "",
        f"Device: {device_name}. Packages: {versions()}. bf16 matmul ceiling (8192^3): "
        + (f"{ceiling:.0f} TFLOP/s." if ceiling else "not measured (no GPU)."),
        "",
        "Command:",
        "",
        "    python3 scripts/bench_vs_reference.py " + shlex.join(sys.argv[1:]),
        "",
        "| method | ours | s/step ref | s/step ours | tokens/s ratio | peak GiB ref | peak GiB ours | peak ratio "
        "| mean GiB ours | TFLOP/s ours (of ceiling) | loss gap | overrides |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, name, extra, ref, mine in rows:
        if ref is None or mine is None:
            ref_s = "failed" if ref is None else format(ref["s_per_step"], ".3f")
            mine_s = "failed" if mine is None else format(mine["s_per_step"], ".3f")
            lines.append(f"| {method} | {name} | {ref_s} | {mine_s} | | | | | | | | `{extra}` |")
            continue
        tflops = _flops(args, {**mine, "trainable_params": ref["trainable_params"]}, mine["gradient_checkpointing"])
        frac = f" ({tflops / ceiling:.0%})" if ceiling else ""
        gap = loss_gap(mine["losses"], ref["losses"])
        lines.append(
            f"| {method} | {name} | {ref['s_per_step']:.3f} | {mine['s_per_step']:.3f} | "
            f"{mine['tokens_per_s'] / ref['tokens_per_s']:.2f}x | {ref['peak_memory_bytes'] / GIB:.2f} | "
            f"{mine['peak_memory_bytes'] / GIB:.2f} | {mine['peak_memory_bytes'] / ref['peak_memory_bytes']:.2f}x | "
            f"{mine['mean_memory_bytes'] / GIB:.2f} | {tflops:.0f}{frac} | "
            f"{gap:.4f}{'' if gap <= LOSS_TOLERANCE else ' (over tolerance)'} | `{extra}` |"
        )
    lines += [
        "",
        f"loss gap: the largest |ours - reference| / reference over the {args.steps} steps' losses "
        f"(tolerance {LOSS_TOLERANCE}). TFLOP/s: qpeft_bench/estimate.py's FLOPs of the step / measured s/step.",
        f"Environment: {os.environ.get('HOSTNAME', platform.node())}, Python {platform.python_version()}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
