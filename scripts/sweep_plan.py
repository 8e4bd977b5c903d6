"""Plan every named sweep and keep the `# Runs:` and `# Time:` lines of conf/sweep/*.yaml true.

    python scripts/sweep_plan.py              # print each sweep's run count and estimated GPU time
    python scripts/sweep_plan.py --write      # rewrite those two header lines in each sweep file

Each sweep is expanded and planned exactly as `qpeft-bench -m sweep=<name> mode=plan` does (qpeft_bench/grid.py),
into a temporary directory. tests/test_sweeps.py fails when a header is stale or any grid point fails to plan.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = ROOT / "conf" / "sweep"
RUNS = re.compile(r"^# Runs: .*$", re.M)
TIME = re.compile(r"^# Time: .*$", re.M)


def names() -> list[str]:
    return sorted(p.stem for p in SWEEPS.glob("*.yaml"))


def plan(name: str, out_dir: str) -> tuple[list[dict], int, float]:
    """(rows, failed points, estimated seconds) of `qpeft-bench -m sweep=<name> mode=plan`."""
    from qpeft_bench import grid
    from qpeft_bench.cli import CONF_DIR, job_config

    return grid.plan(CONF_DIR, [f"sweep={name}", "mode=plan", f"output_root={out_dir}"], job_config)


def axes(name: str) -> str:
    """'4 method x 9 peft.variant x 3 seed': the sizes of the axes that vary."""
    from qpeft_bench import grid
    from qpeft_bench.cli import CONF_DIR

    points = grid.expand(CONF_DIR, [f"sweep={name}"])
    counts = {}
    for key in grid.varying(points):
        counts[key] = len({line for p in points for line in p if line.startswith(key + "=")})
    return " x ".join(f"{n} {k}" for k, n in counts.items()) or "one point"


def header(name: str, rows: list[dict], seconds: float) -> tuple[str, str]:
    from qpeft_bench import grid

    peaks = [float(r["est. peak GiB"]) for r in rows if r.get("est. peak GiB")]
    runs = f"# Runs:     {len(rows)} ({axes(name)})"
    time = (
        f"# Time:     {grid.duration(seconds)} of training on one H100-class GPU in all, largest peak "
        f"{max(peaks, default=0):.1f} GiB (plan mode's estimate; qpeft_bench/estimate.py)"
    )
    return runs, time


def with_header(text: str, runs: str, time: str) -> str:
    if not RUNS.search(text) or not TIME.search(text):
        raise ValueError("a sweep file must have a '# Runs:' and a '# Time:' line")
    return TIME.sub(lambda _: time, RUNS.sub(lambda _: runs, text, count=1), count=1)


def main(argv: list[str]) -> int:
    write = "--write" in argv
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names():
            rows, failed, seconds = plan(name, str(Path(tmp) / name))
            runs, time = header(name, rows, seconds)
            print(f"{name}:\n  {runs[2:]}\n  {time[2:]}" + (f"\n  {failed} point(s) FAILED" if failed else ""))
            bad += failed
            if write:
                path = SWEEPS / f"{name}.yaml"
                path.write_text(with_header(path.read_text(), runs, time))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
