"""The grid of a sweep, expanded and composed without Hydra's launcher.

`qpeft-bench -m ... mode=plan` prints a whole sweep's accounting. Hydra's basic launcher composes every job twice
and sets up a job directory and logging for each (about 0.7 s per job measured on the 2-core dev machines), which
made a 120-run plan take minutes. Plan mode needs neither, so it expands the grid exactly as Hydra's
BasicSweeper does (the sweep file's `hydra.sweeper.params`, then the command line, which wins for a key it repeats;
the Cartesian product in that key order) and composes each point once through Hydra's compose API. The job order
and the resolved configs, hence the run ids, are the ones `-m` would launch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

CONFIG_NAME = "run"
log = logging.getLogger("qpeft_bench")


def expand(conf_dir: str, overrides: list[str]) -> list[list[str]]:
    """Each grid point's full override list, in launch order."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    with initialize_config_dir(conf_dir, version_base="1.3"):
        # the sweep file's params live in the hydra node: compose once without the command line's sweeps
        params = compose(CONFIG_NAME, overrides=fixed, return_hydra_config=True).hydra.sweeper.params or {}
    lines = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    (batch,) = BasicSweeper.split_arguments(parser.parse_overrides(lines), None)
    return batch


def compose_points(conf_dir: str, points: list[list[str]]):
    """Yield (overrides, composed DictConfig) per grid point; a point that fails to compose yields its exception."""
    with initialize_config_dir(conf_dir, version_base="1.3"):
        for point in points:
            try:
                yield point, compose(CONFIG_NAME, overrides=point)
            except Exception as err:
                yield point, err


def plan(conf_dir: str, overrides: list[str], job_config) -> tuple[list[dict[str, str]], int, float]:
    """Plan every grid point into its run directory, as `-m` would; returns (one printable row per point, the
    number of points that failed, the summed estimated seconds). `job_config`: DictConfig -> the plain resolved
    config (cli.job_config)."""
    from qpeft_bench import recipe, results

    points = expand(conf_dir, overrides)
    keys = varying(points)
    rows, failed, seconds = [], 0, 0.0
    for i, (point, cfg) in enumerate(compose_points(conf_dir, points)):
        values = dict(line.partition("=")[::2] for line in point)
        row = {"#": str(i), **{k: values.get(k, "").replace("\\", "") for k in keys}}  # unescape Hydra's ':'
        if isinstance(cfg, Exception):
            log.error("grid point %d (%s): %s", i, " ".join(point), str(cfg).splitlines()[0])
            status, record = "failed", {}
        else:
            config = job_config(cfg)
            run_dir = Path(config["output_root"]) / results.run_id(config)
            status = recipe.run(config, run_dir, progress=False, summary=False)
            record = (results.read_record(run_dir) or {}) if status == "planned" else {}
        failed += status == "failed"
        seconds += record.get("estimate", {}).get("run_seconds") or 0.0
        rows.append({**row, **plan_row(record), "status": status})
    return rows, failed, seconds


def varying(points: list[list[str]]) -> list[str]:
    """The override keys whose value differs across the grid (the columns worth printing)."""
    keys: dict[str, set[str]] = {}
    for point in points:
        for line in point:
            key, _, value = line.partition("=")
            keys.setdefault(key, set()).add(value)
    return [k for k, values in keys.items() if len(values) > 1]


# ---------------------------------------------------------------------------------------------------------------
# The planned grid as one table
# ---------------------------------------------------------------------------------------------------------------

GIB = 2**30


def plan_row(record: dict) -> dict[str, str]:
    """The printed columns of one planned run (empty cells for a point that did not plan)."""
    acc, est = record.get("accounting", {}), record.get("estimate", {})

    def cell(value, spec: str, scale: float = 1) -> str:
        return "" if value is None else format(value / scale, spec)

    return {
        "run_id": record.get("run_id", ""),
        "trainable": cell(acc.get("trainable_params"), ",.0f"),
        "%": cell(acc.get("trainable_pct"), ".3f"),
        "quantized GiB": cell(acc.get("quantized_model_bytes"), ".3f", GIB),
        "est. peak GiB": cell(est.get("peak_memory_bytes"), ".2f", GIB),
        "est. time": "" if est.get("run_seconds") is None else duration(est["run_seconds"]),
    }


def render(rows: list[dict[str, str]]) -> str:
    """Rows of equal keys as an aligned plain-text table (numbers right-aligned)."""
    if not rows:
        return "(empty grid)"
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}

    def line(cells: dict[str, str]) -> str:
        return "  ".join(c.rjust(widths[k]) if _numeric(c) else c.ljust(widths[k]) for k, c in cells.items()).rstrip()

    return "\n".join([line({k: k for k in keys}), "  ".join("-" * widths[k] for k in keys), *map(line, rows)])


def _numeric(text: str) -> bool:
    return text.replace(",", "").replace(".", "", 1).isdigit()


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def totals(rows: list[dict[str, str]], failed: int, seconds: float) -> str:
    """One line under the grid: run count, summed estimated time (`seconds`), the largest estimated peak."""
    peaks = [float(r["est. peak GiB"]) for r in rows if r.get("est. peak GiB")]
    text = f"{len(rows)} runs planned"
    if peaks:
        text += (
            f"; estimated training time {duration(seconds)} on one H100-class GPU (qpeft_bench/estimate.py); "
            f"largest estimated peak {max(peaks):.2f} GiB"
        )
    if failed:
        text += f"; {failed} grid point(s) FAILED to plan (errors above)"
    return text
