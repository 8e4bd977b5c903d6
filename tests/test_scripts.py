"""The measurement scripts run on the CPU with the tiny model (their real use is on the GPU)."""

from __future__ import annotations

import importlib.util
import json

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


@pytest.mark.parametrize("flag, active", [([], True), (["--no-hqq-flag"], False)])
def test_bench_reproduces_the_reference_set_up_and_its_silent_checkpointing_loss(tmp_path, flag, active):
    # peft's prepare_model_for_kbit_training turns gradient checkpointing on for an hqq model only if the model
    # says it is hqq-quantized; without the flag the request is dropped silently (the reference's HQQ memory).
    out = tmp_path / "bench.json"
    argv = ["quant=hqq", "train.gradient_checkpointing=true", "train.measure_after=1", "--steps", "2", "--seq", "16",
            "--peft-prepare", *flag, "--json", str(out)]
    assert _script("bench_train_step").main(argv) == 0
    rec = json.loads(out.read_text())
    assert rec["setup"] == "peft.prepare_model_for_kbit_training" and rec["hqq_flag"] is active
    assert rec["stages_bytes"]["checkpointing_active"] is active
