"""Shared fixtures: composing configs the way the CLI does, without starting a Hydra app."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # see qpeft_bench/cli.py: shared CPUs otherwise crawl

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).parent / "reference"
CLI = [sys.executable, "-m", "qpeft_bench.cli"]

# Small, fast settings for runs of the tiny model inside tests.
FAST = ["train.max_steps=4", "train.measure_after=1", "data.max_examples=120", "eval.max_batches=2"]


@pytest.fixture(scope="session")
def compose():
    """compose(overrides) -> the resolved job config (dict) exactly as `qpeft-bench` would run it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from qpeft_bench.cli import CONF_DIR, job_config

    def _compose(overrides: list[str] = (), return_hydra: bool = False):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose(config_name="run", overrides=list(overrides), return_hydra_config=return_hydra)
        return cfg if return_hydra else job_config(cfg)

    return _compose


@pytest.fixture
def qpeft_cli(monkeypatch, capsys, caplog):
    """`qpeft-bench ARGS` in this process: the real entry point (Hydra, the recipe, the exit code) without paying
    for a new interpreter per call. Returns (exit code, everything printed and logged). Hydra is told to leave
    logging alone: its dictConfig would close pytest's capture handlers."""
    from hydra.core.global_hydra import GlobalHydra

    from qpeft_bench import cli

    caplog.set_level("INFO", logger="qpeft_bench")

    def call(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["qpeft-bench", *args, "hydra/job_logging=none", "hydra/hydra_logging=none"])
        caplog.clear()
        code = 0
        try:
            cli.main()
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
        finally:
            GlobalHydra.instance().clear()
        captured = capsys.readouterr()
        return code, captured.out + captured.err + caplog.text

    return call


def measured_accounting(spec, samples: int = 8, seq_len: int = 64) -> dict:
    """The accounting of `spec`'s model really loaded, quantized (calibrated on random windows) and adapted on the
    CPU: what plan mode's accounting must equal."""
    from qpeft_bench import accounting, adapters, calibration, models, plan, quant

    model = models.load_model(spec.model.path, spec.model.dtype, "cpu")
    targets = list(models.find_linears(model, spec.model.linear_names))
    real = accounting.base_sizes(model)
    windows = calibration.random_windows(model.config.vocab_size, samples, seq_len, 0)
    quant.quantize_model(spec.quant_name, model, targets, spec.quant, spec.model.dtype, "cpu", windows=windows)
    real.update(accounting.measured_quantized_sizes(model, targets, quant.get(spec.quant_name).state_bytes))
    plan.with_adapters(real, model, targets, adapters.get(spec.peft_method), spec)
    return real
