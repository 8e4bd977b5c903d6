"""Issue 19, item 4: evaluation files are checked at compose time, deeply, before any model is loaded — every file a
selected task reads exists and its first rows have the columns and types the task reads (one line naming the file,
the row, the expected and the found columns); splits a task does not read are not required; a local WikiText file
that is missing or in another schema fails at compose time too, not after quantization or training.

The files are written here in the formats a user really has: MMLU rows as the original CSVs' columns (question, A,
B, C, D, answer letter), the raw WikiText file, JSON lines with a wrong column name."""

from __future__ import annotations

import json
import shutil

import pytest

from qpeft_bench import ASSETS, models
from qpeft_bench.config import ConfigError
from qpeft_bench.evaluation import harness, local_data
from qpeft_bench.spec import validate

FIX = harness.FIXTURES
SUBJECT = "abstract_algebra"


@pytest.fixture
def root(tmp_path):
    """A writable copy of the shipped fixtures (the hub's schemas), to damage one file at a time."""
    shutil.copytree(FIX, tmp_path / "data")
    return tmp_path / "data"


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the evaluation data was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "load_tokenizer", refuse)


def test_mmlu_rows_in_the_original_csv_columns_are_refused_naming_file_row_and_columns(compose, root, monkeypatch):
    _no_model_loads(monkeypatch)
    test = root / "cais" / "mmlu" / SUBJECT / "test.jsonl"
    original = [
        {"question": r["question"], **dict(zip("ABCD", r["choices"], strict=True)), "answer": "ABCD"[r["answer"]]}
        for r in _rows(test)
    ]
    _write(test, original)
    with pytest.raises(ConfigError) as err:
        validate(compose(["eval=mmlu", f"eval.data_root={root}"]))
    msg = str(err.value)
    assert str(test) in msg and "row 1" in msg and "split test" in msg
    assert "['answer', 'choices', 'question', 'subject']" in msg  # the hub's schema, from the fixtures
    assert "['A', 'B', 'C', 'D', 'answer', 'question']" in msg and "missing ['choices', 'subject']" in msg
    assert "\n" not in msg  # one line


def test_a_column_of_the_wrong_type_is_refused(compose, root):
    dev = root / "cais" / "mmlu" / SUBJECT / "dev.jsonl"
    rows = _rows(dev)
    rows[2]["answer"] = "C"  # the CSV's letter where the hub has the index
    _write(dev, rows)
    with pytest.raises(
        ConfigError,
        match=r"dev.jsonl \(lm-eval task mmlu_abstract_algebra, split dev\) row 3: column "
        r"'answer' is a string \('C'\), the hub's schema has a number",
    ):
        validate(compose(["eval=mmlu", f"eval.data_root={root}"]))


def test_a_target_outside_the_choices_is_refused_through_the_tasks_own_template(root):
    test = root / "allenai" / "ai2_arc" / "ARC-Easy" / "test.jsonl"
    rows = _rows(test)
    rows[0]["answerKey"] = "Z"  # a key none of the choices has: the task's target template fails on it
    _write(test, rows)
    with pytest.raises(
        ConfigError,
        match=r"ARC-Easy/test.jsonl \(lm-eval task arc_easy, split test\) row 1: lm-eval "
        r"cannot build the task's prompt",
    ):
        local_data.check_rows("commonsense", root)


def test_process_docs_failures_name_the_file(root):
    val = root / "Rowan" / "hellaswag" / "default" / "validation.jsonl"
    rows = [{k: v for k, v in r.items() if k != "ctx_a"} for r in _rows(val)]
    _write(val, rows)
    with pytest.raises(ConfigError, match=r"hellaswag/default/validation.jsonl .*missing \['ctx_a'\]"):
        local_data.check_rows("commonsense", root)


def test_empty_and_non_json_files_are_refused(root):
    test = root / "allenai" / "openbookqa" / "main" / "test.jsonl"
    test.write_text("")
    with pytest.raises(ConfigError, match=r"openbookqa/main/test.jsonl .* is empty"):
        local_data.check_rows("commonsense", root)
    test.write_text("question,A,B,C,D,answer\n")  # a CSV under a .jsonl name
    with pytest.raises(ConfigError, match=r"test.jsonl line 1: not JSON"):
        local_data.check_rows("commonsense", root)
    test.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(128, 256)))  # gzip bytes under a .jsonl name
    with pytest.raises(ConfigError, match=r"test.jsonl cannot be read as JSON lines \(UnicodeDecodeError"):
        local_data.check_rows("commonsense", root)


def test_splits_a_task_does_not_read_are_not_required(root):
    # commonsense runs at 0 shots: lm-eval reads only the evaluated split (test, else validation)
    tm = harness.set_task_manager("commonsense")
    for spec in harness.task_specs("commonsense"):
        config = harness.task_config(tm, spec.task)
        reads = set(harness.local_files(config, root, 0).values())
        for path in harness.local_files(config, root).values():
            if path not in reads:
                path.unlink(missing_ok=True)
    assert harness.check_local_data("commonsense", root) == root
    local_data.check_rows("commonsense", root)
    # MMLU at 5 shots reads its test split and the dev split the shots come from, and needs both
    config = harness.task_config(harness.set_task_manager("mmlu"), f"mmlu_{SUBJECT}")
    assert harness.read_splits(config, 5) == {"test_split": "test", "fewshot_split": "dev"}
    assert harness.read_splits(config, 0) == {"test_split": "test"}
    (root / "cais" / "mmlu" / SUBJECT / "dev.jsonl").unlink()
    with pytest.raises(ConfigError, match=f"{SUBJECT}/dev.jsonl"):
        harness.check_local_data("mmlu", root)


def test_zero_shot_runs_without_the_unread_splits(root):
    """The same numbers as with every split present: at 0 shots nothing is drawn from the few-shot source."""
    path = str(ASSETS / "tiny_llama")
    model, tok = models.load_model(path, "float32", "cpu").eval(), models.load_tokenizer(path)
    kwargs = dict(batch_size=1, device="cpu", limit=2)
    full = harness.run_task_set(model, tok, "commonsense", data_root=FIX, **kwargs)
    tm = harness.set_task_manager("commonsense")
    for spec in harness.task_specs("commonsense"):
        config = harness.task_config(tm, spec.task)
        reads = set(harness.local_files(config, root, 0).values())
        for p in set(harness.local_files(config, root).values()) - reads:
            p.unlink()
    part = harness.run_task_set(model, tok, "commonsense", data_root=root, **kwargs)
    assert {t: (e["value"], e["split"]) for t, e in part["tasks"].items()} == {
        t: (e["value"], e["split"]) for t, e in full["tasks"].items()
    }


def test_wikitext_is_checked_at_compose_time(compose, tmp_path, monkeypatch):
    _no_model_loads(monkeypatch)
    # through eval.data_root: <root>/wikitext/wikitext-2-raw-v1/test.jsonl must be there
    with pytest.raises(ConfigError, match=r"ppl_wikitext: .*wikitext/wikitext-2-raw-v1/test.jsonl does not exist"):
        validate(compose(["eval=ppl_wikitext", f"eval.data_root={tmp_path}"]))
    wrong = tmp_path / "wiki.jsonl"
    _write(wrong, [{"content": " = Robert Boulter = \n"}])  # not the hub's "text" column
    with pytest.raises(ConfigError, match=r"wiki.jsonl row 1: missing field\(s\) text"):
        validate(compose(["eval=ppl_wikitext", f"eval.wikitext.path={wrong}"]))
    blank = tmp_path / "wiki.test.raw"
    blank.write_text("\n \n")
    with pytest.raises(ConfigError, match="holds no text"):
        validate(compose(["eval=ppl_wikitext", f"eval.wikitext.path={blank}"]))
    raw = tmp_path / "wiki.test.raw"  # the raw file as distributed: " = Title = " lines, blank lines between
    raw.write_text(" \n = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor .\n")
    assert validate(compose(["eval=ppl_wikitext", f"eval.wikitext.path={raw}"])).eval.wikitext.path == str(raw)
