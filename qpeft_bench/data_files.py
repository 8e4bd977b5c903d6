"""Reading data files: what is on disk (JSON, JSON lines, Parquet, .gz, globs) to raw rows, or one line that names
the file and what is wrong with it. data.py checks the rows against their format; calibration texts and the
converter's CSVs share `decode_utf8`. Each error says what the file is (not UTF-8 at a line and byte offset, a Git LFS
pointer, not gzip, truncated, not Parquet, one JSON object where a list of rows is expected, ...)."""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import re
import zlib
from pathlib import Path

from qpeft_bench.data_formats import Row, describe

LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"  # what a Git LFS file is before `git lfs pull`
_GZIP_MAGIC, _PARQUET_MAGIC = b"\x1f\x8b", b"PAR1"
SUFFIXES = (".json", ".jsonl", ".parquet")  # each optionally .gz (not .parquet)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def resolve_files(path: str) -> list[Path]:
    """The files `path` names (a file or a glob), or FileNotFoundError / ValueError naming what it matched instead."""
    if glob.has_magic(path):
        files = [Path(p) for p in sorted(glob.glob(path))]
        if not files:
            raise FileNotFoundError(f"no data file matches {path!r}")
        # A directory among the matches is an error, not skipped: data.path=hh-rlhf/* matches the subset folders,
        # and skipping them would train on whatever else matched (or nothing) without a word.
        if folders := [f for f in files if f.is_dir()]:
            raise ValueError(
                f"data.path {path!r} matches the directory {folders[0]}; make it match data files only, "
                "e.g. end it with their suffix (*.jsonl.gz) or name (*/train.jsonl.gz)"
            )
        return files
    file = Path(path)
    if not file.exists():
        hint = "; '~' is not expanded here: write the full path" if path.startswith("~") else ""
        raise FileNotFoundError(
            f"data file not found: {path} (set data.path to an existing file, or data.path=null to use data.hub_id)"
            + hint
        )
    if file.is_dir():
        raise ValueError(f"data path {path} is a directory; give a file or a glob such as {path}/*.jsonl")
    return [file]


def is_lfs_pointer(path: Path) -> bool:
    """A Git LFS pointer file (a clone without `git lfs pull`): ~130 bytes of text where the data or weights should be."""
    try:
        with open(path, "rb") as f:
            return f.read(len(LFS_POINTER)) == LFS_POINTER
    except OSError:
        return False


def lfs_pointer_error(where: object) -> ValueError:
    return ValueError(f"{where} is a Git LFS pointer, not the data; run `git lfs pull` in its repository")


def decode_utf8(raw: bytes, where: object) -> str:
    """`raw` as text (a leading UTF-8 BOM dropped, as editors on Windows write one), or a one-line ValueError naming
    `where`, and for bytes that are not UTF-8 their line and byte offset. Also used for calibration texts and CSVs."""
    if raw.startswith(LFS_POINTER):
        raise lfs_pointer_error(where)
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ValueError(
            f"{where} is UTF-16 text, not UTF-8 (it starts with a UTF-16 byte-order mark); save it as UTF-8"
        )
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = skip + err.start
        line = raw.count(b"\n", 0, at) + 1
        raise ValueError(
            f"{where} line {line} (byte offset {at}): byte 0x{raw[at]:02x} is not UTF-8 text; save the file as UTF-8"
        ) from None


def _loads(text: str, where: Path, line: int | None = None) -> object:
    """json.loads, or a one-line ValueError naming the line (of the file, for a JSON lines row)."""
    at = "" if line is None else f" line {line}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{where} line {line or err.lineno}: malformed JSON ({err.msg} at column {err.colno})"
        ) from None
    except RecursionError:  # thousands of nested brackets
        raise ValueError(f"{where}{at}: JSON nested too deeply to read") from None
    except ValueError as err:  # an integer of more than 4300 digits
        raise ValueError(f"{where}{at}: unreadable JSON ({str(err).split(';')[0]})") from None


def _parse_json_lines(text: str, where: Path) -> tuple[list[Row], list[int]]:
    rows, lines = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append(_loads(line, where, lineno))
            lines.append(lineno)
    return rows, lines


def row_label(where: object, number: int, lines: list[int] | None) -> str:
    """'<file> row 7', with '(line 9)' added where blank lines make a JSON lines row's line differ from its number."""
    line = lines[number - 1] if lines else number
    return f"{where} row {number}" + (f" (line {line})" if line != number else "")


def _has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, list) and any(_has_lone_surrogate(v) for v in value)


def _check_surrogates(rows: list, lines: list[int] | None, where: Path) -> None:
    # A JSON escape (\ud800) can make a string that is not Unicode text, which tokenizers refuse with an error that
    # names nothing; UTF-8 bytes never do. Run only on files holding such escapes (an escaped emoji pair is fine).
    for number, row in enumerate(rows, start=1):
        bad = [key for key, value in row.items() if _has_lone_surrogate(value)] if isinstance(row, dict) else []
        if bad:
            raise ValueError(
                f"{row_label(where, number, lines)}: field {bad[0]!r} holds a lone UTF-16 surrogate (a \\ud800-\\udfff "
                "escape without its pair), which is not text; fix the escape"
            )


def not_a_list(document: object, where: Path) -> ValueError:
    """The error for a file holding one object or scalar where rows are expected: what it holds, and its keys."""
    if isinstance(document, dict):
        keys = ", ".join(list(document)[:5]) + (", ..." if len(document) > 5 else "") or "none"
        lists = [k for k, v in document.items() if isinstance(v, list)]
        hint = f" (write the list under {lists[0]!r} alone)" if lists else ""
        what = f"one JSON object with keys {keys}"
    else:
        what, hint = f"{describe(document)} alone", ""
    return ValueError(f"{where} holds {what}; expected a JSON list of rows or JSON lines{hint}")


def _parse_json(text: str, where: Path) -> tuple[list[Row], list[int] | None]:
    """(rows, their line numbers for JSON lines, else None). A file that opens with "[" is one JSON list
    (alpaca_data.json); anything else is JSON lines, which is also what many hub ".json" files really are."""
    if text.lstrip().startswith("["):
        return _loads(text, where), None
    try:
        rows, lines = _parse_json_lines(text, where)
    except ValueError:
        # Not JSON lines: a pretty-printed object ({"data": [...]}) or scalar says what it is, any other file
        # gets the JSON lines error (the first bad line).
        first = text.lstrip().split("\n", 1)[0]
        try:
            json.loads(first)
        except json.JSONDecodeError:
            raise not_a_list(_loads(text, where), where) from None
        except (ValueError, RecursionError):
            pass  # the JSON lines error names the line
        raise
    if len(rows) == 1 and not isinstance(rows[0], dict):
        raise not_a_list(rows[0], where)
    return rows, lines


def _read_parquet(file: Path, size: int) -> list[Row]:
    import pyarrow as pa  # lazy: only parquet files need it
    import pyarrow.parquet as pq

    with open(file, "rb") as handle:
        head = handle.read(len(LFS_POINTER))
        handle.seek(max(0, size - len(_PARQUET_MAGIC)))
        tail = handle.read()
    if head.startswith(LFS_POINTER):
        raise lfs_pointer_error(f"data file {file}")
    if not (head.startswith(_PARQUET_MAGIC) and tail == _PARQUET_MAGIC):
        raise ValueError(
            f"data file {file} is not a Parquet file (no PAR1 marker at its start and end: truncated, or another "
            f"format named .parquet; it starts with {head[:16]!r})"
        )
    try:
        return pq.read_table(file).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"data file {file} is not readable Parquet ({str(err).splitlines()[0]})") from None


def _gunzip(raw: bytes, file: Path) -> bytes:
    if raw.startswith(LFS_POINTER):  # the usual .gz that is not gzip
        raise lfs_pointer_error(f"data file {file}")
    if not raw.startswith(_GZIP_MAGIC):
        raise ValueError(f"data file {file} is named .gz but is not gzip data (it starts with {raw[:16]!r})")
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise ValueError(f"data file {file} is truncated: its gzip data ends early (an interrupted copy?)") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"data file {file} holds corrupt gzip data ({err})") from None


def read_file(file: Path) -> tuple[list[Row], list[int] | None]:
    """(rows, their line numbers for JSON lines, else None), or a one-line ValueError naming the file."""
    if not file.is_file():  # a FIFO or a device: read once here, it would be gone for load_examples
        raise ValueError(f"data file {file} is not a regular file")
    name = file.name.removesuffix(".gz")
    if not name.endswith(SUFFIXES) or file.name.endswith(".parquet.gz"):
        raise ValueError(
            f"data file {file}: data.path reads .json, .jsonl (JSON lines) or .parquet files, .json and .jsonl "
            "optionally .gz; convert it to one of those in the hub dataset's columns"
        )
    try:
        size = file.stat().st_size
        if size == 0:
            raise ValueError(f"data file {file} is empty")
        if file.name.endswith(".parquet"):
            return _read_parquet(file, size), None
        raw = file.read_bytes()
    except OSError as err:
        raise ValueError(f"data file {file} cannot be read ({err.strerror or err})") from None
    where = f"data file {file}"
    if file.name.endswith(".gz"):
        raw, where = _gunzip(raw, file), f"data file {file} (decompressed)"
    elif raw.startswith(_GZIP_MAGIC):
        raise ValueError(f"data file {file} is gzip-compressed; name it {file.name}.gz")
    if raw.startswith(_PARQUET_MAGIC):
        raise ValueError(f"data file {file} is a Parquet file; name it {name.rsplit('.', 1)[0]}.parquet")
    text = decode_utf8(raw, where)
    rows, lines = _parse_json(text, file)
    if _SURROGATE_ESCAPE.search(text):
        _check_surrogates(rows, lines, file)
    return rows, lines
