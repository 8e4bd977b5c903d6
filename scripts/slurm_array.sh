#!/usr/bin/env bash
# Submit a sweep as one SLURM job array: task i runs grid point i (`qpeft-bench ... grid_index=i`), so a killed or
# timed-out task is re-run alone and a re-submitted array skips the points whose record says completed.
#
#   scripts/slurm_array.sh SWEEP [qpeft-bench overrides...]
#   PARALLEL=8 PARTITION=gpu GPUS=1 TIME=24:00:00 MEM=64G SETUP='module load cuda; source .venv/bin/activate' \
#       scripts/slurm_array.sh rank_by_layer model.path=/data/Llama-2-7b-hf
#
# Environment: PARALLEL (tasks at once, default 4), PARTITION, GPUS (per task, default 1), CPUS (default 8), MEM
# (default 32G), TIME (default 24:00:00), SETUP (shell lines run first in each task), SBATCH (the submit command,
# default sbatch), LOGS (default slurm_logs). `qpeft-bench -m sweep=SWEEP mode=list` shows the grid with indices;
# `qpeft-bench-report` summarises the records when the array is done.
set -euo pipefail
sweep=${1:?usage: scripts/slurm_array.sh SWEEP [overrides...]}
shift
# From a checkout, run where the repository is (its conf/ and default output paths); the copy inside an installed
# wheel (`qpeft-bench-array`) runs where the user is.
here=$(dirname "$0")
if [ -f "$here/../pyproject.toml" ]; then cd "$here/.."; fi
bench=${QPEFT_BENCH:-qpeft-bench}
n=$("$bench" -m "sweep=$sweep" mode=list "$@" 2>/dev/null | grep -c $'^[0-9]*\t') || true
if [ "${n:-0}" -lt 1 ]; then
    echo "slurm_array.sh: sweep '$sweep' lists no grid point; run: $bench -m sweep=$sweep mode=list $*" >&2
    exit 1
fi
mkdir -p "${LOGS:-slurm_logs}"
args=$(printf ' %q' "$@")
gres=""
if [ "${GPUS:-1}" -gt 0 ]; then gres="--gres=gpu:${GPUS:-1}"; fi
# shellcheck disable=SC2086
${SBATCH:-sbatch} --parsable --job-name="qpeft-$sweep" --array="0-$((n - 1))%${PARALLEL:-4}" \
    ${PARTITION:+--partition=$PARTITION} $gres --cpus-per-task="${CPUS:-8}" --mem="${MEM:-32G}" \
    --time="${TIME:-24:00:00}" --output="${LOGS:-slurm_logs}/%A_%a.out" \
    --wrap="${SETUP:+$SETUP; }$bench sweep=$sweep$args grid_index=\$SLURM_ARRAY_TASK_ID"
