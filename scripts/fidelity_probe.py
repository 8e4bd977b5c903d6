"""The measured effect of each opt-in deviation of the calibrated quantizers on the embedded tiny model (the numbers
in docs/fidelity.md): relative logit error against the unquantized model and mean NLL, on held-out windows of the
embedded text that calibration never saw. Run: .venv/bin/python scripts/fidelity_probe.py (CPU, a few minutes)."""

from __future__ import annotations

import torch

from qpeft_bench import ASSETS, calibration, models, quant

TINY = str(ASSETS / "tiny_llama")
NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = [
    ("gptq", {}),
    ("gptq", {"act_order": True, "static_groups": True}),
    ("gptq", {"static_groups": True}),
    ("gptq", {"round_scales_first": True}),
    ("gptq", {"sequential": False}),
    ("owq", {}),
    ("owq", {"tuning": "minmax"}),
    ("owq", {"score_with_error": False}),
    ("owq", {"act_order": True, "static_groups": True}),
    ("owq", {"sequential": False}),
    ("qeft", {}),
    ("qeft", {"global_vote": "inputs"}),
    ("qeft", {"score_with_error": False}),
    ("qeft", {"method": "nearest"}),
    ("qeft", {"sequential": False}),
]
BASE = {"gptq": {"bits": 3, "group_size": 64}, "owq": {"bits": 3, "group_size": 64, "k": 8}}
BASE["qeft"] = BASE["owq"]


def main() -> None:
    tok = models.load_tokenizer(TINY)
    texts = calibration.read_text(str(ASSETS / "data" / "tiny_text.txt"))
    windows = calibration.token_windows(tok, texts, samples=40, seq_len=128, seed=0)
    calib, held = windows[:32], windows[32:]
    with torch.no_grad():
        want = models.load_model(TINY, "float32", "cpu")(input_ids=held).logits
    print("| quantizer | setting | logit error | held-out NLL | mean layer output error |")
    print("|---|---|---|---|---|")
    for qname, knobs in SETTINGS:
        knobs = dict(knobs)
        sequential = knobs.pop("sequential", True)
        model = models.load_model(TINY, "float32", "cpu")
        targets = list(models.find_linears(model, NAMES))
        cfg = quant.get(qname).Config(**BASE[qname], **knobs)
        record = quant.quantize_model(
            qname, model, targets, cfg, "float32", "cpu", windows=calib, probe=calib[:1], sequential=sequential
        )
        with torch.no_grad():
            got = model(input_ids=held).logits
        err = float((got - want).norm() / want.norm())
        nll = float(torch.nn.functional.cross_entropy(got[:, :-1].reshape(-1, got.shape[-1]), held[:, 1:].reshape(-1)))
        label = ", ".join(f"{k}={v}" for k, v in knobs.items()) or "default (reference)"
        if not sequential:
            label = "calib.sequential=false" if label == "default (reference)" else f"{label}, calib.sequential=false"
        print(
            f"| {qname} {BASE[qname]['bits']}-bit g{BASE[qname]['group_size']} | {label} | {err:.4f} | {nll:.4f} | {record['output_rel_error']:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
