"""Plan-mode sizes against a really quantized model of the same shape.

Builds the model of an architecture card with random weights (the shape, not the weights, decides sizes),
quantizes it with the chosen quantizer, attaches the adapters, and prints every accounting key as planned
(storage-format functions on the meta device) and as measured (tensors held), with their ratio.

    python scripts/compare_plan_real.py model=llama2_7b quant=nf4 peft.r=64 train.device=cuda
    python scripts/compare_plan_real.py quant=fp4            # the embedded tiny model, its real weights

Arguments are the usual `qpeft-bench` overrides. Exit code 1 if any size differs by more than 0.5%.
"""

from __future__ import annotations

import sys
import time

import torch
from hydra import compose, initialize_config_dir

from qpeft_bench import accounting, adapters, calibration, models, plan, quant
from qpeft_bench.cli import CONF_DIR, job_config
from qpeft_bench.spec import validate

KEYS = (
    "total_params",
    "base_model_bytes",
    "param_buffer_bytes",
    "quant_state_bytes",
    "quantized_model_bytes",
    "bits_per_weight",
    "trainable_params",
    "adapter_bytes",
    "peft_overhead_bytes",
)


def measured(spec, device: str) -> dict:
    arch = spec.model.arch_dict()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if spec.model.path is not None:
        model = models.load_model(spec.model.path, spec.model.dtype, device)
    else:  # random weights of the real shape, made directly on the device
        model = models.random_model(arch, spec.model.dtype, device)
    print(f"built in {time.perf_counter() - t0:.1f} s on {device}", flush=True)
    targets = list(models.find_linears(model, spec.model.linear_names))
    acc = accounting.base_sizes(model)
    qmod = quant.get(spec.quant_name)
    # random tokens for calibrating quantizers: sizes do not depend on what the windows say
    windows = calibration.random_windows(arch["vocab_size"], spec.calib.samples, spec.calib.seq_len, 0)
    q = quant.quantize_model(spec.quant_name, model, targets, spec.quant, spec.model.dtype, device, windows=windows)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        acc["cuda_allocated_after_quantize_bytes"] = torch.cuda.memory_allocated()
        acc["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    acc["quantize_time_s"], acc["calibration_time_s"] = q["quantize_time_s"], q["calibration_time_s"]
    acc.update(accounting.measured_quantized_sizes(model, targets, qmod.state_bytes))
    plan.with_adapters(acc, model, targets, adapters.get(spec.peft_method), spec)
    return acc


def _fmt(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def main(overrides: list[str]) -> int:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        spec = validate(job_config(compose(config_name="run", overrides=overrides)))
    device = models.resolve_device(spec.train.device)
    planned = plan.plan_accounting(spec)
    real = measured(spec, device)
    print(f"\n{spec.model.name} / {spec.quant_name} / {spec.peft_method} on {device}")
    print(f"{'key':<24} {'planned':>18} {'measured':>18} {'measured/planned':>17}")
    worst = 0.0
    for key in KEYS:
        p, r = planned[key], real[key]
        ratio = r / p if p else float("nan") if r else 1.0
        worst = max(worst, abs(ratio - 1) if p else 0.0)
        print(f"{key:<24} {_fmt(p):>18} {_fmt(r):>18} {ratio:>17.6f}")
    for key in (
        "quantize_time_s",
        "calibration_time_s",
        "cuda_allocated_after_quantize_bytes",
        "cuda_peak_allocated_bytes",
    ):
        if key in real:
            print(f"{key:<24} {'':>18} {_fmt(real[key]):>18}")
    print(f"largest relative difference: {worst:.3%}")
    return 0 if worst <= 0.005 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
