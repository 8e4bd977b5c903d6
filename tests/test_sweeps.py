"""Named sweeps (issue 5): every sweep composes, every grid point plans on the cards it names, the sweep files'
headers state the true run count and plan-mode time, the grids vary what the studies varied, and the by-layer-group
report pivots the runs of a sweep."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from conftest import CLI, ROOT

from qpeft_bench import grid, report
from qpeft_bench.cli import CONF_DIR

spec_ = importlib.util.spec_from_file_location("sweep_plan", ROOT / "scripts" / "sweep_plan.py")
sweep_plan = importlib.util.module_from_spec(spec_)
spec_.loader.exec_module(sweep_plan)

SWEEPS = sweep_plan.names()
STUDY_SWEEPS = {
    "rank_by_layer",
    "lambda_by_layer",
    "hira_by_layer",
    "qalora_group_size",
    "rank_alpha",
    "thesis_qdora",
    "thesis_qia3",
    "thesis_hqq",
    "smoothquant_qlora",
    "qeft_k",
    "smoke",
}


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """{sweep: (rows, failed, seconds, output dir)}: every grid point of every sweep planned, as mode=plan does."""
    out = {}
    for name in SWEEPS:
        root = tmp_path_factory.mktemp(name)
        out[name] = (*sweep_plan.plan(name, str(root)), root)
    return out


def test_the_studies_sweeps_exist():
    assert STUDY_SWEEPS <= set(SWEEPS)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_grid_point_plans(planned, name):
    rows, failed, seconds, root = planned[name]
    assert failed == 0, [r for r in rows if r["status"] != "planned"]
    records = [json.loads(p.read_text()) for p in root.glob("*/result.json")]
    assert len(records) == len(rows) == len({r["run_id"] for r in records})  # distinct configs, one record each
    for rec in records:
        assert rec["status"] == "planned" and rec["accounting"]["trainable_params"] > 0
        assert rec["estimate"]["peak_memory_bytes"] > rec["accounting"]["quantized_model_bytes"]
    assert seconds == pytest.approx(sum(r["estimate"]["run_seconds"] for r in records))


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_header_is_current(planned, name):
    rows, _, seconds, _ = planned[name]
    text = (ROOT / "conf" / "sweep" / f"{name}.yaml").read_text()
    runs, time = sweep_plan.header(name, rows, seconds)
    assert runs in text and time in text, f"conf/sweep/{name}.yaml is stale: run python scripts/sweep_plan.py --write"
    assert re.search(rf"^# Command: +qpeft-bench -m sweep={name}\b", text, re.M)
    assert text.startswith("# @package _global_\n# " + name + ":"), "the header opens with what the sweep reproduces"


def _points(name: str) -> list[dict[str, str]]:
    return [dict(line.partition("=")[::2] for line in p) for p in grid.expand(CONF_DIR, [f"sweep={name}"])]


def test_rank_by_layer_crosses_methods_groups_reductions_and_seeds(planned):
    points = _points("rank_by_layer")
    assert len(points) == 4 * 9 * 3
    assert {p["method"] for p in points} == {"qlora", "irqlora", "qalora", "qbara"}
    assert {p["seed"] for p in points} == {"0", "1", "2"}
    edits = {p["peft.variant"] for p in points}
    assert (
        "[]" in edits
        and {f"[{g}.r/{f}]" for g in ("attn", "mlp", "first_half", "second_half") for f in (2, 4)} <= edits
    )
    # the resolved per-module ranks of one point: attn at 64 / 4, the MLP at the baseline
    rec = next(
        json.loads(p.read_text())
        for p in planned["rank_by_layer"][3].glob("*/result.json")
        if json.loads(p.read_text())["config"]["peft"]["variant"] == ["attn.r/4"]
    )
    layers = rec["peft_layers"]
    assert layers["model.layers.0.self_attn.q_proj"]["r"] == 16 and layers["model.layers.31.mlp.up_proj"]["r"] == 64


def test_key_variable_sweeps_vary_lambda_and_hira_per_group():
    lam = _points("lambda_by_layer")
    assert {p["peft.r"] for p in lam} == {"16", "64"} and len(lam) == 2 * 13 * 3
    assert "[mlp.balance\\:8]" in {p["peft.variant"] for p in lam}
    hira = _points("hira_by_layer")
    assert len(hira) == 5 * 3 and "[attn.lambda1\\:8,attn.lambda2\\:8]" in {p["peft.variant"] for p in hira}


def test_thesis_sweeps_cross_the_five_configurations(compose):
    points = _points("rank_alpha")
    assert {p["peft"] for p in points} == {"lora", "rslora", "loftq", "loftq_rslora"}
    assert len({p["lora_config"] for p in points}) == 5
    cfg = compose(["lora_config=r256_a128", "model=llama2_7b", "peft=rslora"])
    assert (cfg["peft"]["r"], cfg["peft"]["alpha"], cfg["peft"]["use_rslora"]) == (256, 128, True)
    assert {p["quant.nbits"] for p in _points("thesis_hqq")} == {"4", "2"}
    assert {p["quant.k"] for p in _points("qeft_k")} == {"8", "16", "32", "64", "128"}


def test_qalora_ties_its_group_size_to_the_quantizers(compose):
    for gs in (32, 64, 128):
        cfg = compose(["method=qalora", f"quant.group_size={gs}", "model=llama2_7b", "mode=plan"])
        assert cfg["peft"]["group_size"] == cfg["quant"]["group_size"] == gs


def test_plan_of_a_sweep_prints_the_grid_with_memory_and_time(tmp_path):
    import subprocess

    proc = subprocess.run([*CLI, "-m", "sweep=smoke", "mode=plan"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("#"))
    for column in ("method", "peft.variant", "trainable", "est. peak GiB", "est. time", "status"):
        assert column in header
    assert sum(line.rstrip().endswith(" planned") for line in lines) == 10
    assert re.search(r"^10 runs planned; estimated training time .* largest estimated peak", proc.stdout, re.M)
    assert len(list(tmp_path.glob("runs/*/result.json"))) == 10


def test_layer_group_labels():
    assert report.layer_group_label([], {"mlp": {"r": None}}) == "uniform"
    assert report.layer_group_label(["attn.r/2"], None) == "attn.r/2"
    assert report.layer_group_label(None, {"mlp": {"r": 32, "alpha": None}, "attn": {"r": 8}}) == "attn.r:8 mlp.r:32"


def _report(tmp_path, *args):
    import subprocess
    from pathlib import Path

    exe = str(Path(CLI[0]).parent / "qpeft-bench-report")
    return subprocess.run(
        [exe, "runs", "--out", "tables", *args], cwd=tmp_path, capture_output=True, text=True, check=True
    )


def test_a_small_rank_by_layer_sweep_runs_and_the_report_pivots_it_by_layer_group(tmp_path):
    """The smoke sweep cut to 2 settings x 2 seeds with short runs: every run completes, and the report has one
    row for the method and one column per layer-group setting, averaged over the two seeds."""
    import subprocess

    from conftest import FAST

    args = [*CLI, "-m", "sweep=smoke", "method=qlora", "peft.variant=[],[mlp.r/2]", "seed=0,1", *FAST]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep finished: 4 runs: 4 completed" in proc.stdout + proc.stderr
    out = _report(tmp_path).stdout
    table = out[out.index("## ppl_after by layer group") :]
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")][-2:] == ["uniform", "mlp.r/2"]
    row = next(line for line in table.splitlines() if line.startswith("| tiny_llama"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "lora" and cells[4] == "8"
    # FAST's eval.max_batches=2 cuts the held-out split: the cells say so (†, issue 19)
    # each cell has its bootstrap interval from the runs' per-item results, and mlp.r/2 its difference to uniform,
    # which is shown but never tested: both sides come from the cut split (issue 21)
    number = r"\d+\.\d{3}"
    assert re.fullmatch(rf"{number} ± {number} \(2\) \[{number}, {number}\]†", cells[-2]), cells
    assert re.fullmatch(rf"{number} ± {number} \(2\) \[{number}, {number}\]; Δ [+-]{number} \[.*\]†", cells[-1])
    assert "† not the full benchmark" in table and "eval.max_batches=2 of" in table
    assert "percentile bootstrap" in table and "not tested" in table
    significance = out[out.index("## Paired comparisons against the baselines") :]
    assert "ppl_after (mlp.r/2)" in significance and "not tested (limited evaluation †)" in significance
    # the pivot agrees with the records: the uniform cell is the mean of its two runs
    uniform = [
        json.loads(p.read_text())["eval"]["after"]["ppl_heldout"]
        for p in tmp_path.glob("runs/*/result.json")
        if json.loads(p.read_text())["config"]["peft"]["variant"] == []
    ]
    assert len(uniform) == 2 and cells[-2].startswith(f"{sum(uniform) / 2:.3f}")
    assert (tmp_path / "tables" / "by_layer_group.csv").is_file()


@pytest.mark.slow
def test_make_sweep_smoke_finishes_on_the_cpu_within_ten_minutes(tmp_path):
    """The issue's bound: `make sweep SWEEP=smoke` end to end in at most 10 minutes on a CPU, then the report."""
    import subprocess
    import time

    start = time.monotonic()
    proc = subprocess.run([*CLI, "-m", "sweep=smoke"], cwd=tmp_path, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep finished: 10 runs: 10 completed" in proc.stdout + proc.stderr
    assert elapsed < 600, f"smoke sweep took {elapsed:.0f} s"
    out = _report(tmp_path).stdout
    assert "## ppl_after by layer group" in out and "first_half.r/2" in out
