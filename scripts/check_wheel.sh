#!/usr/bin/env bash
# The wheel as a user gets it: build it, install it into a fresh venv (the CPU torch of constraints.txt first, as
# make setup does) and run every entry point from a directory outside the checkout: --help, the default run, the
# smoke sweep in plan mode, the report on the records, and the SLURM array submitter with a stand-in sbatch.
#   scripts/check_wheel.sh            (make check-wheel; part of .ci/run)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { printf 'check-wheel: %s\n' "$*"; }

step "building the wheel"
rm -rf "$root/build"  # setuptools' scratch copy: a stale one would ship files deleted since
"$py" -m pip wheel -q --no-deps --no-build-isolation "$root" -w "$work/dist"
rm -rf "$root/build"
step "installing $(basename "$work"/dist/*.whl) into a fresh venv"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q -c "$root/constraints.txt" torch
"$work/venv/bin/pip" install -q -c "$root/constraints.txt" "$work"/dist/*.whl

cd "$work"  # nowhere near the checkout: only the installed package can be found
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
bin=$work/venv/bin
step "qpeft-bench --help"
"$bin/qpeft-bench" --help | grep -q "quant" || { echo "check-wheel: --help lists no config groups" >&2; exit 1; }
step "the default run"
"$bin/qpeft-bench" output_root="$work/runs"
grep -q '"status": "completed"' "$work"/runs/*/result.json || { echo "check-wheel: the default run did not complete" >&2; exit 1; }
step "-m sweep=smoke mode=plan"
"$bin/qpeft-bench" -m sweep=smoke mode=plan output_root="$work/plan"
step "qpeft-bench-report"
"$bin/qpeft-bench-report" "$work/runs" --out "$work/tables" >/dev/null
ls "$work/tables" | grep -q . || { echo "check-wheel: the report wrote no table" >&2; exit 1; }
step "qpeft-bench-array (stand-in sbatch)"
printf '#!/usr/bin/env bash\necho 4242\n' > "$work/sbatch" && chmod +x "$work/sbatch"
PATH="$bin:$PATH" SBATCH="$work/sbatch" GPUS=0 LOGS="$work/logs" "$bin/qpeft-bench-array" smoke \
    output_root="$work/array" | grep -qx 4242
step "qpeft-bench-data wikitext"
printf ' = Title = \n\n Some text , with words .\n' > "$work/wiki.test.raw"
"$bin/qpeft-bench-data" wikitext "$work/wiki.test.raw" "$work/evaldata" >/dev/null
test -s "$work/evaldata/wikitext/wikitext-2-raw-v1/test.jsonl" || { echo "check-wheel: no converted file" >&2; exit 1; }
step "all passed"
