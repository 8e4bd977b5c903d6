"""Fixed per-run overhead of a sweep: how much of each run is neither training steps nor evaluation, against the
length of a 500-step run (the target: at most 5% once the sweep's first run has quantized the base).

    python scripts/bench_sweep_overhead.py --model-dir DIR -- model=llama2_7b train=qlora seed=0,1,2 train.max_steps=30

DIR: a saved model (e.g. scripts/bench_reference.py --save-model); the embedded tiny model's tokenizer is copied in
when DIR has none (random weights do not care which tokenizer feeds them; its ids are within LLaMA's vocabulary).
Everything after `--` goes to `qpeft-bench -m` as it is. Each record's train.overhead_s (recipe.fixed_overhead) is
printed with its share of 500 x train.s_per_step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", default=None, help="output_root of the sweep (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--step-s",
        type=float,
        default=None,
        help="s/step of the 500-step run to compare with (default: each run's own); the embedded "
        "data's short sequences make steps shorter than a study's",
    )
    args, overrides = parser.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    model_dir = Path(args.model_dir)
    tiny = ROOT / "qpeft_bench" / "assets" / "tiny_llama"
    for name in TOKENIZER_FILES:
        if not (model_dir / name).exists() and (tiny / name).exists():
            shutil.copy(tiny / name, model_dir / name)
    out = Path(args.out or tempfile.mkdtemp(prefix="sweep_overhead_"))
    cmd = [sys.executable, "-m", "qpeft_bench.cli", "-m", f"model.path={model_dir}", f"output_root={out}", *overrides]
    print("$", " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    rows = []
    for path in sorted(out.glob("*/result.json"), key=lambda p: p.stat().st_mtime):
        rec = json.loads(path.read_text())
        tr = rec.get("train", {})
        if "overhead_s" not in tr:
            print(f"{rec['run_id']}: {rec['status']}, no overhead measured")
            continue
        run500 = 500 * (args.step_s or tr["s_per_step"])
        row = {
            "run_id": rec["run_id"],
            "seed": rec["config"]["seed"],
            "overhead_s": tr["overhead_s"],
            "s_per_step": tr["s_per_step"],
            "share_of_500_steps": tr["overhead_s"] / run500,
            "base_reused": "reused" in rec.get("quant", {}),
            "quantize_s": rec["quant"].get("quantize_time_s"),
            "compile": tr.get("speed", {}).get("compile"),
        }
        rows.append(row)
        print(
            f"{row['run_id']} seed {row['seed']}: overhead {row['overhead_s']:.1f} s = "
            f"{100 * row['share_of_500_steps']:.1f}% of a 500-step run at {run500 / 500:.3f} s/step (this run: "
            f"{tr['s_per_step']:.3f}); base "
            f"{'reused' if row['base_reused'] else 'loaded and quantized'}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"command": cmd, "runs": rows}, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
