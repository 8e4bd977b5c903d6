"""Preemption (issue 8): a run killed with SIGKILL mid-training resumes from its last checkpoint on re-launch and
ends with exactly the losses of an uninterrupted run (same trainable tensors, optimizer, scheduler, random
generators and data position); checkpoints never change a run's identity and are removed once it completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import CLI, FAST

from qpeft_bench import results

RUN = [*FAST, "train.max_steps=10", "train.checkpoint_every=2", "train.save_adapter=false"]


def _record(root):
    (path,) = root.glob("*/result.json")
    return json.loads(path.read_text())


def test_checkpoints_do_not_change_the_run_id(compose):
    assert results.run_id(compose(FAST)) == results.run_id(compose([*FAST, "train.checkpoint_every=5"]))


def test_a_killed_run_resumes_and_matches_the_uninterrupted_one(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    whole = subprocess.run([*CLI, *RUN, "output_root=whole"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = _record(tmp_path / "whole")
    assert not list((tmp_path / "whole").glob("*/checkpoint"))  # removed once complete

    proc = subprocess.Popen(
        [*CLI, *RUN, "output_root=killed"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    step = 0
    while time.monotonic() < deadline and proc.poll() is None:
        pointers = list((tmp_path / "killed").glob("*/checkpoint/LATEST"))
        if pointers:
            try:
                step = json.loads(pointers[0].read_text())["step"]
            except ValueError:
                step = 0
            if step >= 4:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait()
    if step < 4:
        pytest.fail("the run finished or stalled before its step-4 checkpoint; nothing was killed")
    assert _record(tmp_path / "killed")["status"] == "running"  # what a killed run leaves

    again = subprocess.run([*CLI, *RUN, "output_root=killed"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = _record(tmp_path / "killed")
    assert resumed["status"] == "completed" and resumed["train"]["resumed_from_step"] >= 4
    assert resumed["train"]["losses"] == pytest.approx(reference["train"]["losses"], rel=1e-6)
    assert resumed["eval"]["after"]["ppl_heldout"] == pytest.approx(reference["eval"]["after"]["ppl_heldout"], rel=1e-6)
    assert not list((tmp_path / "killed").glob("*/checkpoint"))
