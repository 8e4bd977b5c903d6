"""`qpeft-bench-data` (issue 19, item 5): the original MMLU CSVs and a raw WikiText file converted into the layout the
evaluation reads, checked against the hub-schema fixtures and the raw reader; malformed sources named by file and
row, nothing half-written."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from qpeft_bench import convert
from qpeft_bench.evaluation import harness, perplexity

FIXTURES = harness.FIXTURES / "cais" / "mmlu"


def write_original_mmlu(root):
    """The fixtures' 57 subjects written back as the original distribution: data/{dev,test}/<subject>_<split>.csv,
    no header, question, A-D, answer letter (csv quoting for commas, quotes and newlines)."""
    for subject_dir in sorted(FIXTURES.iterdir()):
        for split in ("dev", "test"):
            rows = [json.loads(line) for line in (subject_dir / f"{split}.jsonl").read_text().splitlines()]
            out = root / split / f"{subject_dir.name}_{split}.csv"
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                for row in rows:
                    writer.writerow([row["question"], *row["choices"], "ABCD"[row["answer"]]])
    return root


def test_original_mmlu_csvs_convert_to_the_hub_schema(tmp_path):
    source = write_original_mmlu(tmp_path / "data")
    counts = convert.convert_mmlu(source, tmp_path / "root")
    assert counts["subjects"] == len(list(FIXTURES.iterdir())) == 57
    for subject_dir in FIXTURES.iterdir():
        for split in ("dev", "test"):
            ours = (tmp_path / "root" / "cais" / "mmlu" / subject_dir.name / f"{split}.jsonl").read_text()
            theirs = (subject_dir / f"{split}.jsonl").read_text()
            assert [json.loads(r) for r in ours.splitlines()] == [json.loads(r) for r in theirs.splitlines()]
    assert harness.check_local_data("mmlu", tmp_path / "root") == tmp_path / "root"  # what the run's check reads


def test_quoted_commas_and_newlines_survive(tmp_path):
    (tmp_path / "data" / "dev").mkdir(parents=True)
    (tmp_path / "data" / "test").mkdir(parents=True)
    row = ['What is "1, 2"?\nPick one.', "a, b", "c", "d", "e", "B"]
    for split in ("dev", "test"):
        with open(tmp_path / "data" / split / f"x_{split}.csv", "w", newline="") as handle:
            csv.writer(handle).writerow(row)
    convert.convert_mmlu(tmp_path / "data", tmp_path / "root")
    (got,) = [json.loads(x) for x in (tmp_path / "root/cais/mmlu/x/test.jsonl").read_text().splitlines()]
    assert got == {"question": row[0], "subject": "x", "choices": row[1:5], "answer": 1}


@pytest.mark.parametrize(
    "line, message",
    [("q,a,b,c,D\n", r"x_test.csv:2: 5 columns"), ("q,a,b,c,d,E\n", r"x_test.csv:2: answer 'E' is not one of")],
)
def test_malformed_rows_are_named_by_file_and_row(tmp_path, line, message):
    for split in ("dev", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
        (tmp_path / "data" / split / f"x_{split}.csv").write_text("q,a,b,c,d,A\n" + (line if split == "test" else ""))
    with pytest.raises(convert.ConvertError, match=message):
        convert.convert_mmlu(tmp_path / "data", tmp_path / "root")
    assert not (tmp_path / "root").exists()  # the good dev file was not written either


def test_raw_wikitext_converts_to_rows_that_join_to_the_same_text(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \n = Robert Boulter = \n \n Robert Boulter is an English actor .\n\n = = Career = = \n")
    out = convert.convert_wikitext(raw, tmp_path / "root")
    assert out == tmp_path / "root" / "wikitext" / "wikitext-2-raw-v1" / "test.jsonl"
    assert perplexity.wikitext_text(str(out)) == perplexity.wikitext_text(str(raw))
    with pytest.raises(convert.ConvertError, match="exists; pass --overwrite"):
        convert.convert_wikitext(raw, tmp_path / "root")
    raw.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(convert.ConvertError, match="not UTF-8"):
        convert.convert_wikitext(raw, tmp_path / "root", overwrite=True)
    assert perplexity.wikitext_text(str(out)) != ""  # the earlier file is intact


def test_the_command_line_says_what_it_wrote_and_fails_in_one_line(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" = T = \n")
    run = [sys.executable, "-m", "qpeft_bench.convert"]
    ok = subprocess.run([*run, "wikitext", str(raw), str(tmp_path / "r")], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and f"eval.data_root={tmp_path / 'r'}" in ok.stdout
    bad = subprocess.run([*run, "mmlu", str(tmp_path / "nothing"), str(tmp_path / "r")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "no *_dev.csv files" in bad.stderr


def test_the_documented_layout_table_matches_the_fixtures():
    """docs/evaluation.md's table of files and columns is what the fixtures (the hub's schema) hold."""
    doc = (ROOT / "docs" / "evaluation.md").read_text()
    for file in sorted(harness.FIXTURES.rglob("*.jsonl")):
        parts = file.relative_to(harness.FIXTURES).parts
        folder = "/".join(parts[:-2]) + "/" + ("<subject>" if parts[:2] == ("cais", "mmlu") else parts[-2]) + "/"
        columns = ", ".join(json.loads(file.read_text().splitlines()[0]))
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{folder}`"))
        assert file.stem in row.split("|")[2] and row.split("|")[3].strip() == columns, (file, row)
