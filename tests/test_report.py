"""Tests for qpeft_bench.report: loading, formatting, writers and CLI exit codes."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest

from qpeft_bench.report.catalog import OVERVIEW
from qpeft_bench.report.cli import main
from qpeft_bench.report.formatting import fmt_count, fmt_fixed, fmt_scaled, raw_value
from qpeft_bench.report.records import load_records
from qpeft_bench.report.render import render_markdown
from qpeft_bench.report.rows import sort_value
from qpeft_bench.report.tables import build_table

SCHEMA = "qpeft-bench/run-record/v1"
GIB = 2**30
MIB = 2**20


def completed_record() -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "run_id": "aaa111",
        "status": "completed",
        "config": {
            "mode": "train",
            "seed": 0,
            "model": {"name": "tiny_llama", "hub_id": None},
            "quant": {"name": "nf4", "double_quant": True},
            "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05},
            "data": {"name": "tiny_alpaca"},
            "train": {"max_steps": 60, "batch_size": 8},
        },
        "accounting": {
            "total_params": 4200000,
            "trainable_params": 100000,
            "trainable_pct": 2.380952,
            "base_model_bytes": 8400000,
            "quantized_model_bytes": 3 * GIB // 2,  # 1.5 GiB exactly
            "param_buffer_bytes": 2 * GIB,
            "adapter_bytes": 200000,
            "peft_overhead_bytes": 5 * MIB // 2,  # 2.5 MiB exactly
            "bits_per_weight": 4.127,
        },
        "train": {
            "steps": 60,
            "s_per_step": 0.21,
            "tokens_per_s": 3000.0,
            "peak_memory_bytes": 1234567890,
            "memory_kind": "cpu_peak_rss",
            "final_loss": 1.9,
        },
        "eval": {"before": {"ppl_heldout": 12.3}, "after": {"ppl_heldout": 6.12345}},
        "meta": {"start_time": "2025-01-01T00:00:00", "end_time": "2025-01-01T00:01:00"},
    }


def failed_record() -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "run_id": "bbb222",
        "status": "failed",
        "config": {
            "mode": "train",
            "model": {"name": "tiny_llama"},
            "quant": {"name": "hqq4"},
            "peft": {"method": "ia3"},  # no r/alpha for IA3
        },
        "accounting": {"trainable_params": 1234, "total_params": 4200000},  # no trainable_pct recorded
        "error": {"type": "ValueError", "message": "boom | with a pipe\nand a newline"},
    }


def planned_record() -> dict[str, Any]:
    # No peft section and no train/eval: a planned base-model run.
    return {
        "schema": SCHEMA,
        "run_id": "ccc333",
        "status": "planned",
        "config": {"mode": "plan", "model": {"name": "tiny_llama"}, "quant": {"name": "int8"}},
        "accounting": {"quantized_model_bytes": GIB},
    }


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    write(root / "sweep" / "completed" / "result.json", json.dumps(completed_record()))
    write(root / "sweep" / "failed" / "result.json", json.dumps(failed_record()))
    write(root / "planned" / "result.json", json.dumps(planned_record()))
    write(root / "corrupt" / "result.json", json.dumps(completed_record())[:50])  # truncated mid-write
    write(root / "empty" / "result.json", "{}")
    write(root / "notes" / "other.json", "not a record")  # only result.json files count
    return root


def run_report(
    results_dir: Path, out: Path, capsys: pytest.CaptureFixture[str], table: str = "overview"
) -> tuple[int, str, str]:
    code = main([str(results_dir), "--out", str(out), "--table", table])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def md_rows(markdown: str) -> dict[str, list[str]]:
    """run_id -> cells of the Markdown table body (header and rule rows skipped)."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")][2:]
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
    return {cells[0]: cells for cells in rows}


def header_index(header: str) -> int:
    return [col.header for col in OVERVIEW.columns].index(header)


def test_overview_markdown_rows_and_values(results_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tables" / "nested"  # created on demand
    code, stdout, _ = run_report(results_dir, out, capsys)

    assert code == 0
    assert (out / "overview.md").read_text(encoding="utf-8") == stdout
    rows = md_rows(stdout)
    assert set(rows) == {"aaa111", "bbb222", "ccc333"}
    assert [rows[r][1] for r in ("aaa111", "bbb222", "ccc333")] == ["completed", "failed", "planned"]

    done = dict(zip([c.header for c in OVERVIEW.columns], rows["aaa111"], strict=True))
    assert done == {
        "run_id": "aaa111",
        "status": "completed",
        "model": "tiny_llama",
        "quant": "nf4",
        "method": "lora",
        "r": "8",
        "alpha": "16",
        "trainable params": "100,000",
        "trainable %": "2.3810",
        "quantized size (GiB)": "1.500",
        "param+buffer size (GiB)": "2.000",
        "PEFT overhead (MiB)": "2.50",
        "peak memory (GiB)": "1.150",
        "s/step": "0.210",
        "ppl before": "12.300",
        "ppl after": "6.123",
    }

    failed = rows["bbb222"]
    assert failed[header_index("method")] == "ia3"
    assert failed[header_index("r")] == "" and failed[header_index("alpha")] == ""
    assert failed[header_index("trainable %")] == "0.0294"  # derived from 1234 / 4.2M when not recorded
    assert failed[header_index("ppl after")] == ""

    planned = rows["ccc333"]
    assert planned[header_index("method")] == "none"  # no peft section = base model
    assert planned[header_index("quantized size (GiB)")] == "1.000"
    assert planned[header_index("s/step")] == "" and planned[header_index("peak memory (GiB)")] == ""


def test_overview_sorted_by_model_quant_method(results_dir: Path, tmp_path: Path, capsys) -> None:
    _, stdout, _ = run_report(results_dir, tmp_path / "out", capsys)
    # Same model everywhere, so quant decides: hqq4 < int8 < nf4.
    assert list(md_rows(stdout)) == ["bbb222", "ccc333", "aaa111"]


def test_units_and_unreadable_notes(results_dir: Path, tmp_path: Path, capsys) -> None:
    code, stdout, _ = run_report(results_dir, tmp_path / "out", capsys)

    assert code == 0
    assert "GiB = 2^30 bytes, MiB = 2^20 bytes" in stdout
    corrupt = results_dir / "corrupt" / "result.json"
    empty = results_dir / "empty" / "result.json"
    assert f"unreadable: {corrupt} (invalid JSON:" in stdout
    assert f"unreadable: {empty} (missing schema, run_id, status)" in stdout
    assert "other.json" not in stdout


def test_csv_round_trips_raw_values(results_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    run_report(results_dir, out, capsys)

    with (out / "overview.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames is not None
        assert "quantized_model_bytes" in reader.fieldnames and "peak_memory_bytes" in reader.fieldnames
        rows = {row["run_id"]: row for row in reader}

    assert list(rows) == ["bbb222", "ccc333", "aaa111"]  # corrupt / empty records are skipped
    done = rows["aaa111"]
    assert int(done["quantized_model_bytes"]) == 3 * GIB // 2
    assert int(done["param_buffer_bytes"]) == 2 * GIB
    assert int(done["peft_overhead_bytes"]) == 5 * MIB // 2
    assert int(done["peak_memory_bytes"]) == 1234567890
    assert int(done["trainable_params"]) == 100000
    assert float(done["trainable_pct"]) == 2.380952
    assert float(done["s_per_step"]) == 0.21
    assert float(done["ppl_after"]) == 6.12345
    assert done["record_path"] == str(results_dir / "sweep" / "completed" / "result.json")
    assert rows["ccc333"]["s_per_step"] == "" and rows["ccc333"]["status"] == "planned"
    assert rows["bbb222"]["r"] == "" and rows["bbb222"]["status"] == "failed"


def test_duplicate_run_id_is_counted_once(results_dir: Path, tmp_path: Path, capsys) -> None:
    write(results_dir / "copy" / "result.json", json.dumps(completed_record()))
    out = tmp_path / "out"
    code, stdout, _ = run_report(results_dir, out, capsys)

    assert code == 0
    body = [line for line in stdout.splitlines() if line.startswith("| aaa111 ")]
    assert len(body) == 1  # issue 20: a copied run directory is the same run, counted once
    assert "run aaa111 found twice:" in stdout
    with (out / "overview.csv").open(newline="", encoding="utf-8") as handle:
        assert [row["run_id"] for row in csv.DictReader(handle)].count("aaa111") == 1


def test_missing_directory_exits_1(tmp_path: Path, capsys) -> None:
    code, stdout, stderr = run_report(tmp_path / "nope", tmp_path / "out", capsys)
    assert code == 1
    assert "does not exist" in stderr and "nope" in stderr
    assert stdout == ""
    assert not (tmp_path / "out").exists()


def test_empty_directory_prints_no_records(tmp_path: Path, capsys) -> None:
    (tmp_path / "runs").mkdir()
    code, stdout, _ = run_report(tmp_path / "runs", tmp_path / "out", capsys)
    assert code == 0
    assert stdout.strip() == f"no run records under {tmp_path / 'runs'}"
    assert not (tmp_path / "out").exists()


def test_only_unreadable_records_exits_1(tmp_path: Path, capsys) -> None:
    write(tmp_path / "runs" / "x" / "result.json", "[1, 2]")
    code, _, stderr = run_report(tmp_path / "runs", tmp_path / "out", capsys)
    assert code == 1
    assert "(not a JSON object but list)" in stderr
    assert "no readable run records" in stderr


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"schema": "other/v9", "run_id": "x", "status": "completed"}', "unsupported schema 'other/v9'"),
        (f'{{"schema": "{SCHEMA}", "run_id": 7, "status": "completed"}}', "run_id is not a non-empty string"),
        (f'{{"schema": "{SCHEMA}", "run_id": "x"}}', "missing status"),
        ("null", "not a JSON object but NoneType"),
    ],
)
def test_validation_reasons(tmp_path: Path, content: str, reason: str) -> None:
    write(tmp_path / "r" / "result.json", content)
    loaded = load_records(tmp_path)
    assert loaded.records == []
    assert [u.reason for u in loaded.unreadable] == [reason]


def test_wrongly_typed_sections_do_not_crash(tmp_path: Path) -> None:
    record = {
        "schema": SCHEMA,
        "run_id": "odd",
        "status": "diverged",
        "config": "oops",
        "train": [1],
        "eval": {"after": {"ppl_heldout": float("inf")}},
    }
    write(tmp_path / "r" / "result.json", json.dumps(record))  # json writes Infinity, which json reads back
    table = build_table(OVERVIEW, load_records(tmp_path))
    cells = md_rows(render_markdown(table))["odd"]
    assert cells[header_index("status")] == "diverged"
    assert cells[header_index("method")] == ""  # no config at all: unknown, not "none"
    assert cells[header_index("ppl after")] == "inf"


def test_formatters() -> None:
    assert fmt_count(1234567) == "1,234,567"
    assert fmt_count(8.0) == "8"
    assert fmt_count(None) == ""
    assert fmt_count("n/a") == "n/a"
    assert fmt_scaled(GIB, 3)(3 * GIB // 4) == "0.750"
    assert fmt_scaled(MIB, 2)(MIB // 3) == "0.33"
    assert fmt_fixed(4)(2.5) == "2.5000"
    assert raw_value(None) == "" and raw_value(0.1) == "0.1" and raw_value(True) == "true"
    assert sorted([None, "b", 16, 4, "a"], key=sort_value) == [4, 16, "a", "b", None]


def test_all_tables_by_default(results_dir: Path, tmp_path: Path, capsys) -> None:
    code, stdout, _ = run_report(results_dir, tmp_path, capsys, table="all")
    assert code == 0
    assert "## Run overview" in stdout and "## Evaluation before and after fine-tuning" in stdout
    assert {p.name for p in tmp_path.iterdir()} >= {"overview.md", "overview.csv", "evaluation.md", "evaluation.csv"}


# --------------------------------------------------------------------------- thesis tables on a synthetic sweep
#
# Expected files: tests/reference/report/<table>.{md,csv,tex}. After a deliberate change of a table, regenerate
# them with `QPEFT_UPDATE_REPORT_REFERENCE=1 pytest tests/test_report.py -k golden`, then read the diff by hand:
# the values must be what the records below imply (the comments next to them say what).

REFERENCE_DIR = Path(__file__).parent / "reference" / "report"
# Published values kept in the repository (a clone has everything the tests read).
PUBLISHED_REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"


def sweep_record(
    run_id: str,
    status: str,
    *,
    peft: dict[str, Any] | None,
    data: str = "alpaca",
    seed: int = 0,
    quant: dict[str, Any] | None = None,
    accounting: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> dict[str, Any]:
    config = {
        "mode": "plan" if status == "planned" else "train",
        "seed": seed,
        "model": {"name": "tiny_llama"},
        "quant": quant or {"name": "nf4", "double_quant": True},
        "data": {"name": data},
    }
    if peft is not None:
        config["peft"] = {"variant": [], **peft}
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "run_id": run_id,
        "status": status,
        "config": config,
        "accounting": accounting or {},
    }
    if train is not None:
        record["train"] = train
    if after is not None:
        record["eval"] = {"before": {"ppl_heldout": 20.0}, "after": after}
    return record


def lora(r: int, alpha: int, name: str = "lora", **extra: Any) -> dict[str, Any]:
    return {"method": "lora", "name": name, "r": r, "alpha": alpha, **extra}


def lora_accounting(r: int) -> dict[str, int]:
    # a toy model: 4.2M elements, LoRA r on 2 x 640 features per layer x 4 layers; adapters in bf16
    trainable = r * 2 * 640 * 4
    return {
        "total_params": 4200000,
        "trainable_params": trainable,
        "base_model_bytes": 8400000,
        "quantized_model_bytes": 3 * GIB // 2,
        "param_buffer_bytes": 5 * GIB // 4,
        "bits_per_weight": 4.5,
        "adapter_bytes": 2 * trainable,
        "peft_overhead_bytes": 2 * trainable,
        "qlora_recipe_overhead_bytes": 2 * trainable + MIB // 2,
    }


def trained(mem_gib: float, t500: float) -> dict[str, Any]:
    return {
        "steps": 10,
        "losses": [2.0, 1.5, 1.2],
        "final_loss": 1.2,
        "mean_memory_bytes": int(mem_gib * GIB),
        "time_500_steps_s": t500,
        "memory_kind": "cuda_max_allocated",
    }


def sweep_records() -> dict[str, dict[str, Any]]:
    leaderboard = {
        "tasks": {
            t: {"value": v}
            for t, v in zip(
                ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande", "gsm8k"),
                (0.5, 0.7, 0.4, 0.4, 0.6, 0.1),
                strict=True,
            )
        },
        "average": 0.45,
        "average_4": 0.5,
    }

    def commonsense(hellaswag: float) -> dict:
        # the seven 0-shot tasks; the average is their plain mean, as the harness computes it
        values = dict(
            zip(
                ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa"),
                (hellaswag, 0.6, 0.5, 0.6, 0.4, 0.6, 0.3),
                strict=True,
            )
        )
        return {"tasks": {t: {"value": v} for t, v in values.items()}, "average": sum(values.values()) / 7}

    return {
        # lora r8 on alpaca, two seeds: ppl 6.0 and 6.4 -> 6.200 ± 0.283 (2) over seeds
        "l8s0": sweep_record(
            "l8s0",
            "completed",
            peft=lora(8, 16),
            accounting=lora_accounting(8),
            train=trained(2.0, 100.0),
            after={
                "ppl_heldout": 6.0,
                "mmlu": {"average": 0.40},
                "leaderboard": leaderboard,
                "commonsense": commonsense(0.5),
                "speed": {"generation": {"tokens_per_s": 30.0}},
            },
        ),
        "l8s1": sweep_record(
            "l8s1",
            "completed",
            peft=lora(8, 16),
            seed=1,
            accounting=lora_accounting(8),
            train=trained(2.5, 110.0),
            after={
                "ppl_heldout": 6.4,
                "mmlu": {"average": 0.42},
                "leaderboard": {**leaderboard, "average": 0.47},
                "commonsense": commonsense(0.7),
                "speed": {"generation": {"tokens_per_s": 32.0}},
            },
        ),
        # lora r16 on alpaca: a second configuration, so with l8mlp the alpaca mean is over 6.0, 6.4, 5.6, 6.6
        "l16": sweep_record(
            "l16",
            "completed",
            peft=lora(16, 32),
            accounting=lora_accounting(16),
            train=trained(3.0, 120.0),
            after={"ppl_heldout": 5.6, "mmlu": {"average": 0.44}},
        ),
        # lora r8 on oasst1: the second data set column
        "l8oa": sweep_record(
            "l8oa",
            "completed",
            peft=lora(8, 16),
            data="oasst1",
            accounting=lora_accounting(8),
            train=trained(2.0, 100.0),
            after={"ppl_heldout": 9.0, "mmlu": {"average": 0.38}},
        ),
        # rslora: r16 fine; r8 "completed" with ppl 5000 (> 1000: diverged by threshold) -> rslora* on alpaca
        "rs16": sweep_record(
            "rs16",
            "completed",
            peft=lora(16, 32, "rslora", use_rslora=True),
            accounting=lora_accounting(16),
            train=trained(3.0, 121.0),
            after={"ppl_heldout": 5.5, "mmlu": {"average": 0.45}},
        ),
        "rs8": sweep_record(
            "rs8",
            "completed",
            peft=lora(8, 16, "rslora", use_rslora=True),
            accounting=lora_accounting(8),
            train=trained(2.0, 101.0),
            after={"ppl_heldout": 5000.0, "mmlu": {"average": 0.25}},
        ),
        # rslora on oasst1 diverged by status: the only run of that cell, so the cell stays empty
        "rs8oa": sweep_record(
            "rs8oa",
            "diverged",
            peft=lora(8, 16, "rslora", use_rslora=True),
            data="oasst1",
            accounting=lora_accounting(8),
            train=trained(2.0, 99.0),
            after={"ppl_heldout": float("nan")},
        ),
        # lora r8 with the MLP rank halved: a layer-group column of by_layer_group
        "l8mlp": sweep_record(
            "l8mlp",
            "completed",
            peft=lora(8, 16, variant=["mlp.r/2"]),
            accounting=lora_accounting(6),
            train=trained(1.9, 95.0),
            after={"ppl_heldout": 6.6, "mmlu": {"average": 0.41}},
        ),
        # ia3 failed while training: its accounting counts, it is left out of every measured mean
        "ia3": sweep_record(
            "ia3",
            "failed",
            peft={"method": "ia3", "name": "ia3"},
            accounting={
                "total_params": 4200000,
                "trainable_params": 1234,
                "adapter_bytes": 4936,
                "peft_overhead_bytes": 4936,
                "qlora_recipe_overhead_bytes": 4936 + MIB // 2,
            },
        ),
        # dora planned on HQQ 2-bit: accounting only (model size per quantizer, trainable params)
        "dora": sweep_record(
            "dora",
            "planned",
            peft=lora(8, 16, "dora", use_dora=True),
            quant={"name": "hqq", "nbits": 2, "group_size": 64},
            accounting={
                **lora_accounting(8),
                "trainable_params": 8 * 2 * 640 * 4 + 4 * 640,
                "quantized_model_bytes": GIB,
                "param_buffer_bytes": 3 * GIB // 4,
                "bits_per_weight": 2.5,
            },
        ),
    }


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for run_id, record in sweep_records().items():
        write(root / run_id / "result.json", json.dumps(record))
    return root


def test_every_thesis_table_matches_its_golden_files(sweep_dir: Path, tmp_path: Path, capsys) -> None:
    from qpeft_bench.report.catalog import AGGREGATES, TABLES

    out = tmp_path / "tables"
    assert main([str(sweep_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    produced = sorted(p.name for p in out.iterdir())
    # per_configuration is split per model and data set (the thesis' B.2-B.7): the records have two data sets
    names = [
        *TABLES,
        *(n for n in AGGREGATES if n != "per_configuration"),
        "per_configuration_tiny_llama_alpaca",
        "per_configuration_tiny_llama_oasst1",
    ]
    assert produced == sorted(f"{n}.{ext}" for n in names for ext in ("md", "csv", "tex"))
    update = os.environ.get("QPEFT_UPDATE_REPORT_REFERENCE") == "1"
    for name in produced:
        text = (out / name).read_text(encoding="utf-8").replace(str(sweep_dir), "RUNS")
        golden = REFERENCE_DIR / name
        if update:
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(text, encoding="utf-8", newline="")
        assert text == golden.read_text(encoding="utf-8"), name


def llama2_7b_lora_params(r: int) -> int:
    """LoRA r on every linear of LLaMA-2-7B, from the shapes in docs/reference/architectures.csv: r x (in + out)."""
    with (PUBLISHED_REFERENCE / "architectures.csv").open(newline="", encoding="utf-8") as handle:
        arch = next(row for row in csv.DictReader(handle) if row["name"] == "llama2_7b")
    h, i, layers = int(arch["hidden_size"]), int(arch["intermediate_size"]), int(arch["num_hidden_layers"])
    return layers * r * (4 * (h + h) + 2 * (h + i) + (i + h))


def test_reference_column_from_the_published_accounting_csv(tmp_path: Path, capsys) -> None:
    """accounting_llama2_7b.csv (method, r, alpha, trainable_params, overhead_published_MB): the trainable counts
    follow from the architecture, so the difference is 0; the overhead compares with the QLoRA-recipe figure."""
    trainable = llama2_7b_lora_params(8)
    ours_overhead = 2 * trainable + 549000  # bf16 adapters + a made-up set-up constant, 38.648... MiB
    record = sweep_record(
        "ref",
        "planned",
        peft=lora(8, 16),
        accounting={
            "total_params": 6738415616,
            "trainable_params": trainable,
            "qlora_recipe_overhead_bytes": ours_overhead,
        },
    )
    record["config"]["model"]["name"] = "llama2_7b"
    write(tmp_path / "runs" / "ref" / "result.json", json.dumps(record))
    out = tmp_path / "tables"
    assert (
        main(
            [
                str(tmp_path / "runs"),
                "--out",
                str(out),
                "--table",
                "trainable_params",
                "--reference",
                str(PUBLISHED_REFERENCE / "accounting_llama2_7b.csv"),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "matched on method, r, alpha for 1 of 1 rows" in stdout
    with (out / "trainable_params.csv").open(newline="", encoding="utf-8") as handle:
        (row,) = csv.DictReader(handle)
    assert int(row["trainable_params_mean"]) == trainable == 19988480  # the published count for r=8
    assert float(row["ref_trainable_params"]) == trainable and float(row["diff_trainable_params"]) == 0

    assert (
        main(
            [
                str(tmp_path / "runs"),
                "--out",
                str(out),
                "--table",
                "peft_overhead",
                "--reference",
                str(PUBLISHED_REFERENCE / "accounting_llama2_7b.csv"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    with (out / "peft_overhead.csv").open(newline="", encoding="utf-8") as handle:
        (row,) = csv.DictReader(handle)
    published = 38.648 * MIB  # the csv's overhead_published_MB for lora r=8 alpha=16, in bytes
    assert float(row["ref_qlora_recipe_overhead_bytes"]) == pytest.approx(published)
    assert float(row["diff_qlora_recipe_overhead_bytes"]) == pytest.approx(ours_overhead - published)
    assert float(row["diff_pct_qlora_recipe_overhead_bytes"]) == pytest.approx(
        100 * (ours_overhead - published) / published
    )
    assert "ref_peft_overhead_bytes" not in row  # the published figure is not the clean adapter overhead
    tex = (out / "peft_overhead.tex").read_text(encoding="utf-8")
    assert "QLoRA-recipe overhead (MiB) ref & $\\Delta$ & $\\Delta$ \\%" in tex


def test_reference_errors_and_unmatched_keys(sweep_dir: Path, tmp_path: Path, capsys) -> None:
    assert main([str(sweep_dir), "--out", str(tmp_path / "t"), "--reference", str(tmp_path / "nope.csv")]) == 1
    assert "--reference" in capsys.readouterr().err
    ref = tmp_path / "ref.csv"
    ref.write_text("# comment lines are skipped\nflavour,trainable_params\nx,1\n", encoding="utf-8")
    assert (
        main([str(sweep_dir), "--out", str(tmp_path / "t"), "--table", "trainable_params", "--reference", str(ref)])
        == 0
    )
    assert "not applied, no column named like a key column" in capsys.readouterr().out


def test_diverged_threshold_option_moves_runs_in_and_out_of_the_means(sweep_dir: Path, tmp_path: Path, capsys) -> None:
    # with the threshold above rs8's 5000, only the status-diverged run rs8oa stays excluded
    assert main([str(sweep_dir), "--out", str(tmp_path / "t"), "--table", "perplexity", "--diverged-ppl", "10000"]) == 0
    stdout = capsys.readouterr().out
    row = next(line for line in stdout.splitlines() if "| rslora" in line)
    # mean and sample std of 5.5 and 5000 (for two values: |a - b| / sqrt(2))
    assert f"{(5.5 + 5000) / 2:,.3f} ± {(5000 - 5.5) / 2**0.5:,.3f} (2)" in row
    assert "excluded from the means: tiny_llama nf4 +dq rslora: rs8oa" in stdout


def test_outputs_are_byte_identical_on_a_second_run(sweep_dir: Path, tmp_path: Path, capsys) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    assert main([str(sweep_dir), "--out", str(first)]) == 0
    assert main([str(sweep_dir), "--out", str(second)]) == 0
    capsys.readouterr()
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)


def test_latex_escapes_and_booktabs() -> None:
    from qpeft_bench.report.render import latex_escape, render_latex
    from qpeft_bench.report.tables import Column, Table, TableSpec

    assert latex_escape("a_b & 5% $x# {y} ~ ^ \\") == (
        "a\\_b \\& 5\\% \\$x\\# \\{y\\} \\textasciitilde{} \\textasciicircum{} \\textbackslash{}"
    )
    spec = TableSpec("t", "T_1", (Column("k", "key"), Column("v", "value", fmt_count, align="right")))
    tex = render_latex(Table(spec, [{"k": "q_proj", "v": 1234}], ["note 50%"]))
    lines = tex.splitlines()
    assert "\\begin{tabular}{lr}" in lines
    assert lines.index("\\toprule") < lines.index("\\midrule") < lines.index("\\bottomrule")
    assert "q\\_proj & 1,234 \\\\" in lines and "\\caption{T\\_1}" in lines and "note 50\\%\\par" in lines


def test_is_diverged_needs_a_perplexity_above_threshold_that_training_did_not_lower() -> None:
    from qpeft_bench.report.aggregate import is_diverged

    base = {"status": "completed", "ppl_before": None, "wikitext_ppl_before": None, "wikitext_ppl_after": None}
    assert is_diverged({**base, "ppl_after": 1500.0}, 1000.0)  # nothing to compare with: the threshold decides
    assert not is_diverged({**base, "ppl_after": 999.0}, 1000.0)
    assert not is_diverged({**base, "ppl_after": 1500.0, "ppl_before": 1929.0}, 1000.0)  # improved: not diverged
    assert is_diverged({**base, "ppl_after": 2500.0, "ppl_before": 1929.0}, 1000.0)
    assert is_diverged({**base, "ppl_after": float("nan"), "ppl_before": 1929.0}, 1000.0)
    assert is_diverged({**base, "status": "diverged", "ppl_after": 5.0}, 1000.0)
    assert is_diverged({**base, "ppl_after": 5.0, "wikitext_ppl_after": float("inf")}, 1000.0)
