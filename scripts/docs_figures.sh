#!/usr/bin/env bash
# The report's example in docs/figures/: the smoke sweep (QLoRA and Q-BaRA at r=8, uniform or one layer group's rank
# halved, 20 steps on the embedded tiny model) with two seeds, reported with intervals, paired comparisons and
# figures. About ten minutes on two CPU cores. Usage: scripts/docs_figures.sh [WORK_DIR]   (make docs-figures)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${VENV:-.venv}/bin
work=${1:-$(mktemp -d)}
HF_HUB_OFFLINE=1 "$bin/qpeft-bench" -m sweep=smoke seed=0,1 "output_root=$work/runs"
# trainable parameters on x: on a CPU the memory is the process RSS, which grows over the runs of one sweep process
"$bin/qpeft-bench-report" "$work/runs" --out "$work/tables" --figures --pareto-x params
mkdir -p docs/figures
cp "$work"/figures/*.png docs/figures/
cp "$work"/tables/by_layer_group.md "$work"/tables/significance.md docs/figures/
echo "docs/figures/ updated from $work"
