"""Sweeps through a real SLURM (issue 8): a tiny grid through `hydra/launcher=slurm` (submitit) and through
scripts/slurm_array.sh with the real sbatch must complete every record; a SIGKILLed array task must show as failed
in sacct and in its record, and re-submitting the array must complete it without redoing the finished point.

Needs the one-node cluster of scripts/slurm_cluster.sh (`sudo scripts/slurm_cluster.sh start`); skipped otherwise.
SLURM_CONF is taken from the environment, else from `scripts/slurm_cluster.sh env`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CLI, FAST, ROOT

GRID = ["sweep=smoke", "method=qlora", "peft.variant=[],[mlp.r/2]", *FAST]
# Small requests, so that both tasks fit on a 2-CPU CI machine at once; no GPU on the localhost node.
LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_task=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=10",
]
ARRAY_ENV = {"GPUS": "0", "CPUS": "1", "MEM": "2G", "TIME": "10", "PARALLEL": "2"}
WAIT_S = 240


def _slurm_env() -> dict[str, str] | str:
    """The environment for SLURM's commands, or why the tests cannot run."""
    if shutil.which("sinfo") is None:
        return "sinfo is not on PATH (SLURM not installed): sudo scripts/slurm_cluster.sh start"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if "SLURM_CONF" not in env:
        export = subprocess.run([str(ROOT / "scripts" / "slurm_cluster.sh"), "env"], capture_output=True, text=True)
        conf = export.stdout.strip().partition("SLURM_CONF=")[2]
        if conf and Path(conf).exists():
            env["SLURM_CONF"] = conf
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=30)
    if state.returncode != 0 or not {"idle", "mix", "alloc"} & set(state.stdout.split()):
        return "no SLURM node is up (sudo scripts/slurm_cluster.sh start): " + (state.stderr or state.stdout).strip()
    return env


ENV = _slurm_env()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(isinstance(ENV, str), reason=str(ENV))]


def _grid(tmp_path, grid) -> dict[int, str]:
    """Grid index -> run id, as `mode=list` numbers them."""
    proc = subprocess.run([*CLI, "-m", *grid, "mode=list"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {int(line.split("\t")[0]): line.split("\t")[1] for line in proc.stdout.splitlines()}


def _status(runs: Path, run_id: str) -> str | None:
    path = runs / run_id / "result.json"
    return json.loads(path.read_text())["status"] if path.exists() else None


def _submit_array(tmp_path, grid, runs: Path) -> str:
    proc = subprocess.run(
        [str(ROOT / "scripts" / "slurm_array.sh"), "smoke", *grid[1:], f"output_root={runs}"],
        env={**ENV, **ARRAY_ENV, "LOGS": str(tmp_path / "logs")},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def _wait_until(predicate, what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.2)


def _queued(job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i"], env=ENV, capture_output=True, text=True).stdout
    return bool(out.strip())


def _states(job: str, n: int) -> dict[int, str]:
    """Array task -> final SLURM state from accounting, once slurmdbd has all n tasks."""
    got: dict[int, str] = {}

    def all_accounted() -> bool:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job, "-o", "JobID,State"],
            env=ENV,
            capture_output=True,
            text=True,
        ).stdout
        got.clear()
        for line in out.splitlines():
            task, _, state = line.partition("|")  # state: e.g. "CANCELLED by 0" for scancel
            if "_" in task and task.rpartition("_")[2].isdigit():
                got[int(task.rpartition("_")[2])] = state.split()[0]
        return len(got) == n and not {"PENDING", "RUNNING", "COMPLETING"} & set(got.values())

    _wait_until(all_accounted, f"sacct to account the {n} tasks of job {job}", timeout=60)
    return got


def _logs(tmp_path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((tmp_path / "logs").glob("*.out")))


def test_submitit_launcher_runs_the_grid_on_slurm(tmp_path):
    runs = tmp_path / "runs"
    ids = _grid(tmp_path, GRID)
    proc = subprocess.run(
        [*CLI, "-m", *GRID, *LAUNCHER, f"output_root={runs}"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {i: _status(runs, rid) for i, rid in ids.items()} == {i: "completed" for i in ids}
    # submitit really went through sbatch: it keeps one folder per SLURM job under the sweep directory
    assert list((runs / ".submitit").iterdir())


def test_array_script_runs_the_grid_with_the_real_sbatch(tmp_path):
    runs = tmp_path / "runs"
    ids = _grid(tmp_path, GRID)
    job = _submit_array(tmp_path, GRID, runs)
    assert job.isdigit(), job
    _wait_until(lambda: not _queued(job), f"array job {job} to leave the queue")
    assert _states(job, len(ids)) == {i: "COMPLETED" for i in ids}, _logs(tmp_path)
    assert {i: _status(runs, rid) for i, rid in ids.items()} == {i: "completed" for i in ids}, _logs(tmp_path)


def test_a_killed_array_task_is_reported_and_a_resubmission_completes_only_it(tmp_path):
    # the sweep's own 20 steps, so that the run lasts long enough to be killed mid-way
    grid = [a for a in GRID if not a.startswith("train.max_steps=")]
    runs = tmp_path / "runs"
    ids = _grid(tmp_path, grid)
    job = _submit_array(tmp_path, grid, runs)
    victim = max(ids)
    # Kill it once its run has started (its record says running), as a preemption or an OOM killer would.
    _wait_until(lambda: _status(runs, ids[victim]) == "running", f"task {victim} to start its run")
    subprocess.run(["scancel", "--signal=KILL", f"{job}_{victim}"], env=ENV, check=True)
    _wait_until(lambda: not _queued(job), f"array job {job} to leave the queue")
    states = _states(job, len(ids))
    # scancel --signal=KILL gives CANCELLED; a task killed from inside (OOM killer, kill -9) gives FAILED
    assert states[victim] in ("FAILED", "CANCELLED"), states
    assert all(s == "COMPLETED" for i, s in states.items() if i != victim), (states, _logs(tmp_path))
    # Not completed, so a re-launch redoes it. SIGKILL leaves the record "running"; slurmstepd's clean-up of the
    # step's other processes sends SIGTERM first, which the run catches and records as an interruption.
    record = json.loads((runs / ids[victim] / "result.json").read_text())
    assert record["status"] in ("running", "failed"), record["status"]
    if record["status"] == "failed":
        assert record["error"]["type"] == "Interrupted", record["error"]
    finished = {i: (runs / rid / "result.json").read_bytes() for i, rid in ids.items() if i != victim}

    again = _submit_array(tmp_path, grid, runs)
    _wait_until(lambda: not _queued(again), f"re-submitted array job {again} to leave the queue")
    assert set(_states(again, len(ids)).values()) == {"COMPLETED"}, _logs(tmp_path)
    assert _status(runs, ids[victim]) == "completed"
    # the points that had completed were skipped, not run again: their records are byte for byte the same
    assert {i: (runs / ids[i] / "result.json").read_bytes() for i in finished} == finished


def test_a_data_parallel_run_spans_two_slurm_tasks(tmp_path):
    """hydra/launcher=slurm_ddp: SLURM starts two tasks for the grid point, distributed.slurm_world() turns their
    SLURM variables into torchrun's, and the two processes train one run together (gloo on the CPU node)."""
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [
            *CLI,
            "-m",
            *FAST,
            "seed=0",
            "train.distributed=ddp",
            "train.gpus=2",
            "train.device=cpu",
            "hydra/launcher=slurm_ddp",
            *LAUNCHER[1:],
            f"output_root={runs}",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = list(runs.glob("*/result.json"))
    rec = json.loads(path.read_text())
    assert rec["status"] == "completed"
    assert rec["train"]["distributed"]["world_size"] == 2 and rec["config"]["train"]["gpus"] == 2
