"""LoftQ initialisation: our time for a whole model, and our error against peft's on the same layers.

    python scripts/bench_loftq.py --model-dir DIR [--rank 64] [--compare-layers 7] [--json FILE]

DIR: a saved model (safetensors), e.g. the random-weight LLaMA-2-7B that scripts/bench_reference.py --save-model
writes. Steps:
1. The recipe's path: load in bf16, quantize with our NF4 + double quantization, then loftq.loftq_init (r, 4 bit, 1
   iteration) with an empty cache: the time the run record would show (reading W from the checkpoint included).
2. Error at the same settings as peft's LoftQ (NF4 blocks of 64 without double quantization, 1 iteration) on the
   first --compare-layers target matrices: ||W - Q - B A||_F / ||W||_F with peft.utils.loftq_utils.loftq_init (exact
   SVD) and with ours (bitsandbytes NF4 of W, randomized rank-r SVD of the residual), and the time of each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from qpeft_bench import models, quant
from qpeft_bench.adapters import loftq

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--compare-layers", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    model = models.load_model(args.model_dir, "bfloat16", device)
    targets = list(models.find_linears(model, TARGETS))
    quant.quantize_model("nf4", model, targets, quant.get("nf4").Config(), "bfloat16", device)
    os.environ["QPEFT_CACHE"] = tempfile.mkdtemp()  # a cold cache: the time of a first run
    sync()
    t0 = time.perf_counter()
    out = loftq.loftq_init(model, targets, args.rank, 1)
    sync()
    whole = time.perf_counter() - t0
    print(
        f"ours, whole model: {len(targets)} matrices, r {args.rank}, 1 iteration: {whole:.1f} s "
        f"(loftq_init's own report: {out['report']['time_s']:.1f} s)",
        flush=True,
    )
    del model, out
    if device != "cuda":  # peft's loftq_init runs on CUDA only
        print("no GPU: the comparison with peft's LoftQ is skipped")
        return 0

    from peft.utils.loftq_utils import loftq_init as peft_loftq

    originals = loftq.checkpoint_weights(args.model_dir, targets[: args.compare_layers])
    rows = []
    for name, w in originals.items():
        w = w.to(device)
        t0 = time.perf_counter()
        q, a, b = peft_loftq(w, num_bits=4, reduced_rank=args.rank, num_iter=1)
        sync()
        t_peft = time.perf_counter() - t0
        err_peft = ((w.float() - q.float() - b.float() @ a.float()).norm() / w.float().norm()).item()
        t0 = time.perf_counter()
        old = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        old.weight = torch.nn.Parameter(w, requires_grad=False)
        layer = quant.get("nf4").quantize_linear(old, quant.get("nf4").Config(double_quant=False), "bfloat16", device)
        factors = loftq.loftq_layer(w, layer, args.rank, 1)
        sync()
        t_ours = time.perf_counter() - t0
        q_ours = quant.get("nf4").dequantize(layer).float()
        err_ours = ((w.float() - q_ours - factors["L"] @ factors["R"]).norm() / w.float().norm()).item()
        err_q = ((w.float() - q_ours).norm() / w.float().norm()).item()
        rows.append(
            {
                "matrix": name,
                "shape": list(w.shape),
                "peft_error": err_peft,
                "ours_error": err_ours,
                "quant_only_error": err_q,
                "peft_s": t_peft,
                "ours_s": t_ours,
            }
        )
        print(
            f"{name} {tuple(w.shape)}: ||W-Q-BA||/||W|| peft {err_peft:.6f}, ours {err_ours:.6f} "
            f"(ratio {err_ours / err_peft:.5f}; Q alone {err_q:.6f}); time peft {t_peft:.2f} s, ours {t_ours:.3f} s",
            flush=True,
        )
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "rank": args.rank,
        "whole_model_s": whole,
        "matrices": len(targets),
        "compare": rows,
        "max_error_ratio": max(r["ours_error"] / r["peft_error"] for r in rows),
    }
    print(f"largest error ratio ours/peft: {result['max_error_ratio']:.5f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
