"""Build a GPTQ base block by block (calib.sequential) on one GPU from random weights of a card's real shape, the
model brought in one block at a time, and print peak memory and time next to plan mode's estimate.

    python scripts/bench_calibration.py --model llama2_70b --blocks 4 --samples 128 --seq-len 2048 --out DIR

`--blocks N` keeps the card's shapes with N decoder blocks (the time per block and the memory of one block's
calibration do not depend on how many come after; the quantized blocks' bytes grow linearly with N). Random
weights: the shape, not the values, decides memory and time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from qpeft_bench import ASSETS, accounting, calibration, estimate, models, quant

CONF = ASSETS.parent.parent / "conf" / "model"
NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2_70b")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    card = yaml.safe_load((CONF / f"{a.model}.yaml").read_text())
    arch = {"model_type": card["family"], **card["arch"], "num_hidden_layers": a.blocks}
    device, dtype = a.device, card.get("dtype", "bfloat16")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = models.empty_model(arch, dtype)
    model.config.use_cache = False
    targets = list(models.find_linears(model, NAMES))
    fill = models.layerwise(model, targets, models.TensorSource(None, dtype), device)
    windows = calibration.random_windows(arch["vocab_size"], a.samples, a.seq_len, seed=0)
    cfg = quant.get("gptq").Config(bits=a.bits, group_size=a.group_size)
    t0 = time.perf_counter()
    record = quant.quantize_model(
        "gptq", model, targets, cfg, dtype, device, windows=windows, fill=fill, sequential=True, progress=True
    )
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    meta = models.build_meta_model(arch, dtype)
    acc = accounting.base_sizes(meta)
    storage = lambda i, o, b: quant.get("gptq").linear_storage(i, o, b, cfg, dtype)  # noqa: E731
    acc.update(accounting.planned_quantized_sizes(meta, targets, storage))
    kw = {"samples": a.samples, "seq_len": a.seq_len, "sequential": True, "statistic": "hessian"}
    plan_mem = estimate.calibration_memory(
        arch,
        **kw,
        model_dtype=dtype,
        base_model_bytes=acc["base_model_bytes"],
        quantized_model_bytes=acc["quantized_model_bytes"],
        loaded_by_block=True,
    )
    plan_time = estimate.calibration_seconds(arch, **kw)
    out = {
        "model": a.model,
        "blocks": a.blocks,
        "of_blocks": card["arch"]["num_hidden_layers"],
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "calibration": {"samples": a.samples, "seq_len": a.seq_len},
        "wall_s": wall,
        "s_per_block": wall / a.blocks,
        "calibration_time_s": record["calibration_time_s"],
        "quantize_time_s": record["quantize_time_s"],
        "stats_peak_bytes": record["calibration_stats_peak_bytes"],
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "quantized_model_bytes": acc["quantized_model_bytes"],
        "plan": {"memory": plan_mem, "time": plan_time},
    }
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"calib_{a.model}_{a.blocks}blocks.json").write_text(text)


if __name__ == "__main__":
    main()
