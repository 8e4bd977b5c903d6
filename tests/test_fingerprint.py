"""Runs keyed by content (issue 19, item 2): a file replaced at the same path is another run, and no cached result
computed on the old file is reused."""

from __future__ import annotations

import json
import shutil

from conftest import FAST

from qpeft_bench import ASSETS, fingerprint, recipe, results


def test_same_content_same_fingerprint_other_content_other(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('[{"instruction": "x", "output": "y"}]')
    shutil.copy(a, b)
    assert fingerprint.fingerprint(a) == fingerprint.fingerprint(b) != "missing"
    b.write_text('[{"instruction": "x", "output": "z"}]')
    assert fingerprint.fingerprint(a) != fingerprint.fingerprint(b)
    assert fingerprint.fingerprint(tmp_path / "nothing.json") == "missing"


def test_large_files_are_sampled_and_other_weights_of_the_same_size_differ(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "FULL_BYTES", 4096)
    monkeypatch.setattr(fingerprint, "EDGE_BYTES", 256)
    monkeypatch.setattr(fingerprint, "BLOCK", 64)
    w1, w2 = tmp_path / "w1.safetensors", tmp_path / "w2.safetensors"
    blob = bytearray(range(256)) * 64  # 16 KiB, above FULL_BYTES: sampled
    w1.write_bytes(bytes(blob))
    blob[31 * ((len(blob) - 64) // fingerprint.SAMPLES) + 10] ^= 0xFF  # one byte inside the 32nd sampled block
    w2.write_bytes(bytes(blob))
    assert fingerprint.fingerprint(w1) != fingerprint.fingerprint(w2)


def test_directories_and_globs_hash_every_file(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\0" * 100)
    before = fingerprint.fingerprint(d)
    (d / "model.safetensors").write_bytes(b"\1" * 100)
    assert fingerprint.fingerprint(d) != before
    (tmp_path / "part-0.jsonl").write_text('{"chosen": "a"}\n')
    (tmp_path / "part-1.jsonl").write_text('{"chosen": "b"}\n')
    glob_before = fingerprint.fingerprint(tmp_path / "part-*.jsonl")
    (tmp_path / "part-1.jsonl").write_text('{"chosen": "c"}\n')
    assert fingerprint.fingerprint(tmp_path / "part-*.jsonl") != glob_before


def test_run_id_follows_the_data_files_content(compose, tmp_path):
    data = tmp_path / "alpaca.json"
    shutil.copy(ASSETS / "data" / "tiny_alpaca.json", data)
    config = compose([f"data.path={data}"])
    first = results.run_id(config)
    assert results.run_id(config) == first
    rows = json.loads(data.read_text())
    data.write_text(json.dumps(rows[:-1]))
    assert results.run_id(config) != first


def test_runs_on_the_shipped_assets_keep_their_ids(compose):
    config = compose([])
    assert results.input_fingerprints(config) == {}  # assets are fingerprinted where they are named
    assert results.run_id(config) == results.run_id(compose([]))


def test_a_replaced_data_file_is_not_skipped_nor_its_base_results_reused(compose, tmp_path, monkeypatch):
    """The stale-result failure of issue 19: the same path with other data was skipped as completed, and with
    overwrite=true the 'before' perplexity of the old file was reused from the base cache."""
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "alpaca.json"
    rows = json.loads((ASSETS / "data" / "tiny_alpaca.json").read_text())
    data.write_text(json.dumps(rows))
    overrides = [*FAST, f"data.path={data}", "eval.tasks=[ppl_heldout]"]
    run_dir = tmp_path / "run"
    assert recipe.run(compose(overrides), run_dir, progress=False) == "completed"
    first = json.loads((run_dir / results.RECORD).read_text())
    assert first["input_fingerprints"]["data.path"] == fingerprint.fingerprint(data)

    data.write_text(json.dumps(list(reversed(rows))))  # other examples at the same path: another split
    assert recipe.run(compose([*overrides, "overwrite=true"]), run_dir, progress=False) == "completed"
    second = json.loads((run_dir / results.RECORD).read_text())
    assert second["run_id"] != first["run_id"]
    assert second["eval"].get("before_cached") == []  # computed on the new file, not taken from the cache
    assert second["eval"]["before"]["ppl_heldout"] != first["eval"]["before"]["ppl_heldout"]
