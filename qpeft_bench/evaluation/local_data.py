"""The local files of an lm-eval task set, read the way the task will read them, before any model is loaded.

`harness.check_local_data` finds the files that are missing; this module opens the ones that are there and runs
the first rows of each through the task's own definition: its `process_docs`, then its `doc_to_text`,
`doc_to_choice` and `doc_to_target` read as lm-eval's ConfigurableTask reads them (`_field`, in lm-eval's jinja
environment), and checks what a multiple-choice or generation task needs of them (a list of strings to choose from, a target that indexes it). A
file in another schema (MMLU's CSV columns, a missing `choices`) then fails at compose time with one line naming
the file and row, the columns the task reads and the columns found, instead of after quantization inside jinja.

Which columns the task reads, and their JSON types: those of the same file in the shipped fixtures
(qpeft_bench/assets/eval_fixtures, the hub's schema) where there is one, else the variables of its templates.
"""

from __future__ import annotations

import ast
import functools
import json
from pathlib import Path

from qpeft_bench.config import ConfigError
from qpeft_bench.evaluation.harness import FIXTURES, leaf_tasks, local_files, set_task_manager, task_config, task_specs

ROWS = 5  # rows checked per file: a file in the wrong schema fails on its first row, a mixed one rarely later
FIELDS = ("doc_to_text", "doc_to_choice", "doc_to_target")


def check_rows(task_set: str, root: Path) -> None:
    """Every file the set reads under `root` (already known to exist) renders through its task; raises ConfigError."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's loader: includes merged, !function resolved

    tm = set_task_manager(task_set)
    for spec in task_specs(task_set):
        for task in leaf_tasks(tm, spec.task):
            config = load_yaml(tm.task_index[task].yaml_path, resolve_func=True)
            files = local_files(task_config(tm, task), root, spec.num_fewshot)
            for split, path in files.items():
                _check_file(task, split, path, config, root)


def _check_file(task: str, split: str, path: Path, config: dict, root: Path) -> None:
    rows = _first_rows(path)
    found = sorted(rows[0]) if rows else []
    schema = _schema_row(path, root)
    expected = sorted(schema) if schema else _template_columns(config)
    where = f"{path} (lm-eval task {task}, split {split})"
    if not rows:
        raise ConfigError(f"{where} is empty; it needs JSON lines with the columns {expected}")
    for number, row in enumerate(rows, 1):
        missing = [c for c in expected if c not in row] if isinstance(expected, list) else []
        if missing:
            raise ConfigError(
                f"{where} row {number}: the task reads columns {expected}, the file has {sorted(row)} (missing "
                f"{missing}); write it in the hub dataset's schema (qpeft-bench-data converts MMLU's CSVs and "
                "lm-eval caches, docs/evaluation.md)"
            )
        for column, want in (schema or {}).items():
            if None not in (_kind(want), _kind(row[column])) and _kind(want) != _kind(row[column]):
                raise ConfigError(
                    f"{where} row {number}: column {column!r} is a {_kind(row[column])} ({row[column]!r:.40}), the "
                    f"hub's schema has a {_kind(want)} there (as in {want!r:.40})"
                )
    docs = rows
    if config.get("process_docs") is not None:
        import datasets
        from datasets.utils import logging as ds_logging

        shown = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()  # a "Map" bar per file, for five rows, says nothing
        try:
            docs = list(config["process_docs"](datasets.Dataset.from_list(rows)))
        except Exception as err:  # the task's own Python: any failure means it cannot read this file
            raise ConfigError(
                f"{where}: the task's process_docs fails on the first rows ({type(err).__name__}: {err}); it reads "
                f"columns {expected}, the file has {found}"
            ) from err
        finally:
            if shown:
                ds_logging.enable_progress_bar()
    features = list(docs[0]) if docs else []
    for number, doc in enumerate(docs, 1):
        try:
            _check_doc(doc, config, features)
        except Exception as err:  # jinja's UndefinedError, KeyError, TypeError, ...: one line, the file and row
            raise ConfigError(
                f"{where} row {number}: lm-eval cannot build the task's prompt from it ({type(err).__name__}: {err});"
                f" the task reads columns {expected}, the file has {found}"
            ) from err


def _first_rows(path: Path) -> list[dict]:
    try:
        return _read_first_rows(path)
    except (OSError, UnicodeDecodeError) as err:  # unreadable, or not text at all
        raise ConfigError(f"{path} cannot be read as JSON lines ({type(err).__name__}: {err})") from err


def _read_first_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ConfigError(f"{path} line {number}: not JSON ({err}); expected JSON lines") from err
            if not isinstance(row, dict):
                raise ConfigError(f"{path} line {number}: expected a JSON object, found {type(row).__name__}")
            rows.append(row)
            if len(rows) == ROWS:
                break
    return rows


def _schema_row(path: Path, root: Path) -> dict | None:
    """The first row of the same file in the shipped fixtures (the hub's schema), or None where there is none."""
    fixture = FIXTURES / path.relative_to(root)
    if not fixture.is_file() or fixture.resolve() == path.resolve():
        return None
    rows = _first_rows(fixture)
    return rows[0] if rows else None


def _template_columns(config: dict) -> list[str] | str:
    """The variables of the task's templates: the columns it reads, where no Python of its own reads others."""
    from jinja2 import meta
    from lm_eval.utils import env

    names = set()
    for field in FIELDS:
        value = config.get(field)
        if isinstance(value, str):
            names |= meta.find_undeclared_variables(env.parse(value)) if "{" in value else {value}
    if config.get("process_docs") is not None or not names:
        return f"those its process_docs and templates read ({', '.join(sorted(names)) or 'in Python'})"
    return sorted(names)


def _kind(value) -> str | None:
    """A JSON value's type, as a schema compares them (null matches anything)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    return {int: "number", float: "number", str: "string", list: "list", dict: "object"}.get(type(value), "value")


@functools.cache
def _template(source: str):
    from lm_eval.utils import env  # lm-eval's own jinja environment (StrictUndefined, its filters)

    return env.from_string(source)


def _field(value, doc: dict, features: list[str], has_choices: bool):
    """One doc_to_* field on one doc, as lm-eval 0.4's ConfigurableTask.doc_to_text/_target/_choice read it: a
    column's name reads the column, another string is a jinja template (a number, or a list literal, when it
    renders as one), a function is called; ints, lists and dicts are literal."""
    if isinstance(value, str):
        if value in features:
            return doc[value]
        text = _template(value).render(**doc)
        if text.isdigit() and has_choices:
            return ast.literal_eval(text)
        if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
            try:
                return ast.literal_eval(text)
            except (SyntaxError, ValueError):
                return text
        return text
    if isinstance(value, dict):
        return list(value.values())
    return value(doc) if callable(value) else value


def _check_doc(doc: dict, config: dict, features: list[str]) -> None:
    has_choices = config.get("doc_to_choice") is not None
    text = _field(config.get("doc_to_text"), doc, features, has_choices)
    if not isinstance(text, (str, int)):
        raise TypeError(f"doc_to_text gives a {type(text).__name__}, not text")
    target = _field(config.get("doc_to_target"), doc, features, has_choices)
    if config.get("output_type") != "multiple_choice":
        return
    choices = _field(config.get("doc_to_choice"), doc, features, has_choices)
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise TypeError(f"doc_to_choice gives {choices!r}, not a list of strings")
    if isinstance(text, int):  # lm-eval's "multiple input" form (winogrande): the text picks the right context
        if not 0 <= text < len(choices) or not isinstance(target, str):
            raise ValueError(f"doc_to_text gives index {text} of {len(choices)} contexts, doc_to_target {target!r}")
        return
    for t in target if isinstance(target, list) else [target]:
        if isinstance(t, bool) or not (isinstance(t, int) and 0 <= t < len(choices) or t in choices):
            raise ValueError(f"the target {t!r} is neither an index into nor one of the {len(choices)} choices")
