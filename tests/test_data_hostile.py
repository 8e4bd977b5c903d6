"""Hostile data files (issue 20): every file a run reads as data (data.path, calib.path, the converter's sources) that
is not what it should be is refused in one line naming the file, and the row (and line) and field where there is
one, before any model is loaded and before any record is written. Files are written here in their original formats
(Stanford Alpaca's JSON list, hh-rlhf's .jsonl.gz subsets, oasst1's message rows, Parquet copies of hub data)."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from qpeft_bench import calibration, convert, data, models, quant, results
from qpeft_bench.data_formats import FORMATS

FIXTURES = Path(data.__file__).parent / "assets" / "data" / "fixtures"
ALPACA = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
HH = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}
LFS = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 91226\n"
)


def _oasst(**changes) -> list[dict]:
    """A prompt and its answer in oasst1's message schema (the fixture's first row as the template)."""
    base = json.loads((FIXTURES / "oasst1.jsonl").read_text(encoding="utf-8").splitlines()[0])
    prompt = {**base, "message_id": "p", "parent_id": None, "role": "prompter", "rank": None}
    return [prompt, {**base, "message_id": "a", "parent_id": "p", "role": "assistant", "rank": 0, **changes}]


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _gz(text: str) -> bytes:
    return gzip.compress(text.encode())


def _parquet(rows: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def _write(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


# (case, data.format, file name, content, what the one line must say after the file's path; {f} = the file)
CASES = [
    ("null instruction", "alpaca", "a.json", json.dumps([ALPACA, {**ALPACA, "instruction": None}], indent=4),
     "{f} row 2: field 'instruction' is null; expected a string"),
    ("numeric output", "alpaca", "a.json", json.dumps([ALPACA, ALPACA, {**ALPACA, "output": 42}]),
     "{f} row 3: field 'output' is a number (42); expected a string"),
    ("numeric input", "alpaca", "a.jsonl", _jsonl([{**ALPACA, "input": 7}]),
     "{f} row 1: field 'input' is a number (7); expected a string"),
    ("object instruction", "alpaca", "a.jsonl", _jsonl([{**ALPACA, "instruction": {"text": "x"}}]),
     "{f} row 1: field 'instruction' is an object; expected a string"),
    ("NaN literal output", "alpaca", "a.jsonl", '{"instruction": "a", "output": NaN}\n',
     "{f} row 1: field 'output' is a number (nan); expected a string"),
    ("row after blank lines names its line", "alpaca", "a.jsonl", _jsonl([ALPACA]) + "\n\n" + _jsonl([{**ALPACA, "output": None}]),
     "{f} row 2 (line 4): field 'output' is null"),
    ("open_platypus null output", "open_platypus", "p.jsonl", _jsonl([{**ALPACA, "output": None, "data_source": "x"}]),
     "{f} row 1: field 'output' is null"),
    ("non-UTF-8 JSON lines", "alpaca", "a.jsonl", _jsonl([ALPACA]).encode() + '{"instruction": "caf\xe9"}\n'.encode("latin-1"),
     f"data file {{f}} line 2 (byte offset {len(_jsonl([ALPACA])) + 20}): byte 0xe9 is not UTF-8"),
    ("non-UTF-8 inside a .gz", "hh_rlhf", "train.jsonl.gz", gzip.compress(b'{"chosen": "\xff"}\n'),
     "data file {f} (decompressed) line 1 (byte offset 12): byte 0xff is not UTF-8"),
    ("UTF-16 file", "alpaca", "a.json", json.dumps([ALPACA]).encode("utf-16"), "data file {f} is UTF-16 text, not UTF-8"),
    (".gz that is plain text", "hh_rlhf", "train.jsonl.gz", _jsonl([HH]), "data file {f} is named .gz but is not gzip data"),
    ("Git LFS pointer .jsonl.gz", "hh_rlhf", "train.jsonl.gz", LFS,
     "data file {f} is a Git LFS pointer, not the data; run `git lfs pull`"),
    ("Git LFS pointer .json", "alpaca", "alpaca_data.json", LFS, "data file {f} is a Git LFS pointer"),
    ("Git LFS pointer .parquet", "alpaca", "train.parquet", LFS, "data file {f} is a Git LFS pointer"),
    ("Git LFS pointer .jsonl", "guanaco", "train.jsonl", LFS, "data file {f} is a Git LFS pointer"),
    ("truncated .gz", "hh_rlhf", "train.jsonl.gz", _gz(_jsonl([{**HH, "rejected": str(i)} for i in range(500)]))[:-12], "data file {f} is truncated"),
    ("gzip data not named .gz", "hh_rlhf", "train.jsonl", _gz(_jsonl([HH])), "data file {f} is gzip-compressed; name it"),
    ("not Parquet", "alpaca", "train.parquet", "instruction,output\n", "data file {f} is not a Parquet file"),
    ("truncated Parquet", "alpaca", "train.parquet", _parquet([ALPACA])[:-10], "data file {f} is not a Parquet file"),
    ("Parquet with wrong columns", "alpaca", "train.parquet", _parquet([{"prompt": "a", "completion": "b"}]),
     "{f} row 1: missing field(s) instruction, output"),
    ("Parquet with a numeric output", "alpaca", "train.parquet", _parquet([{"instruction": "a", "output": 1}]),
     "{f} row 1: field 'output' is a number (1)"),
    ("pretty-printed {data: [...]}", "alpaca", "a.json", json.dumps({"data": [ALPACA]}, indent=2),
     "{f} holds one JSON object with keys data; expected a JSON list of rows or JSON lines"),
    ("one-line {data: [...]}", "alpaca", "a.json", json.dumps({"version": 1, "data": [ALPACA]}),
     "{f} holds one JSON object with keys version, data; expected a JSON list of rows or JSON lines"),
    ("a JSON number alone", "alpaca", "a.json", "42\n", "{f} holds a number (42) alone; expected a JSON list"),
    ("JSON nested too deeply", "alpaca", "a.json", "[" * 100_000 + "]" * 100_000, "{f}: JSON nested too deeply to read"),
    ("an integer of 5000 digits", "alpaca", "a.jsonl", '{"instruction": "a", "output": "b", "n": ' + "9" * 5000 + "}\n",
     "{f} line 1: unreadable JSON (Exceeds the limit (4300 digits)"),
    ("a lone surrogate escape", "alpaca", "a.jsonl", _jsonl([ALPACA]) + '{"instruction": "a\\ud800", "output": "b"}\n',
     "{f} row 2: field 'instruction' holds a lone UTF-16 surrogate"),
    ("JSON list of strings", "guanaco", "a.json", '["a", "b"]', "{f} row 1: expected a JSON object, found str"),
    ("CSV file", "alpaca", "a.csv", "instruction,output\na,b\n", "data file {f}: data.path reads .json, .jsonl"),
    ("hh-rlhf row without chosen", "hh_rlhf", "train.jsonl.gz", _gz(_jsonl([HH, {"rejected": "x"}])),
     "{f} row 2: missing field(s) chosen"),
    ("hh-rlhf chosen without an Assistant turn", "hh_rlhf", "train.jsonl.gz", _gz(_jsonl([HH, {**HH, "chosen": "Hi."}])),
     "{f} row 2: field 'chosen' holds no \"\\n\\nAssistant:\" turn"),
    ("hh-rlhf chosen as a list of turns", "hh_rlhf", "train.jsonl.gz", _gz(_jsonl([{**HH, "chosen": ["Hi", "Hello"]}])),
     "{f} row 1: field 'chosen' is a list; expected a string"),
    ("oasst1 unknown role", "oasst1", "o.jsonl", _jsonl(_oasst(role="user")),
     "{f} row 2: field 'role' is 'user'; expected one of prompter, assistant"),
    ("oasst1 null text", "oasst1", "o.jsonl", _jsonl(_oasst(text=None)), "{f} row 2: field 'text' is null"),
    ("oasst1 rank as text", "oasst1", "o.jsonl", _jsonl(_oasst(rank="0")),
     "{f} row 2: field 'rank' is a string; expected a number or null"),
    ("oasst1 deleted as text", "oasst1", "o.jsonl", _jsonl(_oasst(deleted="false")),
     "{f} row 2: field 'deleted' is a string; expected true, false or null"),
    ("guanaco null text", "guanaco", "g.jsonl", '{"text": null}\n', "{f} row 1: field 'text' is null"),
    ("guanaco_llama2 numeric text", "guanaco_llama2", "g.jsonl", '{"text": 5}\n', "{f} row 1: field 'text' is a number"),
    ("unnatural instances as text", "unnatural", "u.jsonl", '{"instances": "abc"}\n',
     "{f} row 1: field 'instances' is a string; expected a list of objects"),
    ("unnatural instance without output", "unnatural", "u.jsonl", '{"instances": [{"instruction_with_input": "a"}]}\n',
     "{f} row 1: field 'instances' item 1: field 'output' is missing; expected a string"),
    ("unnatural reformulation with null output", "unnatural", "u.jsonl",
     _jsonl([{"instances": [{"instruction_with_input": "a", "output": "b"}],
              "reformulations": [{"instruction_with_input": "a", "output": "b"}, {"instruction_with_input": "c", "output": None}]}]),
     "{f} row 1: field 'reformulations' item 2: field 'output' is null"),
    ("unnatural ragged struct of lists", "unnatural", "u.jsonl",
     '{"instances": {"instruction_with_input": ["a", "b"], "output": ["c"]}}\n',
     "{f} row 1: field 'instances' is an object whose values are not lists of one length"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "fmt", "name", "content", "message"), CASES, ids=[c[0] for c in CASES])
def test_check_source_refuses_a_hostile_file_in_one_line(case, fmt, name, content, message, tmp_path):
    path = _write(tmp_path, name, content)
    with pytest.raises((ValueError, FileNotFoundError)) as caught:
        data.check_source(fmt, path, None)
    text = str(caught.value)
    assert "\n" not in text and message.format(f=path) in text, text


def test_hostile_cases_reach_every_format():
    assert {fmt for _, fmt, *_ in CASES} == set(FORMATS)


# (case, file name, content): files that are awkward but right, and must load as their clean copy does
GOOD = [
    ("UTF-8 BOM on JSON lines", "a.jsonl", "\ufeff" + _jsonl([ALPACA, ALPACA])),
    ("UTF-8 BOM on a JSON list", "a.json", "\ufeff" + json.dumps([ALPACA, ALPACA])),
    ("CRLF line endings", "a.jsonl", _jsonl([ALPACA, ALPACA]).replace("\n", "\r\n")),
    ("one-line JSON lines file", "a.jsonl", json.dumps(ALPACA)),
    ("null input in a Parquet copy", "a.parquet", _parquet([{**ALPACA, "input": None}, ALPACA])),
    (
        "escaped emoji (a surrogate pair)",
        "a.jsonl",
        _jsonl([{**ALPACA, "instruction": "Name a colour. \U0001f3a8"}, ALPACA]),
    ),
    ("absent input", "a.json", json.dumps([{"instruction": "Name a colour.", "output": "Blue."}, ALPACA])),
]


@pytest.mark.parametrize(("case", "name", "content"), GOOD, ids=[c[0] for c in GOOD])
def test_awkward_but_valid_files_load(case, name, content, tmp_path):
    path = _write(tmp_path, name, content)
    data.check_source("alpaca", path, None)
    examples = data.load_examples("alpaca", path=path)
    assert examples[-1] == data.load_examples("alpaca", path=_write(tmp_path, "clean.json", json.dumps([ALPACA])))[0]
    assert "None" not in examples[0]["source"] and "\ufeff" not in examples[0]["source"]


def test_a_huge_single_line_loads(tmp_path):
    path = _write(tmp_path, "g.jsonl", json.dumps({"text": "### Human: hi### Assistant: " + "x" * 5_000_000}))
    data.check_source("guanaco", path, None)
    assert len(data.load_examples("guanaco", path=path)[0]["target"]) > 5_000_000


def test_a_glob_that_matches_a_directory_names_it(tmp_path):
    # hh-rlhf's layout: data.path=<repo>/* matches the subset folders, not their train.jsonl.gz
    for subset in ("harmless-base", "helpful-base"):
        _write(tmp_path, f"{subset}/train.jsonl.gz", _gz(_jsonl([HH])))
    with pytest.raises(ValueError, match=rf"matches the directory {tmp_path}/harmless-base; make it match data files"):
        data.check_source("hh_rlhf", str(tmp_path / "*"), None)
    data.check_source("hh_rlhf", str(tmp_path / "*" / "train.jsonl.gz"), None)  # what it should have been


def test_a_glob_that_matches_nothing_and_a_tilde_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file matches"):
        data.check_source("alpaca", str(tmp_path / "nothing" / "*.json"), None)
    with pytest.raises(FileNotFoundError, match="'~' is not expanded here"):
        data.check_source("alpaca", "~/no-such-qpeft-file.json", None)


def test_a_fifo_or_a_device_is_not_read(tmp_path):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)  # reading it would block for ever
    with pytest.raises(ValueError, match=f"data file {fifo} is not a regular file"):
        data.check_source("alpaca", str(fifo), None)
    with pytest.raises(ValueError, match="data file /dev/null is not a regular file"):
        data.check_source("alpaca", "/dev/null", None)


def test_the_hub_route_checks_field_types_too(monkeypatch):
    monkeypatch.setattr(data, "_hub_rows", lambda hub_id: [ALPACA, {**ALPACA, "output": None}])
    with pytest.raises(ValueError, match="tatsu-lab/alpaca row 2: field 'output' is null"):
        data.load_examples("alpaca", hub_id="tatsu-lab/alpaca")


def test_check_source_of_52k_alpaca_rows_stays_fast(tmp_path):
    """The pre-flight reads and checks every row: Stanford Alpaca's 52,002 rows (26 MB) in ~0.15 s here."""
    rows = [
        {
            "instruction": f"Give three tips number {i}.",
            "input": "" if i % 3 else f"ctx {i}",
            "output": "Eat well." * 20,
        }
        for i in range(52_002)
    ]
    path = _write(tmp_path, "alpaca_data.json", json.dumps(rows, indent=4))
    start = time.perf_counter()
    data.check_source("alpaca", path, None)
    assert time.perf_counter() - start < 2.0


# ----------------------------------------------------------------------------------------------------------------
# Through the real entry point: one line, no model loaded, no record
# ----------------------------------------------------------------------------------------------------------------

CLI_CASES = [c for c in CASES if c[0] in {
    "null instruction", "numeric output", "non-UTF-8 JSON lines", "Git LFS pointer .jsonl.gz", "pretty-printed {data: [...]}",
    "hh-rlhf chosen without an Assistant turn", "truncated .gz", "not Parquet", "oasst1 unknown role",
}]  # fmt: skip


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for a bad data file")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(quant, "quantize_model", refuse)


def _one_error_line(qpeft_cli, tmp_path: Path, *overrides: str) -> str:
    code, output = qpeft_cli(*overrides, f"output_root={tmp_path / 'runs'}")
    assert code != 0
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, output
    assert not list(tmp_path.rglob(results.RECORD))
    return errors[0]


@pytest.mark.parametrize(("case", "fmt", "name", "content", "message"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_a_hostile_data_file_is_one_line_before_any_model_is_loaded(
    case, fmt, name, content, message, tmp_path, qpeft_cli, no_model
):
    path = _write(tmp_path, name, content)
    line = _one_error_line(qpeft_cli, tmp_path, f"data.format={fmt}", f"data.path={path}")
    assert message.format(f=path) in line


def test_a_glob_over_directories_and_a_fifo_are_one_line(tmp_path, qpeft_cli, no_model):
    _write(tmp_path, "d/helpful-base/train.jsonl.gz", _gz(_jsonl([HH])))
    line = _one_error_line(qpeft_cli, tmp_path, "data.format=hh_rlhf", f"data.path={tmp_path}/d/*")
    assert f"matches the directory {tmp_path}/d/helpful-base" in line
    os.mkfifo(tmp_path / "rows.jsonl")  # the run id's fingerprint must not block on it either
    line = _one_error_line(qpeft_cli, tmp_path, f"data.path={tmp_path}/rows.jsonl")
    assert f"data file {tmp_path}/rows.jsonl is not a regular file" in line


# ----------------------------------------------------------------------------------------------------------------
# Calibration text (calib=text, calib.path)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("Some text.\nCaf\xe9.\n".encode("latin-1"), "line 2 (byte offset 14): byte 0xe9 is not UTF-8"),
        (b"", "holds no text"),
        (b" \n\t\n", "holds no text (4 bytes of whitespace)"),
        (LFS.encode(), "is a Git LFS pointer, not the data; run `git lfs pull`"),
        ("text".encode("utf-16"), "is UTF-16 text, not UTF-8"),
    ],
    ids=["latin-1", "empty", "whitespace", "lfs pointer", "utf-16"],
)
def test_calibration_text_that_is_not_usable_is_one_line(content, message, tmp_path):
    path = _write(tmp_path, "calib.txt", content)
    with pytest.raises(ValueError) as caught:
        calibration.check_text(path)
    assert str(caught.value).startswith(f"calibration text file {path!r}") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_calibration_text_reads_utf8_with_a_bom_and_refuses_a_directory(tmp_path):
    path = _write(tmp_path, "calib.txt", "\ufeffCalibration text.\n")
    assert calibration.read_text(path) == ["Calibration text.\n"]
    with pytest.raises(ValueError, match="is not a regular file"):
        calibration.check_text(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        calibration.check_text(str(tmp_path / "nope.txt"))


# ----------------------------------------------------------------------------------------------------------------
# The converter (qpeft-bench-data)
# ----------------------------------------------------------------------------------------------------------------


def _mmlu(tmp: Path, test_csv: bytes) -> Path:
    _write(tmp, "data/dev/anatomy_dev.csv", "What is bone?,a,b,c,d,A\n")
    _write(tmp, "data/test/anatomy_test.csv", test_csv)
    return tmp / "data"


@pytest.mark.parametrize(
    ("test_csv", "message"),
    [
        ("Caf\xe9?,a,b,c,d,A\n".encode("latin-1"), "anatomy_test.csv line 1 (byte offset 3): byte 0xe9 is not UTF-8"),
        (LFS.encode(), "anatomy_test.csv is a Git LFS pointer"),
        (b"question,A,B,C,D,answer\nQ?,a,b,c,d,A\n", "answer 'answer' is not one of A, B, C, D (a header row?"),
        (b'"Q?,' + b"x" * 200_000 + b"\n", "anatomy_test.csv:1: not a readable CSV row"),
    ],
    ids=["latin-1", "lfs pointer", "header", "unclosed quote"],
)
def test_the_converter_names_a_bad_csv(test_csv, message, tmp_path):
    with pytest.raises(convert.ConvertError, match=re.escape(message)):
        convert.convert_mmlu(_mmlu(tmp_path, test_csv), tmp_path / "root")
    assert not (tmp_path / "root").exists()  # nothing half-done


def test_the_converter_drops_a_bom_and_refuses_a_file_as_source(tmp_path):
    source = _mmlu(tmp_path, "\ufeffWhat is a cell?,a,b,c,d,B\n".encode())
    convert.convert_mmlu(source, tmp_path / "root")
    row = json.loads((tmp_path / "root/cais/mmlu/anatomy/test.jsonl").read_text())
    assert row["question"] == "What is a cell?"
    with pytest.raises(convert.ConvertError, match="is a file, not a directory"):
        convert.convert_mmlu(source / "dev" / "anatomy_dev.csv", tmp_path / "root2")
    lfs = Path(_write(tmp_path, "wiki.test.raw", LFS))
    with pytest.raises(convert.ConvertError, match="wiki.test.raw is a Git LFS pointer"):
        convert.convert_wikitext(lfs, tmp_path / "root3")


@pytest.mark.parametrize("where", ["a_file/root", "/proc/qpeft-no-such/root"], ids=["under a file", "under /proc"])
def test_the_converter_command_fails_in_one_line_for_an_unwritable_destination(where, tmp_path):
    (tmp_path / "a_file").write_text("")
    raw = Path(_write(tmp_path, "wiki.test.raw", " = T = \n"))
    dest = tmp_path / where if not where.startswith("/") else Path(where)
    run = [sys.executable, "-m", "qpeft_bench.convert", "wikitext", str(raw), str(dest)]
    bad = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert f"cannot write {dest}/wikitext/wikitext-2-raw-v1/test.jsonl" in bad.stderr


def test_the_converter_command_names_an_empty_directory_and_a_non_utf8_csv(tmp_path):
    (tmp_path / "empty").mkdir()
    run = [sys.executable, "-m", "qpeft_bench.convert", "mmlu"]
    bad = subprocess.run([*run, str(tmp_path / "empty"), str(tmp_path / "r")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "no *_dev.csv files" in bad.stderr
    source = _mmlu(tmp_path, "Caf\xe9?,a,b,c,d,A\n".encode("latin-1"))
    bad = subprocess.run([*run, str(source), str(tmp_path / "r")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "is not UTF-8" in bad.stderr, bad.stderr
