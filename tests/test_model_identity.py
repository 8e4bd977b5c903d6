"""Models are what they say (issue 19, item 3): a card's shapes are checked against the checkpoint it is pointed at,
a hub id is never ignored, a model in the local Hugging Face cache runs without a card `arch`, and a tokenizer with
ids beyond the embedding is refused before loading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from conftest import CLI, FAST, ROOT

from qpeft_bench import ASSETS, data, models
from qpeft_bench.config import ConfigError
from qpeft_bench.spec import validate

TINY = ASSETS / "tiny_llama"
HUB_ID = "qpeft-test/tiny-llama"


def fake_hub_cache(root, hub_id: str = HUB_ID):
    """The layout huggingface_hub writes (models--org--name/{refs/main, snapshots/<commit>/...}), holding the tiny
    model, as a cluster's pre-downloaded cache would."""
    repo = root / f"models--{hub_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(TINY, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def test_a_card_pointed_at_another_checkpoint_is_refused_naming_both_values(compose):
    with pytest.raises(ConfigError) as err:
        validate(compose(["model=llama2_7b", f"model.path={TINY}", "mode=plan"]))
    line = str(err.value)
    assert "\n" not in line
    assert (
        "hidden_size=4096" in line
        and f"hidden_size={json.loads((TINY / 'config.json').read_text())['hidden_size']}" in line
    )
    assert str(TINY / "config.json") in line


def test_a_hub_id_given_next_to_the_shipped_path_is_not_ignored(compose):
    with pytest.raises(ConfigError, match=r"model.hub_id='meta-llama/Llama-2-7b-hf' and model.path=.* both set"):
        validate(compose(["model.hub_id=meta-llama/Llama-2-7b-hf"]))


def test_a_model_in_the_local_hf_cache_needs_no_arch(compose, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(fake_hub_cache(tmp_path)))
    spec = validate(compose(["model.path=null", f"model.hub_id={HUB_ID}", "mode=plan"]))
    assert spec.model.arch_dict()["hidden_size"] == json.loads((TINY / "config.json").read_text())["hidden_size"]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        validate(compose(["model.path=null", f"model.hub_id={HUB_ID}", "mode=plan"]))


def test_a_run_from_a_pre_downloaded_hf_cache_completes_offline(tmp_path):
    cache = fake_hub_cache(tmp_path / "hub")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "runs"
    proc = subprocess.run(
        [*CLI, "model.path=null", f"model.hub_id={HUB_ID}", f"output_root={out}", *FAST],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = out.glob("*/result.json")
    rec = json.loads(record.read_text())
    assert rec["status"] == "completed"
    assert rec["config"]["model"]["hub_id"] == HUB_ID and rec["config"]["model"]["path"] is None


def test_a_tokenizer_with_ids_beyond_the_embedding_is_refused():
    tokenizer = models.load_tokenizer(str(TINY))
    small = len(tokenizer) // 2
    with pytest.raises(ValueError, match=rf"has {len(tokenizer)} ids but the model's embedding has vocab_size={small}"):
        data.check_tokenizer(tokenizer, str(TINY), vocab_size=small)
    data.check_tokenizer(tokenizer, str(TINY), vocab_size=len(tokenizer))
