"""``python -m qpeft_bench.report``: the same as ``qpeft-bench-report``."""

from qpeft_bench.report.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
