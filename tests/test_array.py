"""Grids as job arrays (issue 8, the plain path): `mode=list` numbers the grid, `grid_index=i` runs point i alone,
and scripts/slurm_array.sh submits one array whose task i runs point i (checked with a stand-in sbatch that
records its arguments; the tasks are then run here with SLURM_ARRAY_TASK_ID set, as SLURM would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import CLI, FAST, ROOT

GRID = ["sweep=smoke", "method=qlora", "peft.variant=[],[mlp.r/2],[attn.r/2]", *FAST]


def _list(tmp_path) -> list[list[str]]:
    proc = subprocess.run([*CLI, "-m", *GRID, "mode=list"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line.split("\t") for line in proc.stdout.splitlines()]


def test_list_numbers_the_grid_and_runs_nothing(tmp_path):
    rows = _list(tmp_path)
    assert [r[0] for r in rows] == ["0", "1", "2"]
    assert [r[2] for r in rows] == ["peft.variant=[]", "peft.variant=[mlp.r/2]", "peft.variant=[attn.r/2]"]
    assert len({r[1] for r in rows}) == 3 and not list(tmp_path.rglob("result.json"))


def test_slurm_array_script_submits_one_task_per_point_and_each_task_runs_its_point(tmp_path):
    fake = tmp_path / "sbatch"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_SBATCH_LOG"\necho 4242\n')
    fake.chmod(0o755)
    log = tmp_path / "sbatch.args"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SBATCH": str(fake),
        "FAKE_SBATCH_LOG": str(log),
        "GPUS": "0",
        "PARALLEL": "2",
        "LOGS": str(tmp_path / "logs"),
    }
    proc = subprocess.run(
        [str(ROOT / "scripts" / "slurm_array.sh"), "smoke", *GRID[1:], "output_root=" + str(tmp_path / "runs")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    args = log.read_text().splitlines()
    assert "--array=0-2%2" in args and not any(a.startswith("--gres") for a in args)
    wrap = next(a for a in args if a.startswith("--wrap="))[len("--wrap=") :]
    assert wrap.endswith("grid_index=$SLURM_ARRAY_TASK_ID")
    listed = {int(r[0]): r[1] for r in _list(tmp_path)}
    for task in (2, 0):  # as SLURM would start them, in any order
        done = subprocess.run(
            ["bash", "-c", wrap],
            cwd=ROOT,
            env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        rec = json.loads((tmp_path / "runs" / listed[task] / "result.json").read_text())
        assert rec["status"] == "completed" and rec["run_id"] == listed[task]
    assert len(list((tmp_path / "runs").glob("*/result.json"))) == 2


def test_an_index_outside_the_grid_is_a_clear_error(tmp_path):
    proc = subprocess.run([*CLI, *GRID, "grid_index=7"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "the grid has 3 points (0 .. 2)" in proc.stderr
