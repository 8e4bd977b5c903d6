"""Records and adapters follow the user's umask (issue 19): atomic writes used tempfile.mkstemp, whose 0600 file
os.replace kept, so a group sharing a results directory could not read the records. Every file a run writes now gets
the mode a plain open() gives, 0666 less the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import FAST

from qpeft_bench import convert, recipe, results


@pytest.fixture
def umask():
    """set(mask) for the test; the process' own umask comes back afterwards, whatever the test does."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _written(run_dir: Path, cache: Path) -> dict[str, list[Path]]:
    found = {
        "record": [run_dir / results.RECORD],
        "adapter": sorted(p for p in (run_dir / recipe.ADAPTER_DIR).rglob("*") if p.is_file()),
        "base eval cache": sorted((cache / "base_eval").glob("*.json")),
    }
    for what, files in found.items():
        assert files, f"the run wrote no {what} file"
    return found


@pytest.mark.parametrize("mask", [0o002, 0o077], ids=["group-shared", "private"])
def test_a_runs_record_adapter_and_cache_follow_the_umask(compose, tmp_path, monkeypatch, umask, mask):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QPEFT_CACHE", str(cache))
    run_dir = tmp_path / "run"
    umask(mask)
    assert recipe.run(compose([*FAST, "eval.tasks=[ppl_heldout]"]), run_dir, progress=False) == "completed"
    for what, files in _written(run_dir, cache).items():
        for file in files:
            mode = _mode(file)
            assert mode == 0o666 & ~mask, f"{what} {file.name}: {oct(mode)} under umask {oct(mask)}"
            if mask == 0o002:
                assert mode & 0o060 == 0o060, f"{what} {file.name} is not group-readable and writable"
            else:
                assert mode & 0o077 == 0, f"{what} {file.name} is readable by others"
    assert _mode(run_dir) == 0o777 & ~mask  # directories are made by mkdir, which the umask narrows already


@pytest.mark.parametrize("mask", [0o002, 0o077])
def test_atomic_writers_give_the_mode_of_a_plain_open(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    record = tmp_path / "sub" / "record.json"
    results.atomic_write_json(record, {"a": 1})
    results.atomic_write_json(record, {"a": 2})  # replacing keeps the new file's mode, not a stale one
    converted = tmp_path / "data" / "test.jsonl"
    convert._write_jsonl([{"text": "a"}], converted, overwrite=False)
    lock = results.RunLock(tmp_path / "locked")
    assert lock.acquire() is None
    lock.release()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    os.close(os.open(adapter / "weights.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors writes
    results.follow_umask(adapter)
    for file in (record, converted, lock.path, adapter / "weights.safetensors"):
        assert _mode(file) == _mode(plain) == 0o666 & ~mask, file
    assert sorted(p.name for p in record.parent.iterdir()) == ["record.json"]  # no temporary file left
