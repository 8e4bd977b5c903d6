"""Data-parallel fine-tuning (issue 11): two processes under torchrun (gloo on the CPU) follow the loss trajectory
of one process with the same global batch; one record and one adapter per job; clear errors for impossible launches;
plan mode's per-GPU memory for DDP and FSDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST

from qpeft_bench import distributed, recipe
from qpeft_bench.config import ConfigError, validate

# fp32 adapters and no dropout: then the only difference between the two jobs is where the gradients are summed
EXACT = [*FAST, "train.batch_size=4", "train.device=cpu", "peft.adapter_dtype=float32", "peft.dropout=0"]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in root.glob("*/result.json")]


def test_two_processes_follow_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "qpeft_bench.cli", *EXACT, "train.grad_accum=2", "output_root=one"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([TORCHRUN, "--nproc-per-node", "2", "-m", "qpeft_bench.cli", *EXACT, "train.grad_accum=1",
                          "train.distributed=ddp", "train.gpus=2", "output_root=two"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    (a,), (b,) = _records(tmp_path / "one"), _records(tmp_path / "two")  # one record per job, not per process
    assert a["status"] == b["status"] == "completed"
    assert b["train"]["distributed"] == {"kind": "ddp", "world_size": 2, "global_batch": 8}
    assert len(a["train"]["losses"]) == len(b["train"]["losses"]) == 4
    assert b["train"]["losses"] == pytest.approx(a["train"]["losses"], rel=1e-5)
    assert b["eval"]["after"]["ppl_heldout"] == pytest.approx(a["eval"]["after"]["ppl_heldout"], rel=1e-5)
    assert a["run_id"] != b["run_id"]  # train.gpus is part of the run's identity
    (adapter,) = (tmp_path / "two").glob("*/adapter")
    assert (adapter / "adapter_config.json").is_file()


def test_ddp_without_torchrun_is_a_clear_error_and_writes_nothing(compose, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = compose([*FAST, "train.distributed=ddp", "train.gpus=2", "train.device=cpu"])
    assert recipe.run(config, tmp_path, progress=False) == "failed"
    assert "launch with `torchrun --nproc-per-node N" in caplog.text
    assert not list(tmp_path.iterdir())


def test_a_process_count_other_than_train_gpus_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="train.gpus=4 but torchrun started 2 process"):
        distributed.setup("ddp", "cpu", gpus=4)


@pytest.mark.parametrize("overrides, message", [
    (["train.gpus=2"], "train.gpus=2 needs train.distributed=ddp"),
    (["train.distributed=fsdp", "train.gpus=2"], "fsdp is not implemented for training yet"),
    (["train.gpus=0", "train.distributed=ddp"], "train.gpus=0 must be > 0"),
])
def test_impossible_distributed_settings(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


def test_plan_mode_estimates_memory_per_gpu(compose):
    def estimate(*extra):
        spec = validate(compose(["mode=plan", "model=llama2_70b", "train=qlora", "peft.r=64", *extra]))
        return recipe.plan_estimate(spec, recipe.plan_accounting(spec))

    one, ddp = estimate(), estimate("train.distributed=ddp", "train.gpus=2")
    fsdp2, fsdp4 = (estimate("train.distributed=fsdp", f"train.gpus={n}") for n in (2, 4))
    acc = recipe.plan_accounting(validate(compose(["mode=plan", "model=llama2_70b", "peft.r=64"])))
    adapter_grads = acc["trainable_params"] * 2  # bf16 gradients: DDP keeps a bucket copy of them
    assert ddp["peak_memory_bytes"] - one["peak_memory_bytes"] == adapter_grads
    assert one["peak_memory_bytes"] > fsdp2["peak_memory_bytes"] > fsdp4["peak_memory_bytes"]
    # sharding divides weights, adapters, their gradients and AdamW's two fp32 states: from 2 to 4 GPUs the per-GPU
    # need drops by a quarter of them (the fp32 norms of train=qlora are a rounding error next to these)
    sharded = acc["quantized_model_bytes"] + acc["trainable_params"] * (2 + 2 + 8)
    drop = fsdp2["peak_memory_bytes"] - fsdp4["peak_memory_bytes"]
    assert drop == pytest.approx(sharded / 4, rel=0.01)
    assert fsdp2["gpus"] == 2 and fsdp2["distributed"] == "fsdp"


def test_slurm_task_variables_become_torchrun_ones(monkeypatch):
    from qpeft_bench import distributed

    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_STEP_NODELIST": "gpu07,gpu08"}
    got = distributed.slurm_world(env)
    assert {k: got[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} == {"RANK": "3", "WORLD_SIZE": "4",
                                                                         "LOCAL_RANK": "1"}
    assert got["MASTER_ADDR"] == "gpu07" and 20000 <= int(got["MASTER_PORT"]) < 40000
    # a batch script's own process (SLURM_NTASKS > 1, but no srun step of several tasks) stays a single process
    for key in ("WORLD_SIZE", "RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert distributed.launched() is distributed.SINGLE
