"""Issue 20, "the report miscounts", and hostile cases of our own for the report, each through the real entry point
(`python -m qpeft_bench.report`, what `qpeft-bench-report` runs): symlinked and copied run directories, output paths
that cannot be written, odd record files and values, paths and terminals that are not UTF-8. Every failure is one
line on stderr and exit 1 with nothing written; everything else completes and counts each run once."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_report import lora, sweep_record, write

PREFIX = "qpeft-bench-report: error: "


def report(*args: Any, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The command as a user runs it; the timeout turns a hang (a FIFO read, a symlink loop walked) into a failure."""
    return subprocess.run(
        [sys.executable, "-m", "qpeft_bench.report", *map(str, args)],
        capture_output=True,
        text=True,
        errors="strict",  # what the command prints must be valid in the stream's encoding
        timeout=60,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run failed the way a bad input must: exit 1, no traceback, nothing on stdout, one line on stderr."""
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), result.stderr
    return lines[0][len(PREFIX) :]


def run_record(run_id: str, ppl: float | str, seed: int = 0, end: str | None = None, **kw: Any) -> dict[str, Any]:
    """A completed lora r8 run on alpaca with its held-out perplexity, memory, time and losses."""
    record = sweep_record(
        run_id,
        kw.pop("status", "completed"),
        peft=lora(8, 16),
        seed=seed,
        accounting={"total_params": 1000, "trainable_params": 10},
        train={"losses": [2.0, 1.0], "mean_memory_bytes": 2**30, "time_500_steps_s": 100.0},
        after={"ppl_heldout": ppl},
        **kw,
    )
    record["meta"] = {"end_time": end}
    return record


def put(root: Path, name: str, record: dict[str, Any]) -> Path:
    path = root / name / "result.json"
    write(path, json.dumps(record))
    return path


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def perplexity_cell(out: Path) -> dict[str, str]:
    (row,) = csv_rows(out / "perplexity.csv")
    return row


def no_temp_files(directory: Path) -> bool:
    return not any(p.name.startswith(".") for p in directory.rglob("*"))


# ---------------------------------------------------------------------------------------------------------- symlinks


def test_symlinked_run_directories_are_followed(tmp_path: Path) -> None:
    """A results folder of links to runs on scratch: every linked run is reported, under its link's path."""
    scratch, results = tmp_path / "scratch", tmp_path / "results"
    put(scratch, "s0", run_record("s0", 6.0, seed=0))
    put(scratch, "s1", run_record("s1", 6.4, seed=1))
    results.mkdir()
    for name in ("s0", "s1"):
        (results / name).symlink_to(scratch / name, target_is_directory=True)
    out = tmp_path / "tables"
    result = report(results, "--out", out)
    assert result.returncode == 0, result.stderr
    overview = csv_rows(out / "overview.csv")
    assert [r["run_id"] for r in overview] == ["s0", "s1"]
    assert overview[0]["record_path"] == str(results / "s0" / "result.json")
    cell = perplexity_cell(out)
    assert cell["alpaca_n"] == "2" and float(cell["alpaca_mean"]) == pytest.approx(6.2)


def test_symlink_loops_and_dangling_links_end_the_walk(tmp_path: Path) -> None:
    """A link to an ancestor, a link to itself and a link to nowhere: the walk ends and the one run counts once."""
    root = tmp_path / "runs"
    put(root, "a", run_record("a", 6.0))
    (root / "a" / "up").symlink_to(root, target_is_directory=True)
    (root / "self").symlink_to("self")
    (root / "gone").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    result = report(root, "--out", tmp_path / "tables", "--table", "overview")
    assert result.returncode == 0, result.stderr
    assert [r["run_id"] for r in csv_rows(tmp_path / "tables" / "overview.csv")] == ["a"]


def test_a_link_and_its_target_are_one_record(tmp_path: Path) -> None:
    """The same file reached twice (a directory link beside its target, or a result.json linked to another) is one
    record: one row, n=1, and no duplicate note, since nothing was copied."""
    root = tmp_path / "runs"
    put(root, "real", run_record("a", 6.0))
    (root / "link").symlink_to(root / "real", target_is_directory=True)
    (root / "filelink").mkdir()
    (root / "filelink" / "result.json").symlink_to(root / "real" / "result.json")
    out = tmp_path / "tables"
    result = report(root, "--out", out)
    assert result.returncode == 0, result.stderr
    assert [r["run_id"] for r in csv_rows(out / "overview.csv")] == ["a"]
    assert perplexity_cell(out)["alpaca_n"] == "1"
    assert "found twice" not in result.stdout


# -------------------------------------------------------------------------------------------------------- duplicates


def test_a_copied_run_directory_counts_once_in_every_table_and_figure(tmp_path: Path) -> None:
    """Two seeds plus a copy of one (cp -r runs/s1 runs/s1-copy): n=2 and the mean of the two in every aggregated
    table, one row per run in the per-run tables and figure data, and each table says which record it kept."""
    root = tmp_path / "runs"
    put(root, "s0", run_record("s0", 6.0, seed=0))
    kept = put(root, "s1", run_record("s1", 6.4, seed=1))
    copy = put(root, "s1-copy", run_record("s1", 6.4, seed=1))
    out = tmp_path / "results" / "tables"
    result = report(root, "--out", out, "--figures")
    assert result.returncode == 0, result.stderr

    cell = perplexity_cell(out)
    assert cell["alpaca_n"] == "2" and float(cell["alpaca_mean"]) == pytest.approx(6.2)
    assert float(cell["alpaca_std"]) == pytest.approx(0.4 / 2**0.5)
    assert "6.200 ± 0.283 (2)" in (out / "perplexity.md").read_text(encoding="utf-8")
    for name in ("gpu_memory", "runtime"):
        assert csv_rows(out / f"{name}.csv")[0]["alpaca_n"] == "2"
    assert csv_rows(out / "per_configuration_tiny_llama_alpaca.csv")[0]["ppl_after_n"] == "2"
    assert [r["run_id"] for r in csv_rows(out / "overview.csv")] == ["s0", "s1"]

    note = f"run s1 found twice: {kept} (kept), {copy}; counted once"
    tables = sorted(out.glob("*.md"))
    assert len(tables) >= 8
    for table in tables:  # the note, in every table's Markdown, LaTeX and what the console printed
        assert f"- {note}\n" in table.read_text(encoding="utf-8"), table.name
    assert result.stdout.count(note) == len(tables)
    assert "counted once\\par" in (out / "overview.tex").read_text(encoding="utf-8")

    figures = out.parent / "figures"
    if (figures / "pareto.csv").exists():  # matplotlib installed
        assert [r["n"] for r in csv_rows(figures / "pareto.csv")] == ["2"]  # one configuration: its two seeds
        assert [r["run_id"] for r in csv_rows(figures / "loss_curves.csv")].count("s1") == 2  # two steps, one run


@pytest.mark.parametrize(
    ("records", "kept"),
    [
        # a run killed, then copied and finished elsewhere: the finished record counts
        ({"abc": ("running", None, 9.0), "abc-rerun": ("completed", None, 6.0)}, "abc-rerun"),
        # two finished records: the newest end time, whatever the zone notation
        (
            {"abc": ("completed", "2025-01-01T00:00:00", 6.0), "z": ("completed", "2025-01-02T00:00:00+00:00", 7.0)},
            "z",
        ),
        # equal: the directory the runner names after the run id, not its copy
        (
            {"abc": ("completed", "2025-01-01T00:00:00", 6.0), "abc-copy": ("completed", "2025-01-01T00:00:00", 6.0)},
            "abc",
        ),
    ],
)
def test_which_record_of_a_run_counts(tmp_path: Path, records: dict[str, tuple], kept: str) -> None:
    root = tmp_path / "runs"
    for name, (status, end, ppl) in records.items():
        put(root, name, run_record("abc", ppl, end=end, status=status))
    out = tmp_path / "tables"
    result = report(root, "--out", out, "--table", "overview")
    assert result.returncode == 0, result.stderr
    (row,) = csv_rows(out / "overview.csv")
    assert row["record_path"] == str(root / kept / "result.json")
    (other,) = set(records) - {kept}
    assert f"run abc found twice: {root / kept / 'result.json'} (kept), {root / other / 'result.json'}" in result.stdout


def test_records_of_one_run_with_other_results_count_once_and_say_they_differ(tmp_path: Path) -> None:
    """The same run id with another seed field and another perplexity (a hand-edited or mislabelled copy): still one
    run, and the note says the records are not the same."""
    root = tmp_path / "runs"
    first = put(root, "a", run_record("dup", 6.0, seed=0))
    second = put(root, "b", run_record("dup", 7.0, seed=1))
    out = tmp_path / "tables"
    result = report(root, "--out", out, "--table", "perplexity")
    assert result.returncode == 0, result.stderr
    cell = perplexity_cell(out)
    assert cell["alpaca_n"] == "1" and float(cell["alpaca_mean"]) == 6.0
    assert (
        f"run dup found twice: {first} (kept), {second}; counted once; the records differ in config, eval"
        in result.stdout
    )


def test_three_copies_are_one_run(tmp_path: Path) -> None:
    """Three plain copies, one holding a NaN (not equal to itself, but the same value in a copy): not 'differ'."""
    root = tmp_path / "runs"
    for name in ("x", "x-copy", "x-copy2"):
        record = run_record("x", 6.0)
        record["eval"]["before"]["wikitext"] = float("nan")
        put(root, name, record)
    result = report(root, "--out", tmp_path / "tables", "--table", "perplexity")
    assert result.returncode == 0, result.stderr
    assert perplexity_cell(tmp_path / "tables")["alpaca_n"] == "1"
    assert "run x found 3 times:" in result.stdout and "the records differ" not in result.stdout


# ------------------------------------------------------------------------------------------------------------ output


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("afile", "cannot write into afile: it exists and is not a directory"),
        ("afile/tables", "cannot write into afile: it exists and is not a directory"),
        ("/proc/qpeft-nope/tables", "cannot create directory /proc/qpeft-nope: No such file or directory"),
    ],
)
def test_an_out_that_cannot_be_a_directory_is_one_line_and_writes_nothing(
    tmp_path: Path, out: str, message: str
) -> None:
    put(tmp_path / "runs", "a", run_record("a", 6.0))
    (tmp_path / "afile").write_text("keep me", encoding="utf-8")
    before = sorted(tmp_path.rglob("*"))
    line = one_error_line(report(tmp_path / "runs", "--out", out, cwd=tmp_path))
    assert line == message
    assert sorted(tmp_path.rglob("*")) == before
    assert (tmp_path / "afile").read_text(encoding="utf-8") == "keep me"


def test_a_target_that_is_a_directory_leaves_the_previous_tables_as_they_were(tmp_path: Path) -> None:
    put(tmp_path / "runs", "a", run_record("a", 6.0))
    out = tmp_path / "tables"
    (out / "overview.md").mkdir(parents=True)
    (out / "evaluation.csv").write_text("the previous table", encoding="utf-8")
    line = one_error_line(report(tmp_path / "runs", "--out", out))
    assert line == f"cannot write {out / 'overview.md'}: it is a directory"
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.csv", "overview.md"]
    assert (out / "evaluation.csv").read_text(encoding="utf-8") == "the previous table"


def test_figures_that_cannot_be_written_write_no_tables_either(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    put(tmp_path / "runs", "a", run_record("a", 6.0))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "figures").write_text("a file where the figures go", encoding="utf-8")
    line = one_error_line(report(tmp_path / "runs", "--out", tmp_path / "results" / "tables", "--figures"))
    assert line == f"cannot write into {tmp_path / 'results' / 'figures'}: it exists and is not a directory"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["figures"]  # no tables/ left behind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["runs", "--out", ""], "--out is empty (an unset variable?)"),
        (["", "--out", "tables"], "results directory is empty (an unset variable?)"),
        (["  ", "--out", "tables"], "results directory is empty (an unset variable?)"),
    ],
)
def test_an_empty_argument_is_refused_not_read_as_the_current_directory(
    tmp_path: Path, args: list[str], message: str
) -> None:
    put(tmp_path / "runs", "a", run_record("a", 6.0))
    assert one_error_line(report(*args, cwd=tmp_path)) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_successful_output_leaves_no_temporary_files_and_follows_the_umask(tmp_path: Path) -> None:
    put(tmp_path / "runs", "a", run_record("a", 6.0))
    out = tmp_path / "tables"
    result = subprocess.run(
        ["sh", "-c", f'umask 002 && exec "{sys.executable}" -m qpeft_bench.report runs --out tables'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert no_temp_files(out)
    assert {(p.stat().st_mode & 0o777) for p in out.iterdir()} == {0o664}


# ----------------------------------------------------------------------------------------------------- results roots


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        ("missing", "does not exist"),
        ("file", "is not a directory"),
        ("dangling", "is a link to {tmp}/scratch, which is not a directory"),  # scratch not mounted
        ("loop", "is a link to root, which is not a directory"),
    ],
)
def test_a_results_root_that_is_not_a_directory(tmp_path: Path, make: str, problem: str) -> None:
    root = tmp_path / "root"
    if make == "file":
        root.write_text("x", encoding="utf-8")
    elif make == "dangling":
        root.symlink_to(tmp_path / "scratch", target_is_directory=True)
    elif make == "loop":
        root.symlink_to("root")
    line = one_error_line(report(root, "--out", tmp_path / "t"))
    assert line == f"results directory {str(root)!r} {problem.format(tmp=tmp_path)}"
    assert not (tmp_path / "t").exists()


def test_an_empty_root_and_one_without_records_say_so_and_write_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    write(tmp_path / "other" / "x" / "notes.json", "{}")
    for root in (tmp_path / "empty", tmp_path / "other"):
        result = report(root, "--out", tmp_path / "t")
        assert result.returncode == 0 and result.stderr == ""
        assert result.stdout == f"no run records under {root}\n"
    assert not (tmp_path / "t").exists()


def test_record_files_that_are_not_regular_files_are_unreadable_not_hangs(tmp_path: Path) -> None:
    """A directory named result.json, a FIFO (reading it would block forever) and a link to /dev/zero (never ends):
    each is listed as unreadable with its reason, and the readable run is reported."""
    root = tmp_path / "runs"
    put(root, "good", run_record("good", 6.0))
    (root / "dir" / "result.json").mkdir(parents=True)
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "result.json")
    (root / "zero").mkdir()
    (root / "zero" / "result.json").symlink_to("/dev/zero")
    result = report(root, "--out", tmp_path / "t", "--table", "overview")
    assert result.returncode == 0, result.stderr
    assert f"unreadable: {root / 'dir' / 'result.json'} (is a directory, not a file)" in result.stdout
    assert f"unreadable: {root / 'fifo' / 'result.json'} (not a regular file)" in result.stdout
    assert f"unreadable: {root / 'zero' / 'result.json'} (not a regular file)" in result.stdout
    assert [r["run_id"] for r in csv_rows(tmp_path / "t" / "overview.csv")] == ["good"]


def test_only_a_directory_named_result_json_is_no_readable_record(tmp_path: Path) -> None:
    (tmp_path / "runs" / "a" / "result.json").mkdir(parents=True)
    result = report(tmp_path / "runs", "--out", tmp_path / "t")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"unreadable: {tmp_path / 'runs' / 'a' / 'result.json'} (is a directory, not a file)",
        f"{PREFIX}no readable run records under {tmp_path / 'runs'}",
    ]


# ------------------------------------------------------------------------------------------------------------ values


@pytest.mark.parametrize("spelling", ["inf", "nan", "Infinity", "-inf"])
def test_non_finite_strings_count_as_the_numbers_they_stand_for(tmp_path: Path, spelling: str) -> None:
    """The record writer stores a non-finite float as a string ('inf'): a run whose perplexity became infinite is
    diverged (starred, named, left out of the mean), not a run that silently has no perplexity."""
    root = tmp_path / "runs"
    put(root, "good", run_record("good", 6.0, seed=0))
    put(root, "bad", run_record("bad", spelling, seed=1))
    out = tmp_path / "t"
    result = report(root, "--out", out, "--table", "perplexity")
    assert result.returncode == 0, result.stderr
    cell = perplexity_cell(out)
    if spelling == "-inf":  # below the threshold: not diverged; the mean takes it, as it would a float
        assert cell["method_name"] == "lora" and cell["alpaca_n"] == "2" and float(cell["alpaca_mean"]) == float("-inf")
        return
    assert cell["method_name"] == "lora*" and cell["alpaca_n"] == "1" and float(cell["alpaca_mean"]) == 6.0
    assert "excluded from the means: tiny_llama nf4 +dq lora: bad" in result.stdout


def test_numbers_beyond_the_float_range_do_not_crash_and_stay_readable(tmp_path: Path) -> None:
    record = run_record("huge", 1e308)
    record["accounting"] = {"trainable_params": 10**400, "total_params": -(10**400), "quantized_model_bytes": 1e300}
    record["train"]["time_500_steps_s"] = 1.7e308
    put(tmp_path / "runs", "huge", record)
    other = json.loads(json.dumps(record))
    other["run_id"], other["config"]["seed"], other["train"]["time_500_steps_s"] = "huge2", 1, 1.6e308
    put(tmp_path / "runs", "huge2", other)
    out = tmp_path / "t"
    result = report(tmp_path / "runs", "--out", out, "--figures")
    assert result.returncode == 0, result.stderr
    row = csv_rows(out / "overview.csv")[0]
    assert row["trainable_params"] == "inf" and float(row["quantized_model_bytes"]) == 1e300
    overview = (out / "overview.md").read_text(encoding="utf-8")
    assert re.search(r"\| +inf \|", overview) and "9.313e+290" in overview  # 1e300 B in GiB
    assert max(len(line) for line in overview.splitlines()) < 400
    runtime = csv_rows(out / "runtime.csv")[0]  # 1.7e308 s and 1.6e308 s: their sum overflows, the report does not
    assert runtime["alpaca_n"] == "2" and runtime["alpaca_mean"] == "inf"


def test_a_record_whose_config_lacks_keys(tmp_path: Path) -> None:
    put(tmp_path / "runs", "bare", {**run_record("bare", 5.0), "config": {}})
    out = tmp_path / "t"
    result = report(tmp_path / "runs", "--out", out)
    assert result.returncode == 0, result.stderr
    (row,) = csv_rows(out / "overview.csv")
    assert row["method"] == "none" and row["model"] == "" and row["ppl_after"] == "5.0"
    assert (out / "per_configuration_none_none.csv").exists()


def test_names_that_make_the_same_file_name_get_a_table_each(tmp_path: Path) -> None:
    """'tiny llama' and 'tiny-llama' both become per_configuration_tiny-llama_alpaca: the second must not overwrite
    the first."""
    root = tmp_path / "runs"
    for run_id, model in (("a", "tiny llama"), ("b", "tiny-llama")):
        record = run_record(run_id, 6.0)
        record["config"]["model"]["name"] = model
        put(root, run_id, record)
    out = tmp_path / "t"
    result = report(root, "--out", out, "--table", "per_configuration")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("*.md")) == [
        "per_configuration_tiny-llama_alpaca-2.md",
        "per_configuration_tiny-llama_alpaca.md",
    ]
    assert "model tiny llama," in (out / "per_configuration_tiny-llama_alpaca.md").read_text(encoding="utf-8")
    assert "model tiny-llama," in (out / "per_configuration_tiny-llama_alpaca-2.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- text and bytes


def test_a_path_that_is_not_utf8(tmp_path: Path) -> None:
    """A run directory whose name is not UTF-8 (copied from another system): reported, its path escaped."""
    bad = os.fsencode(tmp_path / "runs") + b"/run\xff"
    os.makedirs(bad)
    with open(bad + b"/result.json", "w", encoding="utf-8") as handle:
        json.dump(run_record("a", 6.0), handle)
    out = tmp_path / "t"
    result = report(tmp_path / "runs", "--out", out, "--table", "overview")
    assert result.returncode == 0, result.stderr
    assert csv_rows(out / "overview.csv")[0]["record_path"] == f"{tmp_path / 'runs'}/run\\xff/result.json"


def test_lone_surrogates_in_a_record(tmp_path: Path) -> None:
    """JSON may carry an unpaired surrogate (\\ud800), which no UTF-8 file can hold: written as its escape."""
    record = run_record("x", 6.0)
    record["config"]["model"]["name"] = "m\ud800"
    put(tmp_path / "runs", "x", record)
    out = tmp_path / "results" / "tables"
    result = report(tmp_path / "runs", "--out", out, "--figures")
    assert result.returncode == 0, result.stderr
    assert csv_rows(out / "overview.csv")[0]["model"] == "m\\ud800"


def test_an_ascii_terminal(tmp_path: Path) -> None:
    """'±' on a terminal that takes only ASCII: escaped on the console, the files stay UTF-8."""
    put(tmp_path / "runs", "a", run_record("a", 6.0, seed=0))
    put(tmp_path / "runs", "b", run_record("b", 6.4, seed=1))
    out = tmp_path / "t"
    result = report(tmp_path / "runs", "--out", out, "--table", "perplexity", env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert "6.200 \\xb1 0.283 (2)" in result.stdout
    assert "6.200 ± 0.283 (2)" in (out / "perplexity.md").read_text(encoding="utf-8")


def test_dollar_signs_in_figure_labels_are_text(tmp_path: Path) -> None:
    """matplotlib reads '$...$' as TeX and fails on what it cannot parse: a run id or method name is plain text."""
    pytest.importorskip("matplotlib")
    record = run_record("$\\foo{$", 6.0)
    record["config"]["peft"]["name"] = "$x^"
    put(tmp_path / "runs", "a", record)
    result = report(tmp_path / "runs", "--out", tmp_path / "results" / "tables", "--figures")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "results" / "figures" / "loss_curves.pdf").stat().st_size > 0


def test_tables_and_figures_in_one_folder_never_overwrite_each_other(tmp_path: Path) -> None:
    """--out results/figures puts the figures beside the tables in the same folder, where the by_layer_group table
    and figure would both be by_layer_group.csv: refused, nothing written."""
    pytest.importorskip("matplotlib")
    put(tmp_path / "runs", "a", run_record("a", 6.0))
    grouped = run_record("b", 6.2)
    grouped["config"]["peft"]["variant"] = ["mlp.r/2"]  # the by_layer_group figure is drawn only with layer groups
    put(tmp_path / "runs", "b", grouped)
    out = tmp_path / "results" / "figures"
    line = one_error_line(report(tmp_path / "runs", "--out", out, "--table", "by_layer_group", "--figures"))
    target = out / "by_layer_group.csv"
    assert line == f"{target} would be written twice (tables and figures in one folder); choose another --out"
    assert not (tmp_path / "results").exists()


def test_a_write_that_fails_halfway_replaces_nothing_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills up while the fifth file is written: the previous tables stay, no temporary file or new
    directory is left, and the error is one line (in process, to make the write fail)."""
    from qpeft_bench.report import cli, output

    put(tmp_path / "runs", "a", run_record("a", 6.0))
    out = tmp_path / "results" / "tables"
    assert cli.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_write, calls = output._write_temp, []

    def fill_up(path: Path, content: bytes) -> Path:
        calls.append(path)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real_write(path, content)

    monkeypatch.setattr(output, "_write_temp", fill_up)
    capsys.readouterr()
    new_root = tmp_path / "other" / "tables"
    for target in (out, new_root):
        calls.clear()
        assert cli.main([str(tmp_path / "runs"), "--out", str(target)]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == f"{PREFIX}cannot write {calls[-1]}: No space left on device\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "other").exists()


def test_a_reference_csv_saved_with_a_byte_order_mark_matches_on_every_key(tmp_path: Path) -> None:
    """A spreadsheet's CSV starts with a BOM; read as part of the first column's name, the method column went
    unmatched and the reference was matched on r and alpha alone."""
    record = sweep_record("a", "planned", peft=lora(8, 16), accounting={"total_params": 100, "trainable_params": 10})
    put(tmp_path / "runs", "a", record)
    ref = tmp_path / "ref.csv"
    ref.write_text("\ufeffmethod,r,alpha,trainable_params\nlora,8,16,12\n", encoding="utf-8")
    out = tmp_path / "t"
    result = report(tmp_path / "runs", "--out", out, "--table", "trainable_params", "--reference", ref)
    assert result.returncode == 0, result.stderr
    assert "matched on method, r, alpha for 1 of 1 rows" in result.stdout
    assert float(csv_rows(out / "trainable_params.csv")[0]["diff_trainable_params"]) == -2


def test_a_copy_filed_under_another_data_set_is_said_in_both_split_tables(tmp_path: Path) -> None:
    """per_configuration is one table per model and data set: a run whose copy says another data set is counted in
    the table of the record kept, and both tables (the one the copy would have entered too) carry the note."""
    root = tmp_path / "runs"
    put(root, "x", run_record("x", 6.0))
    other = run_record("x", 6.0)
    other["config"]["data"]["name"] = "oasst1"
    put(root, "x-copy", other)
    put(root, "y", {**run_record("y", 7.0), "config": {**other["config"], "seed": 1}})
    out = tmp_path / "t"
    result = report(root, "--out", out, "--table", "per_configuration")
    assert result.returncode == 0, result.stderr
    alpaca, oasst1 = (out / f"per_configuration_tiny_llama_{d}.md" for d in ("alpaca", "oasst1"))
    for table in (alpaca, oasst1):
        text = table.read_text(encoding="utf-8")
        assert "run x found twice:" in text and "the records differ in config" in text
    assert csv_rows(out / "per_configuration_tiny_llama_oasst1.csv")[0]["ppl_after_n"] == "1"  # y alone
