"""Tests for qpeft_bench.report: loading, formatting, writers and CLI exit codes."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from qpeft_bench.report import (
    OVERVIEW,
    build_table,
    fmt_count,
    fmt_fixed,
    fmt_scaled,
    load_records,
    main,
    raw_value,
    render_markdown,
    sort_value,
)

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


def run_report(results_dir: Path, out: Path, capsys: pytest.CaptureFixture[str],
               table: str = "overview") -> tuple[int, str, str]:
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


def test_duplicate_run_id_keeps_both_rows(results_dir: Path, tmp_path: Path, capsys) -> None:
    write(results_dir / "copy" / "result.json", json.dumps(completed_record()))
    out = tmp_path / "out"
    code, stdout, _ = run_report(results_dir, out, capsys)

    assert code == 0
    body = [line for line in stdout.splitlines() if line.startswith("| aaa111 ")]
    assert len(body) == 2
    assert "duplicate run_id aaa111:" in stdout
    with (out / "overview.csv").open(newline="", encoding="utf-8") as handle:
        assert [row["run_id"] for row in csv.DictReader(handle)].count("aaa111") == 2


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
