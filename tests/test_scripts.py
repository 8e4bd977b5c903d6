"""The measurement scripts run on the CPU with the tiny model (their real use is on the GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("quant", ["nf4", "hqq"])
def test_compare_plan_real_agrees_on_the_tiny_model(quant, capsys):
    assert _script("compare_plan_real").main([f"quant={quant}", "peft.r=4"]) == 0
    assert "largest relative difference: 0.000%" in capsys.readouterr().out


def test_bench_train_step_reports_time_and_memory(tmp_path):
    out = tmp_path / "bench.json"
    bench = _script("bench_train_step")
    assert bench.main(["quant=nf4", "train.measure_after=1", "--steps", "3", "--seq", "32", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["measured_steps"] == 2 and rec["s_per_step"] > 0 and rec["peak_memory_bytes"] > 0
    assert rec["quant"] == "nf4" and rec["seq"] == 32 and len(rec["first_losses"]) == 3


def test_bench_train_step_shards_with_fsdp(tmp_path):
    """The 70B measurement's path on the CPU: two processes, random layers made and quantized one at a time."""
    out = tmp_path / "fsdp.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            str(ROOT / "scripts" / "bench_train_step.py"),
            "train.device=cpu",
            "train.distributed=fsdp",
            "train.gpus=2",
            "train.batch_size=2",
            "train.measure_after=1",
            "--steps",
            "3",
            "--seq",
            "32",
            "--json",
            str(out),
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["world_size"] == 2 and rec["distributed"] == "fsdp" and rec["measured_steps"] == 2
    assert rec["quant_cfg"]["quant_storage"] == "bfloat16" and rec["speed"]["fused_lora"] is False


@pytest.mark.parametrize("flag, active", [([], True), (["--no-hqq-flag"], False)])
def test_bench_reproduces_the_reference_set_up_and_its_silent_checkpointing_loss(tmp_path, flag, active):
    # peft's prepare_model_for_kbit_training turns gradient checkpointing on for an hqq model only if the model
    # says it is hqq-quantized; without the flag the request is dropped silently (the reference's HQQ memory).
    out = tmp_path / "bench.json"
    argv = [
        "quant=hqq",
        "train.gradient_checkpointing=true",
        "train.measure_after=1",
        "--steps",
        "2",
        "--seq",
        "16",
        "--peft-prepare",
        *flag,
        "--json",
        str(out),
    ]
    assert _script("bench_train_step").main(argv) == 0
    rec = json.loads(out.read_text())
    assert rec["setup"] == "peft.prepare_model_for_kbit_training" and rec["hqq_flag"] is active
    assert rec["stages_bytes"]["checkpointing_active"] is active


def test_side_by_side_benchmark_runs_both_stacks_from_the_same_start(tmp_path):
    """The reference recipe (transformers + peft + bitsandbytes) and ours on the same saved weights, batches and
    initial adapters: both run, the report has the ratios, and the loss trajectories agree within the tolerance."""
    out = tmp_path / "bench.md"
    argv = [
        "--arch",
        "tiny_llama",
        "--device",
        "cpu",
        "--methods",
        "qlora",
        "--r",
        "4",
        "--alpha",
        "8",
        "--batch",
        "2",
        "--seq",
        "16",
        "--steps",
        "3",
        "--model-dir",
        str(tmp_path / "model"),
        "--out",
        str(out),
        "--variant",
        "fast=train.optimizer=adamw train.measure_after=1",
    ]
    bench = _script("bench_vs_reference")
    assert bench.main(argv) == 0
    folder = tmp_path / "bench"
    ref, mine = (json.loads((folder / f"qlora_{side}.json").read_text()) for side in ("reference", "fast"))
    assert ref["side"] == "reference" and ref["checkpointing_active"] and ref["trainable_params"] > 0
    assert mine["adapter_init"].endswith("qlora_init.safetensors")  # started from the reference's adapters
    assert mine["speed"]["fused_lora"] is True and mine["trainable_params"] == ref["trainable_params"]
    assert bench.loss_gap(mine["losses"], ref["losses"]) <= bench.LOSS_TOLERANCE
    [row] = [line for line in out.read_text().splitlines() if line.startswith("| qlora | fast |")]
    assert "failed" not in row and "over tolerance" not in row and row.count("x |") == 2


def test_loftq_benchmark_times_a_whole_model(tmp_path, capsys, monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path))  # the script points it at a fresh folder; restored afterwards

    from qpeft_bench.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        model_dir = compose(config_name="run").model.path
    assert _script("bench_loftq").main(["--model-dir", model_dir, "--rank", "4"]) == 0
    assert "ours, whole model: 28 matrices, r 4, 1 iteration" in capsys.readouterr().out


def test_gptq_reference_benchmark_times_both_on_the_same_inputs_to_the_same_weights(tmp_path):
    """scripts/bench_gptq_reference.py: one block of the tiny model's shapes on the CPU; our sweep and the reference
    restatement must quantize every layer to the same weights, or the times compare different work."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_gptq_reference.py"), "--model", "tiny_llama", "--tokens",
         "2048", "--device", "cpu", "--group-size", "32", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rec = json.loads((tmp_path / "gptq_vs_reference_tiny_llama.json").read_text())
    assert [r["layer"] for r in rec["layers"]] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]  # fmt: skip
    assert rec["max_rel_diff"] < 1e-6  # the same quantized weights up to fp32 rounding order (the script's docstring)
    assert all(r["ours_s"] > 0 and r["reference_s"] > 0 for r in rec["layers"])
    assert rec["block"]["ratio_reference_over_ours"] == pytest.approx(
        rec["block"]["reference_s"] / rec["block"]["ours_s"]
    )
