"""LoftQ's on-disk cache is keyed by the content of the weights (issue 19): the key hashed each checkpoint file's path,
size, modification time and safetensors header, so other weights of the same shape put at the same path with the
old modification time (cp -p, tar, rsync -t) reused the stale initialisation computed from the old weights."""

from __future__ import annotations

import os

import pytest
import torch
from test_peft_methods import loaded_nf4, lora_cfg, tiny_llama

from qpeft_bench.adapters import loftq, lora

CFG = {"r": 4, "alpha": 4, "loftq": {"bits": 4, "iters": 1}}


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    tiny_llama(seed=7).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def safetensors_header(file) -> bytes:
    data = file.read_bytes()
    return data[: 8 + int.from_bytes(data[:8], "little")]


def replace_weights(folder, targets: list[str], seed: int) -> None:
    """Other weights for the adapted linears only (as a merged fine-tune of the same base has: embeddings, norms and
    lm_head untouched), so the file has the same size, header and leading bytes; the old file's times are put back,
    as copying with cp -p or unpacking a tar does."""
    weights = folder / "model.safetensors"
    old = weights.stat()
    header = safetensors_header(weights)
    model, other = tiny_llama(seed=7), tiny_llama(seed=seed)
    with torch.no_grad():
        for name in targets:
            model.get_submodule(name).weight.copy_(other.get_submodule(name).weight)
    model.save_pretrained(folder)
    os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns))
    new = weights.stat()
    assert (new.st_size, new.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    assert safetensors_header(weights) == header  # the same header: only the content tells them apart


def test_the_key_follows_the_weights_content(checkpoint):
    _, targets = loaded_nf4(checkpoint)
    first = loftq.checkpoint_fingerprint(str(checkpoint), targets)
    assert loftq.checkpoint_fingerprint(str(checkpoint), targets) == first  # unchanged weights: the same key
    replace_weights(checkpoint, targets, seed=8)
    assert loftq.checkpoint_fingerprint(str(checkpoint), targets) != first


def test_replaced_weights_never_reuse_a_stale_initialisation(checkpoint, tmp_path):
    cfg = lora_cfg(**CFG)
    targets = loaded_nf4(checkpoint)[1]
    first = lora.attach(*loaded_nf4(checkpoint), cfg)
    again = lora.attach(*loaded_nf4(checkpoint), cfg)
    assert (first.qpeft_loftq["cache"], again.qpeft_loftq["cache"]) == ("miss", "hit")

    replace_weights(checkpoint, targets, seed=8)
    replaced = lora.attach(*loaded_nf4(checkpoint), cfg)
    assert replaced.qpeft_loftq["cache"] == "miss"
    assert replaced.qpeft_loftq["cache_file"] != first.qpeft_loftq["cache_file"]
    assert len(list((tmp_path / "cache" / "loftq").iterdir())) == 2
    a_old, a_new = (lora.lora_layers(m) for m in (first, replaced))
    name = next(iter(a_old))
    assert not torch.equal(a_old[name].lora_A["default"].weight, a_new[name].lora_A["default"].weight)
    assert lora.attach(*loaded_nf4(checkpoint), cfg).qpeft_loftq["cache"] == "hit"  # the new weights' own entry


def test_the_same_weights_elsewhere_share_the_entry_and_dtypes_do_not(checkpoint, tmp_path):
    _, targets = loaded_nf4(checkpoint)
    copy = tmp_path / "copy"
    tiny_llama(seed=7).save_pretrained(copy)
    assert loftq.checkpoint_fingerprint(str(copy), targets) == loftq.checkpoint_fingerprint(str(checkpoint), targets)
    weights, settings = "w", {"quant_type": "nf4", "blocksize": 64, "double_quant": True}
    bf16 = loftq._weights_key(weights, settings, {"model": "torch.bfloat16", "compute": "torch.bfloat16"}, 4, 1, "cpu")
    fp16 = loftq._weights_key(weights, settings, {"model": "torch.float16", "compute": "torch.bfloat16"}, 4, 1, "cpu")
    assert bf16 != fp16  # the base was quantized from the weights in the model's dtype


def test_a_torn_cache_entry_is_computed_again_and_an_unwritable_cache_is_only_a_warning(
    checkpoint, tmp_path, monkeypatch, caplog
):
    """Issue 20: a malformed entry is never trusted; a cache that cannot be written does not fail the run."""
    cfg = lora_cfg(**CFG)
    first = lora.attach(*loaded_nf4(checkpoint), cfg)
    entry = first.qpeft_loftq["cache_file"]
    reference = {n: m.lora_A["default"].weight.clone() for n, m in lora.lora_layers(first).items()}
    with open(entry, "r+b") as f:  # torn by a full disk: the header survives, the tensors do not
        f.truncate(os.path.getsize(entry) // 2)
    again = lora.attach(*loaded_nf4(checkpoint), cfg)
    assert again.qpeft_loftq["cache"] == "miss" and "unreadable" in caplog.text
    for name, layer in lora.lora_layers(again).items():
        assert torch.equal(layer.lora_A["default"].weight, reference[name])

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("QPEFT_CACHE", str(blocker))  # the cache's folder would be under a regular file
    caplog.clear()
    unwritable = lora.attach(*loaded_nf4(checkpoint), cfg)
    assert unwritable.qpeft_loftq["cache"] == "miss" and "LoftQ cache not written" in caplog.text
    for name, layer in lora.lora_layers(unwritable).items():
        assert torch.equal(layer.lora_A["default"].weight, reference[name])
