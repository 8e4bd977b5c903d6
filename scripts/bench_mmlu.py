"""How long MMLU 5-shot takes through lm-eval on a real-size model, per harness batch size (issue 6).

Builds the model of an architecture card with random weights on the GPU (speed depends on the shape, not the
weights), quantizes it as the config says, and runs our lm-eval wrapper (qpeft_bench/evaluation/harness.py) on
MMLU from a local data root made from the shipped fixtures: every subject's items repeated to `--items` test
questions and padded with filler words so that a 5-shot prompt is about `--prompt-tokens` tokens long (real MMLU
5-shot prompts run to several hundred LLaMA tokens). The embedded tokenizer stands in for the real one (its ids
fit any vocabulary). For each batch size it prints seconds, questions/s and the extrapolated minutes for the
full 14,042 test questions; batch size 1 is lm-eval's own default.

    python scripts/bench_mmlu.py model=llama2_7b quant=nf4 train.device=cuda --batch-sizes 1,8,16,32,64

Arguments: `qpeft-bench` overrides, then options. Writes a JSON summary to --out when given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from qpeft_bench import ASSETS, calibration, models, quant
from qpeft_bench.cli import CONF_DIR, job_config
from qpeft_bench.evaluation import harness
from qpeft_bench.spec import validate

MMLU_QUESTIONS = 14042  # the test split of cais/mmlu (lm-eval's mmlu group)
FILLER = "the following passage describes a standard result that students are expected to recall carefully"


def padded_root(out: Path, tokenizer, items: int, prompt_tokens: int) -> Path:
    """A copy of the MMLU fixtures with `items` test questions per subject and questions padded so that five
    shots plus the question reach about `prompt_tokens` tokens."""
    src = harness.FIXTURES / "cais" / "mmlu"
    per_question = max(prompt_tokens // 6, 8)  # 5 shots + the question, each about this long
    filler_tokens = len(tokenizer(FILLER)["input_ids"])
    reps = max(per_question // max(filler_tokens, 1), 0)
    for subject in sorted(p.name for p in src.iterdir() if p.is_dir()):
        dst = out / "cais" / "mmlu" / subject
        dst.mkdir(parents=True)
        for split in sorted(p.stem for p in (src / subject).glob("*.jsonl")):
            rows = [json.loads(line) for line in (src / subject / f"{split}.jsonl").read_text().splitlines() if line]
            if split == "test":
                rows = [rows[i % len(rows)] for i in range(items)]
            for row in rows:
                row["question"] = " ".join([FILLER] * reps + [row["question"]])
            (dst / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def main(argv: list[str]) -> int:
    overrides = [a for a in argv if "=" in a and not a.startswith("--")]
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", default="1,8,16,32")
    parser.add_argument("--items", type=int, default=8, help="test questions per subject")
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--out", default=None)
    args = parser.parse_args([a for a in argv if a not in overrides])
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        spec = validate(job_config(compose("run", overrides=["mode=plan", *overrides])))
    device = models.resolve_device(spec.train.device)
    arch = spec.model.arch_dict()
    compute = spec.model.dtype if spec.train.compute_dtype == "auto" else spec.train.compute_dtype
    torch.manual_seed(0)
    model = models.random_model(arch, spec.model.dtype, device).eval()
    targets = list(models.find_linears(model, spec.model.linear_names))
    windows = calibration.random_windows(arch["vocab_size"], spec.calib.samples, spec.calib.seq_len, 0)
    quant.quantize_model(spec.quant_name, model, targets, spec.quant, compute, device, windows=windows)
    tokenizer = models.load_tokenizer(str(ASSETS / "tiny_llama"))
    results = {
        "model": spec.model.name,
        "quant": spec.quant_name,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "items_per_subject": args.items,
        "prompt_tokens_target": args.prompt_tokens,
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = padded_root(Path(tmp) / "data", tokenizer, args.items, args.prompt_tokens)
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = harness.run_task_set(
                model,
                tokenizer,
                "mmlu",
                batch_size=bs,
                data_root=root,
                device=device,
                compute_dtype=models.DTYPE[compute],
                progress=False,
            )
            seconds = time.perf_counter() - t0
            questions = out["tasks"]["mmlu"]["samples"]
            row = {
                "batch_size": bs,
                "seconds": seconds,
                "questions": questions,
                "questions_per_s": questions / seconds,
                "full_mmlu_minutes": MMLU_QUESTIONS / (questions / seconds) / 60,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
            }
            results["runs"].append(row)
            print(
                f"batch {bs:>3}: {seconds:7.1f} s for {questions} questions, {row['questions_per_s']:.2f} q/s, "
                f"full MMLU ~{row['full_mmlu_minutes']:.1f} min, peak {row['peak_gib'] or 0:.1f} GiB",
                flush=True,
            )
        shutil.rmtree(root, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
