"""Time our GPTQ layer quantization against the reference's column sweep on the same weights and Hessians, one
decoder block of a card's real shapes, on one device; and check that both give the same quantized weights.

    python scripts/bench_gptq_reference.py --model llama2_7b --tokens 262144 --out DIR

The reference is IST-DASLab/gptq's `GPTQ.fasterquant` with `Quantizer.find_params` as restated step by step in
tests/test_fidelity_gptq.py (`ref_fasterquant`, `RefQuantizer`; the restatement the bit-for-bit tests compare us
with), not the reference script itself, which is not installed here: its time is that of the same torch operations
in the same order. Both get identical inputs: the layer's random weights of the card's shape in the model dtype, and
the Hessian 2/n X^T X of `--tokens` random inputs (fp32), built once per distinct input as the block's layers share
them; the weights are values of the model dtype held in fp32, as the reference computes. `max_rel_diff`: the largest
difference of the two quantized weights over the layer's largest weight. The tests find them identical to the bit;
at other shapes the order of floating-point sums in the error propagation can differ by an ulp, and dynamic groups
fit their scales from the propagated weights, so a few scales (and the weights they scale) differ by about 1e-7. Times are CUDA-synchronised, after one warm-up layer; the reference runs its defaults (dynamic groups, no
act-order), ours its reference-exact default.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from qpeft_bench import ASSETS, estimate, quant

ROOT = ASSETS.parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the reference restatement lives with the tests that pin it

from test_fidelity_gptq import RefQuantizer, ref_fasterquant  # noqa: E402


def _hessian(width: int, tokens: int, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    H = torch.zeros(width, width, device=device)
    chunk = 8192
    for start in range(0, tokens, chunk):
        x = torch.randn(min(chunk, tokens - start), width, device=device, generator=gen)
        H += x.T @ x
    return H * (2 / tokens)


def _timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2_7b")
    p.add_argument("--tokens", type=int, default=128 * 2048, help="inputs the Hessians are built from")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    card = yaml.safe_load((ROOT / "conf" / "model" / f"{a.model}.yaml").read_text())
    # a card without arch (the embedded tiny model) is read from its checkpoint's config.json
    arch = card["arch"] or json.loads((ASSETS / a.model / "config.json").read_text())
    arch = {"model_type": card["family"], **arch}
    shape = estimate.model_shape(arch)
    dtype = getattr(torch, card.get("dtype", "bfloat16"))
    device = a.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gptq = quant.get("gptq")
    cfg = gptq.Config(bits=a.bits, group_size=a.group_size)
    hessians = {}
    for k, group in enumerate(shape.input_groups):
        width = shape.linears[group[0]][0]
        hessians |= dict.fromkeys(group, _hessian(width, a.tokens, device, seed=k))
    gen = torch.Generator(device=device).manual_seed(1)
    rows, total = [], {"ours_s": 0.0, "reference_s": 0.0}
    names = list(shape.linears)
    for i, name in enumerate([names[0], *names]):  # the first layer once more, as the warm-up
        n_in, n_out = shape.linears[name]
        # weights of the model dtype's values, held in fp32 as the reference computes (W.float()): both sides then
        # round the same numbers, and the comparison is exact
        lin = torch.nn.Linear(n_in, n_out, bias=False, device=device)
        with torch.no_grad():
            lin.weight.copy_((0.02 * torch.randn(n_out, n_in, device=device, generator=gen)).to(dtype))
        H = hessians[name]
        ours, t_ours = _timed(functools.partial(gptq.quantize_linear, lin, cfg, "float32", device, H), sync)
        W = lin.weight.data.float()
        with torch.device(device):  # the restatement makes its helper tensors on the default device, as the
            # reference makes them on the weight's
            ref, t_ref = _timed(functools.partial(ref_fasterquant, W, H, RefQuantizer(a.bits), a.group_size), sync)
        diff = float((ours.dequantize().float() - ref).abs().max() / ref.abs().max())
        if i == 0:
            continue
        rows.append(
            {"layer": name, "in": n_in, "out": n_out, "ours_s": t_ours, "reference_s": t_ref, "max_rel_diff": diff}
        )
        total["ours_s"] += t_ours
        total["reference_s"] += t_ref
    out = {
        "model": a.model,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "bits": a.bits,
        "group_size": a.group_size,
        "hessian_tokens": a.tokens,
        "reference": "IST-DASLab/gptq fasterquant as restated in tests/test_fidelity_gptq.py",
        "layers": rows,
        "block": total | {"ratio_reference_over_ours": total["reference_s"] / total["ours_s"]},
        "model_estimate_s": {k: v * shape.layers for k, v in total.items()},
        "max_rel_diff": max(r["max_rel_diff"] for r in rows),
    }
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"gptq_vs_reference_{a.model}.json").write_text(text)


if __name__ == "__main__":
    main()
