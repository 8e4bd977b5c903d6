"""`qpeft-bench-data`: benchmark files from their original distributions into the local layout the evaluation reads
(`<data_root>/<dataset_path>/<config or "default">/<split>.jsonl` in the hub dataset's columns; docs/evaluation.md).

    qpeft-bench-data mmlu  <mmlu data/ folder> <data_root>       the original CSVs: {dev,val,test}/<subject>_<split>.csv
    qpeft-bench-data wikitext <wiki.test.raw> <data_root>         a raw WikiText file (--variant, --split)
    qpeft-bench-data cache <task set> <data_root>                 every file a task set reads, from the datasets cache

MMLU's original CSVs (hendrycks/test `data.tar`) have no header and six columns: question, the choices A, B, C, D
and the answer letter; the hub's `cais/mmlu` rows are {question, subject, choices: [A, B, C, D], answer: 0-3}. The
raw WikiText rows are the file's lines with their newline kept and blank lines as "" (the hub builder's rows), so
a converted file evaluates to exactly the text the raw file does. `cache` reads each split through `datasets`
offline (HF_DATASETS_OFFLINE=1): whatever a `datasets` cache or hub snapshot on this machine holds. A file that
is already there is replaced only with --overwrite; each output is written whole to a temporary file first.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path

from qpeft_bench.data_files import decode_utf8
from qpeft_bench.results import follow_umask

MMLU_SPLITS = {"dev": "dev", "val": "validation", "test": "test"}  # original folder -> the hub's split name
LETTERS = "ABCD"


class ConvertError(ValueError):
    """A source file that is not in the documented format: names the file and row."""


def _write_jsonl(rows: list[dict], out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} exists; pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    except OSError as err:  # under a regular file, /proc, a read-only mount
        raise ConvertError(f"cannot write {out} ({err.strerror}: {err.filename}); choose another data_root") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        follow_umask(tmp)  # mkstemp's 0600 would survive the rename
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_text(file: Path) -> str:
    """A source file's text (a leading BOM dropped); ConvertError naming it for a Git LFS pointer or bytes that are
    not UTF-8 (with their line and byte offset)."""
    if not file.is_file():
        raise ConvertError(f"{file} {'is not a regular file' if file.exists() else 'does not exist'}")
    try:
        return decode_utf8(file.read_bytes(), file)
    except ValueError as err:
        raise ConvertError(str(err)) from None


def mmlu_rows(file: Path, subject: str) -> list[dict]:
    """The rows of one original MMLU CSV in the hub's schema; raises ConvertError naming the file and row."""
    rows = []
    reader = csv.reader(io.StringIO(_read_text(file), newline=""))
    try:
        records = list(reader)
    except csv.Error as err:  # e.g. a field over csv's size limit: a binary file or a quote never closed
        raise ConvertError(f"{file}:{reader.line_num}: not a readable CSV row ({err})") from None
    for number, fields in enumerate(records, start=1):
        if len(fields) != 6:
            raise ConvertError(
                f"{file}:{number}: {len(fields)} columns; an original MMLU CSV row has 6 "
                "(question, A, B, C, D, answer letter) and no header"
            )
        answer = fields[5].strip()
        if answer not in LETTERS:
            header = " (a header row? the original CSVs have none)" if number == 1 else ""
            raise ConvertError(f"{file}:{number}: answer {answer!r} is not one of A, B, C, D{header}")
        rows.append(
            {"question": fields[0], "subject": subject, "choices": fields[1:5], "answer": LETTERS.index(answer)}
        )
    if not rows:
        raise ConvertError(f"{file}: no rows")
    return rows


def convert_mmlu(source: Path, root: Path, overwrite: bool = False) -> dict[str, int]:
    """{split: questions} written under <root>/cais/mmlu/<subject>/<split>.jsonl from the original data/ folder."""
    if source.exists() and not source.is_dir():  # (a missing one gets "no *_dev.csv files" below)
        raise ConvertError(f"{source} is a file, not a directory (expected the MMLU data/ folder, with dev/ and test/)")
    counts: dict[str, int] = {}
    subjects: dict[str, set[str]] = {}
    outputs = []  # every file read and checked before the first is written: a bad row leaves nothing half-done
    for folder, split in MMLU_SPLITS.items():
        files = sorted((source / folder).glob(f"*_{folder}.csv"))
        if not files and folder != "val":  # val is not read by the 5-shot protocol (test, shots from dev)
            raise ConvertError(f"{source / folder}: no *_{folder}.csv files (expected the MMLU data/ folder)")
        for file in files:
            subject = file.name[: -len(f"_{folder}.csv")]
            rows = mmlu_rows(file, subject)
            outputs.append((rows, root / "cais" / "mmlu" / subject / f"{split}.jsonl"))
            counts[split] = counts.get(split, 0) + len(rows)
            subjects.setdefault(split, set()).add(subject)
    if subjects.get("dev") != subjects.get("test"):
        only = sorted(subjects.get("dev", set()) ^ subjects.get("test", set()))
        raise ConvertError(f"{source}: subjects {only} have a dev or a test file but not both")
    existing = [str(out) for _, out in outputs if out.exists()]
    if existing and not overwrite:
        raise ConvertError(
            f"{existing[0]} exists ({len(existing)} of the outputs do); pass --overwrite to replace them"
        )
    for rows, out in outputs:
        _write_jsonl(rows, out, overwrite=True)
    return {**counts, "subjects": len(subjects["test"])}


def convert_wikitext(
    raw: Path, root: Path, variant: str = "wikitext-2-raw-v1", split: str = "test", overwrite: bool = False
) -> Path:
    """<root>/wikitext/<variant>/<split>.jsonl from a raw WikiText file (wiki.test.raw)."""
    from qpeft_bench.evaluation.perplexity import _raw_rows  # the one definition of a raw file's rows

    _read_text(raw)  # a Git LFS pointer or bytes that are not UTF-8, named with their line
    rows = _raw_rows(raw)
    if not any(rows):
        raise ConvertError(f"{raw}: no text")
    out = root / "wikitext" / variant / f"{split}.jsonl"
    _write_jsonl([{"text": row} for row in rows], out, overwrite)
    return out


def convert_cache(task_set: str, root: Path, overwrite: bool = False) -> list[Path]:
    """Every split a task set reads, from the `datasets` cache on this machine, into the layout under `root`."""
    import datasets

    from qpeft_bench.evaluation import harness

    tm = harness.set_task_manager(task_set)
    written = []
    for spec in harness.task_specs(task_set):
        for task in harness.leaf_tasks(tm, spec.task):
            config = harness.task_config(tm, task)
            for split, out in harness.local_files(config, root).items():
                if out.exists() and not overwrite:
                    continue
                try:
                    rows = datasets.load_dataset(config["dataset_path"], config.get("dataset_name"), split=split)
                except Exception as err:  # what an offline machine without that cache gets
                    raise ConvertError(
                        f"{config['dataset_path']} ({config.get('dataset_name')}, {split}) for lm-eval task {task}: "
                        f"not readable from the datasets cache: {str(err).splitlines()[0]}"
                    ) from err
                _write_jsonl([dict(r) for r in rows], out, overwrite)
                written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qpeft-bench-data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("mmlu", help="the original MMLU CSVs (the data/ folder of data.tar)")
    p.add_argument("source", type=Path)
    p.add_argument("data_root", type=Path)
    p = sub.add_parser("wikitext", help="a raw WikiText file (wiki.test.raw)")
    p.add_argument("source", type=Path)
    p.add_argument("data_root", type=Path)
    p.add_argument("--variant", default="wikitext-2-raw-v1")
    p.add_argument("--split", default="test")
    p = sub.add_parser("cache", help="a task set's files from the datasets cache (offline)")
    p.add_argument("task_set", choices=["mmlu", "commonsense", "leaderboard"])
    p.add_argument("data_root", type=Path)
    for p in sub.choices.values():
        p.add_argument("--overwrite", action="store_true", help="replace files that are already there")
    args = parser.parse_args(argv)
    try:
        if args.command == "mmlu":
            counts = convert_mmlu(args.source, args.data_root, args.overwrite)
            print(
                f"mmlu: {counts['subjects']} subjects, "
                + ", ".join(f"{counts[s]} {s}" for s in counts if s != "subjects")
                + f" questions -> {args.data_root / 'cais' / 'mmlu'}"
            )
        elif args.command == "wikitext":
            out = convert_wikitext(args.source, args.data_root, args.variant, args.split, args.overwrite)
            print(f"wikitext: {args.source} -> {out}")
        else:
            written = convert_cache(args.task_set, args.data_root, args.overwrite)
            print(f"{args.task_set}: {len(written)} file(s) written under {args.data_root}")
    except (ConvertError, OSError) as err:
        print(f"qpeft-bench-data: {err}", file=sys.stderr)
        return 1
    print(f"use it with eval.data_root={args.data_root} (or QPEFT_EVAL_DATA={args.data_root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
