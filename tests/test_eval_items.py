"""Per-item evaluation results (issue 21): the items file beside the record (evaluation/items.py), what each task
keeps (per example, window or document), that the items give the record's numbers, and how runs, the base cache and
mode=eval write it."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import shutil
import stat

import pytest
import torch
from conftest import FAST

from qpeft_bench import ASSETS, eval_stage, evaluation, models, recipe, results
from qpeft_bench.config import EvalConfig, from_dict
from qpeft_bench.evaluation import harness, items
from qpeft_bench.evaluation.items import ItemsError
from qpeft_bench.evaluation.tasks import TASKS, EvalTask

RUN = ["eval=tiny_all", *FAST, "eval.tasks=[ppl_heldout,ppl_wikitext,mmlu,speed]"]
NLL = {"kind": "nll", "unit": "window", "ids": [0, 1, 2], "nll": [3.0, 4.5, 2.25], "tokens": [2, 3, 1]}
SCORES = {
    "kind": "scores",
    "leaves": {
        "mmlu_a": {"doc_ids": [0, 1], "scores": [1.0, 0.0]},
        "mmlu_b": {"doc_ids": [0, 1, 2, 3], "scores": [1.0, 1.0, 1.0, 0.0]},
        "piqa": {"doc_ids": [5, 7], "scores": [0.0, 0.0]},
    },
    "entries": {"mmlu": ["mmlu_a", "mmlu_b"], "piqa": ["piqa"]},
    "averages": {"average": ["mmlu", "piqa"], "average_4": ["mmlu"]},
}
STAGES = {"before": {"ppl_wikitext": NLL}, "after": {"ppl_wikitext": NLL, "leaderboard": SCORES}}


def _record(tmp_path, stages=STAGES, run_id="abc123") -> dict:
    record = {"run_id": run_id, "eval": {"items": items.write_items(tmp_path, run_id, stages)}}
    (tmp_path / results.RECORD).write_text(json.dumps(record))
    return record


# ---------------------------------------------------------------------------------------------------- the format
def test_round_trip_and_the_numbers_items_give(tmp_path):
    record = _record(tmp_path)
    data = (tmp_path / items.FILE).read_bytes()
    assert record["eval"]["items"] == {"file": items.FILE, "sha256": hashlib.sha256(data).hexdigest(), "version": 1}
    content = items.read_items(tmp_path / results.RECORD, record)
    assert content == {"format": items.FORMAT, "version": 1, "run_id": "abc123", "stages": STAGES}
    assert items.headline(NLL) == pytest.approx(2.718281828459045 ** (9.75 / 6), rel=1e-12)
    assert items.entry_value(SCORES, "mmlu") == (0.5 + 0.75) / 2  # unweighted over leaves, not over documents
    assert items.average(SCORES, "average") == items.headline(SCORES) == (0.625 + 0.0) / 2
    assert items.average(SCORES, "average_4") == 0.625
    result = {"tasks": {"mmlu": {"value": 0.625}, "piqa": {"value": 0.0}}, "average": 0.3125, "average_4": 0.625}
    assert items.mismatch(SCORES, result) is None
    assert "average_4" in items.mismatch(SCORES, {**result, "average_4": 0.6})
    assert "piqa" in items.mismatch(SCORES, {**result, "tasks": {**result["tasks"], "piqa": {"value": 0.5}}})
    assert items.mismatch(NLL, {"ppl": items.headline(NLL)}) is None and items.mismatch(NLL, 2.0) is not None
    assert items.read_items(tmp_path / results.RECORD, {"run_id": "abc123", "eval": {}}) is None  # an older run


def test_the_file_is_byte_stable(tmp_path):
    """Sorted keys and a gzip mtime of 0: the same items give the same bytes, whenever they are written."""
    items.write_items(tmp_path / "a", "r", STAGES)
    reordered = {"after": dict(reversed(STAGES["after"].items())), "before": STAGES["before"]}
    items.write_items(tmp_path / "b", "r", reordered)
    first, second = ((tmp_path / d / items.FILE).read_bytes() for d in "ab")
    assert first == second and first[4:8] == b"\0\0\0\0"  # gzip's MTIME field
    assert json.loads(gzip.decompress(first))["stages"] == STAGES


def test_the_file_gets_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o027)
    try:
        items.write_items(tmp_path, "r", STAGES)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / items.FILE).stat().st_mode) == 0o640


def _bad_shapes():
    def nll(**kw):
        return {"before": {"ppl_heldout": {**NLL, **kw}}}

    def leaf(**kw):
        return {"after": {"mmlu": {**SCORES, "leaves": {**SCORES["leaves"], "piqa": kw}}}}

    return {
        "unequal lengths": nll(nll=[1.0, 2.0]),
        "not finite": nll(nll=[1.0, float("nan"), 2.0]),
        "negative nll": nll(nll=[1.0, -2.0, 2.0]),
        "no tokens": nll(tokens=[1, 0, 2]),
        "float tokens": nll(tokens=[1, 2.0, 2]),
        "repeated id": nll(ids=[0, 1, 1]),
        "bool id": nll(ids=[0, True, 2]),
        "no ids": nll(ids=[], nll=[], tokens=[]),
        "unknown unit": nll(unit="sentence"),
        "unknown kind": {"after": {"ppl_heldout": {**NLL, "kind": "loss"}}},
        "string score": leaf(doc_ids=[0], scores=["1"]),
        "scores short": leaf(doc_ids=[0, 1], scores=[1.0]),
        "entry of an unknown leaf": {"after": {"mmlu": {**SCORES, "entries": {"mmlu": ["mmlu_x"]}}}},
        "average of an unknown entry": {"after": {"mmlu": {**SCORES, "averages": {"average": ["arc"]}}}},
        "no leaves": {"after": {"mmlu": {**SCORES, "leaves": {}}}},
        "stage not a mapping": {"after": [NLL]},
    }


@pytest.mark.parametrize("case", list(_bad_shapes()))
def test_a_malformed_shape_is_refused_when_written_and_when_read(case, tmp_path):
    stages = _bad_shapes()[case]
    with pytest.raises(ItemsError):
        items.write_items(tmp_path, "r", stages)
    assert not (tmp_path / items.FILE).exists()
    # the same content written by someone else, with a matching reference: read_items refuses it too
    content = {"format": items.FORMAT, "version": 1, "run_id": "r", "stages": stages}
    data = gzip.compress(json.dumps(content).encode(), mtime=0)
    (tmp_path / items.FILE).write_bytes(data)
    ref = {"file": items.FILE, "sha256": hashlib.sha256(data).hexdigest(), "version": 1}
    with pytest.raises(ItemsError):
        items.read_items(tmp_path / results.RECORD, {"run_id": "r", "eval": {"items": ref}})


def _forged(tmp_path, record, data: bytes) -> dict:
    """`data` as the items file, with the record's sha256 made to match (what only a broken writer would do)."""
    (tmp_path / items.FILE).write_bytes(data)
    return {**record, "eval": {"items": {**record["eval"]["items"], "sha256": hashlib.sha256(data).hexdigest()}}}


def _content(**changes) -> bytes:
    content = {"format": items.FORMAT, "version": 1, "run_id": "abc123", "stages": STAGES, **changes}
    return gzip.compress(json.dumps(content).encode(), mtime=0)


READ_ERRORS = {
    "missing": (lambda p, r: ((p / items.FILE).unlink(), r)[1], "is missing"),
    "a directory": (lambda p, r: ((p / items.FILE).unlink(), (p / items.FILE).mkdir(), r)[2], "not a regular file"),
    "a fifo": (lambda p, r: ((p / items.FILE).unlink(), os.mkfifo(p / items.FILE), r)[2], "not a regular file"),
    "altered": (lambda p, r: ((p / items.FILE).write_bytes(b"\x1f\x8b" + b"0" * 40), r)[1], "sha256 differs"),
    "not gzip": (lambda p, r: _forged(p, r, b"{}"), "unreadable"),
    "truncated gzip": (lambda p, r: _forged(p, r, (p / items.FILE).read_bytes()[:-9]), "unreadable"),
    "not json": (lambda p, r: _forged(p, r, gzip.compress(b"{not json", mtime=0)), "unreadable"),
    "another format": (lambda p, r: _forged(p, r, _content(format="something")), "not a"),
    "a later version": (lambda p, r: _forged(p, r, _content(version=2)), "version 2"),
    "another run": (lambda p, r: _forged(p, r, _content(run_id="zzz")), "run zzz"),
    "reference not a mapping": (lambda p, r: {**r, "eval": {"items": "eval_items.json.gz"}}, "not a reference"),
    "reference of a later version": (
        lambda p, r: {**r, "eval": {"items": {**r["eval"]["items"], "version": 2}}},
        "version 2",
    ),
    "reference outside the run": (
        lambda p, r: {**r, "eval": {"items": {**r["eval"]["items"], "file": "../eval_items.json.gz"}}},
        "not a file name",
    ),
}


@pytest.mark.parametrize("case", list(READ_ERRORS))
def test_every_read_error_is_an_items_error(case, tmp_path):
    spoil, message = READ_ERRORS[case]
    record = spoil(tmp_path, _record(tmp_path))
    with pytest.raises(ItemsError, match=message):
        items.read_items(tmp_path / results.RECORD, record)


def test_an_oversized_file_or_one_that_unpacks_without_end_is_not_read(tmp_path, monkeypatch):
    record = _record(tmp_path)
    monkeypatch.setattr(items, "MAX_FILE_BYTES", 16)
    with pytest.raises(ItemsError, match="larger than"):
        items.read_items(tmp_path / results.RECORD, record)
    monkeypatch.setattr(items, "MAX_FILE_BYTES", 2**20)
    record = _forged(tmp_path, record, gzip.compress(b" " * 2**20 + b"{}", mtime=0))  # ~1 KiB packed
    monkeypatch.setattr(items, "MAX_JSON_BYTES", 2**16)
    with pytest.raises(ItemsError, match="unpacks to more than"):
        items.read_items(tmp_path / results.RECORD, record)


def test_a_file_that_cannot_be_written_is_a_warning_and_the_record_points_at_none(tmp_path, monkeypatch, caplog):
    record = {"run_id": "r", "eval": {"items": {"file": items.FILE, "sha256": "0" * 64, "version": 1}}}

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(eval_stage, "write_items", full)
    with caplog.at_level(logging.WARNING, logger="qpeft_bench"):
        eval_stage.save_items(tmp_path, record, STAGES)
    assert "items" not in record["eval"] and "No space left" in caplog.text
    eval_stage.save_items(tmp_path, record, {"before": {}})  # nothing to keep: nothing written, nothing pointed at
    assert "items" not in record["eval"] and not (tmp_path / items.FILE).exists()


def test_an_unreadable_items_file_gives_nothing_to_keep(tmp_path, caplog):
    record = _record(tmp_path)
    assert eval_stage.kept_items(tmp_path / results.RECORD, record) == STAGES
    (tmp_path / items.FILE).write_bytes(b"spoilt")
    with caplog.at_level(logging.WARNING, logger="qpeft_bench"):
        assert eval_stage.kept_items(tmp_path / results.RECORD, record) == {}
    assert "sha256 differs" in caplog.text


# ------------------------------------------------------------------------------------------- evaluate, the cache
def _toy(monkeypatch, task_items):
    run = lambda model, ctx: evaluation.WithItems(2.0, task_items)  # noqa: E731
    monkeypatch.setitem(TASKS, "toy", EvalTask("toy", "a constant perplexity", run=run))
    return from_dict(EvalConfig, {"name": "t", "tasks": ["toy"]}, "eval")


COMMON = dict(stage="before", device="cpu", compute_dtype=None, progress=False, heldout_batches=list)
TWO = {"kind": "nll", "unit": "example", "ids": [3, 8], "nll": [1.0, 2.0], "tokens": [1, 2]}  # exp(3 / 3) != 2


def test_items_that_do_not_give_the_result_are_dropped_with_a_warning(monkeypatch, caplog):
    ev = _toy(monkeypatch, TWO)
    kept = {}
    with caplog.at_level(logging.WARNING, logger="qpeft_bench"):
        assert evaluation.evaluate(None, None, ev, items=kept, **COMMON)[0] == {"toy": 2.0}
    assert kept == {} and "per-item results dropped" in caplog.text
    good = {**TWO, "nll": [0.5, 3 * 0.6931471805599453 - 0.5]}  # exp(3 ln 2 / 3) = 2
    ev = _toy(monkeypatch, good)
    assert evaluation.evaluate(None, None, ev, items=kept, **COMMON)[0] == {"toy": 2.0} and kept == {"toy": good}


def test_a_cached_result_comes_back_with_its_items_and_bad_cached_items_are_computed_again(monkeypatch, tmp_path):
    good = {**TWO, "nll": [0.5, 3 * 0.6931471805599453 - 0.5]}
    ev = _toy(monkeypatch, good)
    cache = evaluation.BaseEvalCache({"base": "x"}, {}, root=tmp_path)
    for _ in range(2):  # computed, then from the cache
        kept = {}
        out, seconds = evaluation.evaluate(None, None, ev, cache=cache, items=kept, **COMMON)
        assert out == {"toy": 2.0} and kept == {"toy": good}
    assert seconds == {}  # the second time from the cache
    entry = json.loads(cache.path("toy").read_text())
    # items that no longer give the cached result (edited): the entry is not trusted, the result is computed again
    cache.path("toy").write_text(json.dumps({**entry, "items": TWO}))
    assert cache.get("toy") is None
    # an entry without items (a task without them) is still the base's result, and gives no items
    cache.path("toy").write_text(json.dumps({k: v for k, v in entry.items() if k != "items"}))
    assert cache.get("toy") == 2.0 and cache.items("toy") is None


# ------------------------------------------------------------------------------------------------- the harness
def test_lm_eval_items_give_every_entry_and_average_of_summarize(monkeypatch):
    """Leaderboard on the shipped fixtures (one item per task): mmlu's 57 leaves, gsm8k under its strict-match
    filter, truthfulqa's mc2 score; each entry value and both averages as summarize() computes them (1e-9)."""
    path = str(ASSETS / "tiny_llama")
    model, tok = models.load_model(path, "float32", "cpu").eval(), models.load_tokenizer(path)
    kept = {}
    torch_state, python_state = torch.random.get_rng_state(), random.getstate()
    record = harness.run_task_set(
        model,
        tok,
        "leaderboard",
        batch_size=16,
        data_root=harness.FIXTURES,
        limit=1,
        device="cpu",
        max_gen_toks=8,
        progress=False,
        items=kept,
    )
    # lm-eval seeds the global generators; they come back as they were (a cached base trains as a computed one)
    assert torch.equal(torch.random.get_rng_state(), torch_state) and random.getstate() == python_state
    items.check_task("leaderboard", kept)
    assert "samples" not in record and "leaves" not in json.dumps(record)  # the record is what it was
    assert len(kept["entries"]["mmlu"]) == 57 and kept["entries"]["gsm8k"] == ["gsm8k"]
    assert kept["averages"] == {k: list(v) for k, v in harness.TASK_SETS["leaderboard"]["averages"].items()}
    for entry, reported in record["tasks"].items():
        assert items.entry_value(kept, entry) == pytest.approx(reported["value"], rel=1e-9, abs=0)
        assert sum(len(kept["leaves"][leaf]["doc_ids"]) for leaf in kept["entries"][entry]) == reported["samples"]
    for name in ("average", "average_4"):
        assert items.average(kept, name) == pytest.approx(record[name], rel=1e-9, abs=0)
    assert items.mismatch(kept, record) is None
    assert kept["leaves"]["gsm8k"]["doc_ids"] == [0]  # one sample per filter in lm-eval's output: strict-match's


# ------------------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def first_run(compose, tmp_path_factory):
    """A run with held-out and WikiText perplexity, MMLU on the fixtures and speed: its directory, its record and
    the base-eval cache it filled."""
    cache = tmp_path_factory.mktemp("cache")
    run_dir = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QPEFT_CACHE", str(cache))
        assert recipe.run(compose(RUN), run_dir, progress=False, summary=False) == "completed"
    return run_dir, json.loads((run_dir / results.RECORD).read_text()), cache


def test_a_run_writes_its_items_beside_the_record_and_they_give_its_numbers(first_run):
    run_dir, record, _ = first_run
    ref = record["eval"]["items"]
    assert ref == {
        "file": items.FILE,
        "sha256": hashlib.sha256((run_dir / items.FILE).read_bytes()).hexdigest(),
        "version": 1,
    }
    content = items.read_items(run_dir / results.RECORD, record)
    assert content["run_id"] == record["run_id"]
    for stage in ("before", "after"):
        kept, reported = content["stages"][stage], record["eval"][stage]
        assert set(kept) == {"ppl_heldout", "ppl_wikitext", "mmlu"}  # speed measures time: no items
        assert items.headline(kept["ppl_heldout"]) == pytest.approx(reported["ppl_heldout"], rel=1e-9, abs=0)
        assert items.headline(kept["ppl_wikitext"]) == pytest.approx(reported["ppl_wikitext"]["ppl"], rel=1e-9)
        assert items.headline(kept["mmlu"]) == pytest.approx(reported["mmlu"]["average"], rel=1e-9, abs=0)
        assert items.entry_value(kept["mmlu"], "mmlu") == pytest.approx(reported["mmlu"]["tasks"]["mmlu"]["value"])
        heldout, windows = kept["ppl_heldout"], kept["ppl_wikitext"]
        assert (heldout["unit"], windows["unit"]) == ("example", "window")
        assert heldout["ids"] == sorted(heldout["ids"]) and len(heldout["ids"]) <= 2 * 8  # eval.max_batches=2
        assert windows["ids"] == list(range(reported["ppl_wikitext"]["windows"]))
        assert set(windows["tokens"]) == {reported["ppl_wikitext"]["seq_len"] - 1}
    # the record keeps only the reference: no per-unit numbers in the results
    assert "units" not in record["eval"]["after"]["ppl_wikitext"]
    assert "leaves" not in json.dumps(record) and "doc_ids" not in json.dumps(record)
    assert content["stages"]["before"]["ppl_heldout"]["ids"] == content["stages"]["after"]["ppl_heldout"]["ids"]


def test_the_same_run_again_writes_the_same_bytes_and_its_cached_base_keeps_its_items(
    first_run, compose, tmp_path, monkeypatch
):
    run_dir, record, cache = first_run
    monkeypatch.setenv("QPEFT_CACHE", str(cache))
    assert recipe.run(compose(RUN), tmp_path, progress=False, summary=False) == "completed"
    again = json.loads((tmp_path / results.RECORD).read_text())
    assert again["eval"]["before_cached"] == ["mmlu", "ppl_heldout", "ppl_wikitext"]
    assert (tmp_path / items.FILE).read_bytes() == (run_dir / items.FILE).read_bytes()
    assert again["eval"]["items"] == record["eval"]["items"]


def test_mode_eval_replaces_the_tasks_it_evaluates_and_keeps_the_rest(first_run, compose, tmp_path, monkeypatch):
    src, first, _ = first_run
    run_dir = tmp_path / "copy"
    shutil.copytree(src, run_dir)
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    overrides = [
        "mode=eval",
        f"run_dir={run_dir}",
        "eval=tiny_all",
        "eval.tasks=[ppl_heldout]",
        "eval.max_batches=1",
        "eval.before_finetune=false",
    ]
    assert recipe.run(compose(overrides), tmp_path / "hydra_dir", progress=False) == "completed"
    record = json.loads((run_dir / results.RECORD).read_text())
    old = items.read_items(src / results.RECORD, first)["stages"]
    new = items.read_items(run_dir / results.RECORD, record)["stages"]  # the record's sha256 is the new file's
    assert record["eval"]["items"]["sha256"] != first["eval"]["items"]["sha256"]
    heldout = new["after"]["ppl_heldout"]
    assert len(heldout["ids"]) < len(old["after"]["ppl_heldout"]["ids"])  # one batch now, two before
    assert set(heldout["ids"]) <= set(old["after"]["ppl_heldout"]["ids"])
    assert items.headline(heldout) == pytest.approx(record["eval"]["after"]["ppl_heldout"], rel=1e-9, abs=0)
    assert new["before"] == old["before"]  # the stage it did not evaluate
    assert {t: new["after"][t] for t in ("ppl_wikitext", "mmlu")} == {
        t: old["after"][t] for t in ("ppl_wikitext", "mmlu")
    }
