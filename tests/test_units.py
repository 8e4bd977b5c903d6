"""Unit tests of the library pieces against independent references."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qpeft_bench import ASSETS, results
from qpeft_bench.evaluation.perplexity import heldout_perplexity
from qpeft_bench.memory import MemoryProbe
from qpeft_bench.train import accumulate, make_scheduler


# ---------------------------------------------------------------------------------------------- run id
def test_run_id_ignores_launch_keys_order_and_number_spelling():
    base = {"mode": "plan", "seed": 0, "peft": {"method": "lora", "r": 8, "alpha": 16}, "output_root": "runs"}
    same = {
        "output_root": "/elsewhere",
        "overwrite": True,
        "hydra": {"x": 1},
        "peft": {"alpha": 16.0, "r": 8, "method": "lora"},
        "seed": 0,
        "mode": "plan",
    }
    assert results.run_id(base) == results.run_id(same)
    assert len(results.run_id(base)) == 12


def test_run_id_changes_with_any_knob():
    base = {"mode": "plan", "seed": 0, "peft": {"method": "lora", "r": 8, "alpha": 16}}
    ids = {
        results.run_id(base),
        results.run_id({**base, "seed": 1}),
        results.run_id({**base, "mode": "train"}),
        results.run_id({**base, "peft": {"method": "lora", "r": 4, "alpha": 16}}),
    }
    assert len(ids) == 4


def test_run_id_names_assets_by_content_not_location(tmp_path):
    asset = ASSETS / "data" / "tiny_alpaca.json"
    cfg = {"mode": "plan", "data": {"path": str(asset)}}
    normalised = results._normalise(cfg)["data"]["path"]
    assert normalised.startswith("<assets>/data/tiny_alpaca.json@") and str(ASSETS) not in normalised
    assert results.run_id(cfg) == results.run_id({"data": {"path": str(asset)}, "mode": "plan"})


def test_run_id_resolves_auto_device_for_training():
    auto = {"mode": "train", "train": {"device": "auto"}}
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert results.run_id(auto) == results.run_id({"mode": "train", "train": {"device": here}})


# ---------------------------------------------------------------------------------------------- records
def test_atomic_write_keeps_the_old_record_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    results.atomic_write_json(path, {"status": "completed", "x": 1})

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError):
        results.atomic_write_json(path, {"status": "running"})
    assert json.loads(path.read_text()) == {"status": "completed", "x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left behind


def test_records_are_strict_json_even_with_nan(tmp_path):
    results.atomic_write_json(tmp_path / "r.json", {"loss": float("nan"), "xs": [float("inf"), 1.0]})
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "loss": "nan",
        "xs": ["inf", 1.0],
    }


# ---------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize(
    "name, expected",
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        # after warm-up, HF's formulas: linear (T - t) / (T - w), cosine 0.5 (1 + cos(pi (t - w) / (T - w)))
        ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
        ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
    ],
)
def test_lr_schedules(name, expected):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, name, warmup_steps=2, max_steps=6)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------- training math
def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=50,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).float()


def _batch(lengths: list[int], width: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        labels[row, 2:n] = ids[row, 2:n]  # a 2-token "source" without loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_gradient_accumulation_equals_one_big_batch():
    a, b = _batch([12, 5], 12, 1), _batch([9, 3], 12, 2)
    whole = {k: torch.cat([a[k], b[k]]) for k in a}
    m1, m2 = _model(), _model()
    loss_acc, _ = accumulate(m1, [a, b], "cpu", torch.float32)
    loss_one, _ = accumulate(m2, [whole], "cpu", torch.float32)
    assert loss_acc == pytest.approx(loss_one, rel=1e-5)
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_heldout_perplexity_is_exp_of_the_token_mean_nll():
    model = _model().eval()
    a, b = _batch([12, 5], 12, 3), _batch([9, 3], 12, 4)
    got = heldout_perplexity(model, [a, b], "cpu", progress=False)
    # Independent reference: HF's own loss per batch is a token mean; weight the batches by their tokens.
    with torch.no_grad():
        n = [int((x["labels"][:, 1:] != -100).sum()) for x in (a, b)]
        losses = [model(**x).loss.item() for x in (a, b)]
    expected = sum(loss * k for loss, k in zip(losses, n, strict=True)) / sum(n)
    assert got["tokens"] == sum(n)
    assert got["nll"] == pytest.approx(expected, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)


# ---------------------------------------------------------------------------------------------- memory
def test_cpu_memory_probe_sees_an_allocation_and_forgets_it_after_reset():
    probe = MemoryProbe("cpu")
    big = torch.ones(64 * 2**20)  # 256 MiB, touched, then released before the reset
    del big
    probe.reset()
    probe.step()
    small_peak = probe.summary()["peak_memory_bytes"]
    big = torch.ones(64 * 2**20)
    probe.step()
    summary = probe.summary()
    assert summary["memory_kind"] == "cpu_peak_rss"
    if summary["peak_reset_after_warmup"]:
        assert summary["peak_memory_bytes"] - small_peak > 200 * 2**20
    assert summary["peak_memory_bytes"] >= summary["mean_memory_bytes"] > 0
    del big
