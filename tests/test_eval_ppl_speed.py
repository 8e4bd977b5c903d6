"""WikiText-style windowed perplexity (against HF's own loss on the same windows), the wikitext readers on our
hub-schema fixture, and the speed measures (exact token counts, restored state, gradients reaching adapters, no
weight changed), on the embedded tiny LLaMA."""

from __future__ import annotations

import copy
import json
import math
import statistics

import pytest
import torch

from qpeft_bench import ASSETS, adapters, models
from qpeft_bench.evaluation import perplexity
from qpeft_bench.evaluation import throughput as speed

FIXTURE = ASSETS / "data" / "fixtures" / "wikitext_test.jsonl"
TINY = str(ASSETS / "tiny_llama")
F32 = torch.float32
# The tiny model ends this arithmetic run with </s> after 25 new tokens (checked in the test that relies on it).
EOS_PROMPT = "58 plus 3 is 61. 91 minus 20 is 71. 50 minus 18 is 32."


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): the embedded tiny LLaMA in fp32, eval mode; tests that change it take deep copies."""
    return models.load_model(TINY, "float32", "cpu").eval(), models.load_tokenizer(TINY)


@pytest.fixture(scope="module")
def fixture_rows() -> list[str]:
    return [json.loads(line)["text"] for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def text(fixture_rows) -> str:
    return "\n\n".join(fixture_rows)  # GPTQ's datautils: "\n\n".join(testdata["text"])


def windowed(model, tok, text: str, seq_len: int, batch_size: int = 4, **kw) -> dict:
    return perplexity.windowed_perplexity(
        model, tok, text, seq_len=seq_len, batch_size=batch_size, device="cpu", compute_dtype=F32, progress=False, **kw
    )


@torch.no_grad()
def hf_mean_loss(model, ids: list[int], seq_len: int, windows: int) -> float:
    """HF's own loss (mean over a window's shifted labels), one window at a time, averaged over windows: every
    window predicts seq_len - 1 tokens, so this is the mean over all predicted tokens."""
    losses = []
    for i in range(windows):
        w = torch.tensor(ids[i * seq_len : (i + 1) * seq_len])[None]
        losses.append(model(input_ids=w, labels=w).loss.item())
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------------------------------------------
# Windowed perplexity
# ----------------------------------------------------------------------------------------------------------------


def test_windowed_perplexity_is_exp_of_hf_mean_loss_over_the_same_windows(tiny, text):
    model, tok = tiny
    seq_len = 64
    ids = tok(text)["input_ids"]
    windows = len(ids) // seq_len
    assert windows % 3 != 0  # a batch of 3 then leaves a short last batch, which must weigh by its tokens
    out = windowed(model, tok, text, seq_len, batch_size=3)
    expected = hf_mean_loss(model, ids, seq_len, windows)
    assert out["windows"] == windows
    assert out["nll"] == pytest.approx(expected, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert out["protocol"] == perplexity.WINDOWED_PROTOCOL
    assert not model.training


@pytest.mark.parametrize("seq_len", [64, 100])
def test_window_arithmetic_drops_the_last_partial_window(tiny, text, seq_len):
    model, tok = tiny
    ids = tok(text)["input_ids"]
    assert len(ids) % seq_len, "the fixture must leave a partial window for this test to mean anything"
    out = windowed(model, tok, text, seq_len)
    assert out["text_tokens"] == len(ids)
    assert out["windows"] == out["windows_total"] == len(ids) // seq_len
    assert out["tokens"] == out["windows"] * (seq_len - 1)  # each window predicts its shifted labels
    assert out["seq_len"] == seq_len

    # More text that only grows the partial window changes nothing: it is dropped, not padded or scored.
    longer = text + " = Coda = \n"
    longer_ids = tok(longer)["input_ids"]
    full = out["windows"] * seq_len
    assert longer_ids[:full] == ids[:full] and len(longer_ids) // seq_len == out["windows"]
    again = windowed(model, tok, longer, seq_len)
    assert again["windows"] == out["windows"] and again["nll"] == pytest.approx(out["nll"], rel=1e-6)


def test_max_windows_scores_only_the_first_windows(tiny, text):
    model, tok = tiny
    out = windowed(model, tok, text, 64, max_windows=2)
    assert (out["windows"], out["tokens"]) == (2, 2 * 63)
    assert out["windows_total"] == len(tok(text)["input_ids"]) // 64
    assert out["nll"] == pytest.approx(hf_mean_loss(model, tok(text)["input_ids"], 64, 2), rel=1e-5)


def test_window_longer_than_the_context_or_the_text_is_a_clear_error(tiny, text):
    model, tok = tiny
    context = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"seq_len={context + 1} exceeds the model's context length {context}"):
        windowed(model, tok, text, context + 1)
    with pytest.raises(ValueError, match="fewer than one window of seq_len=64"):
        windowed(model, tok, "A cat meows.", 64)


# ----------------------------------------------------------------------------------------------------------------
# Reading wikitext
# ----------------------------------------------------------------------------------------------------------------


def test_fixture_has_the_hub_schema(fixture_rows):
    # wikitext's rows: one per line of the raw file, newline kept, blank lines as "", headings " = Title = ".
    assert len(fixture_rows) >= 24
    assert "" in fixture_rows
    assert any(r.startswith(" = ") and r.endswith(" = \n") for r in fixture_rows)
    assert any(r.startswith(" = = ") for r in fixture_rows)
    assert all(r == "" or r.endswith("\n") for r in fixture_rows)


def test_fixture_reads_the_same_from_a_file_a_raw_copy_parquet_and_through_datasets(
    tmp_path, monkeypatch, fixture_rows, text
):
    assert perplexity.wikitext_text(str(FIXTURE)) == text

    raw = tmp_path / "wiki.test.raw"  # the original layout: blank rows are " \n" lines
    raw.write_text("".join(r or " \n" for r in fixture_rows), encoding="utf-8")
    assert perplexity.wikitext_text(str(raw)) == text

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": fixture_rows}), tmp_path / "test-00000-of-00001.parquet")
    assert perplexity.wikitext_text(str(tmp_path / "test-00000-of-00001.parquet")) == text

    # path=None goes through datasets.load_dataset, here on a local folder holding the fixture as its test split.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "test.jsonl").write_text(FIXTURE.read_text(encoding="utf-8"), encoding="utf-8")
    assert perplexity.wikitext_text(hub_id=str(hub), variant=None, split="test") == text


def test_a_missing_wikitext_file_names_its_path(tmp_path):
    missing = tmp_path / "nowhere" / "wiki.test.raw"
    with pytest.raises(FileNotFoundError, match=f"wikitext file not found: {missing}"):
        perplexity.wikitext_text(str(missing))


# ----------------------------------------------------------------------------------------------------------------
# Speed
# ----------------------------------------------------------------------------------------------------------------


def test_generation_speed_generates_exactly_new_tokens_ignoring_eos(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    new_tokens, repeats = 32, 2
    prompt_len = tok(EOS_PROMPT, return_tensors="pt")["input_ids"].shape[1]
    plain = model.generate(
        **tok(EOS_PROMPT, return_tensors="pt"),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    assert plain.shape[1] - prompt_len < new_tokens and plain[0, -1] == tok.eos_token_id  # it would stop at EOS

    model.config.use_cache = False  # as the recipe leaves it for training
    model.train()
    generated, cache_during = [], []
    original = model.generate

    def spy(**kwargs):
        cache_during.append(model.config.use_cache)
        out = original(**kwargs)
        generated.append(out.shape[1] - prompt_len)
        return out

    model.generate = spy
    out = speed.generation_speed(model, tok, new_tokens=new_tokens, prompt=EOS_PROMPT, repeats=repeats, device="cpu")
    assert generated == [new_tokens] * (repeats + 1)  # one warm-up, then the timed repeats
    assert cache_during == [True] * (repeats + 1)
    assert model.config.use_cache is False and model.training  # restored
    assert len(out["tokens_per_s_all"]) == repeats and all(v > 0 for v in out["tokens_per_s_all"])
    assert out["tokens_per_s"] == statistics.median(out["tokens_per_s_all"]) > 0
    assert (out["new_tokens"], out["prompt_tokens"], out["batch_size"]) == (new_tokens, prompt_len, 1)


def lora_model(tiny, dropout: float = 0.0):
    """The tiny model with LoRA on q/v, B perturbed away from zero so every adapter tensor gets a non-zero
    gradient (with B = 0, A's gradient is exactly zero)."""
    model = copy.deepcopy(tiny[0])
    lora = adapters.get("lora")
    targets = list(models.find_linears(model, ["q_proj", "v_proj"]))
    peft_model = lora.attach(model, targets, lora.Config(r=4, alpha=8, dropout=dropout, adapter_dtype="float32"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return peft_model.eval()


def layer_calls(model) -> list[int]:
    """A counter of the first block's MLP calls: checkpointing runs the block's forward again in the backward.
    The block's own hooks would fire once only (transformers checkpoints `forward`, not `__call__`), and a hook
    after the MLP could miss the recompute (torch stops it once the last saved tensor is rebuilt): a pre-hook."""
    calls = [0]
    mlp = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))
    mlp.register_forward_pre_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no_checkpointing"])
def test_step_speed_reaches_adapters_and_changes_no_weight(tiny, checkpointing):
    model = lora_model(tiny, dropout=0.1)
    repeats = 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in n for n in adapter)
    grad_norms: dict[str, list[float]] = {n: [] for n in adapter}
    for n, p in adapter.items():
        p.register_hook(lambda g, n=n: grad_norms[n].append(float(g.norm())))
    calls = layer_calls(model)
    rng = torch.random.get_rng_state()

    out = speed.step_speed(
        model,
        seq_len=32,
        batch_size=2,
        repeats=repeats,
        device="cpu",
        compute_dtype=F32,
        gradient_checkpointing=checkpointing,
    )

    runs = repeats + 1  # one warm-up
    assert all(len(v) == runs and min(v) > 0 for v in grad_norms.values())  # every adapter tensor, every run
    assert calls[0] == runs * (2 if checkpointing else 1)  # checkpointing really applied (train mode)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in adapter.values())
    assert not model.training
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # restored
    assert not getattr(model, "_require_grads_hooks", None)
    assert torch.equal(torch.random.get_rng_state(), rng)  # dropout drew from a forked generator
    assert len(out["forward_ms_all"]) == len(out["backward_ms_all"]) == repeats
    assert out["forward_ms"] == statistics.median(out["forward_ms_all"]) > 0
    assert out["backward_ms"] == statistics.median(out["backward_ms_all"]) > 0
    assert out["gradient_checkpointing"] is checkpointing and out["trainable_tensors"] == len(adapter)


def test_step_speed_refuses_a_step_that_misses_a_trainable_tensor(tiny):
    model = lora_model(tiny)
    model.base_model.model.unused = torch.nn.Parameter(torch.zeros(3))  # trainable, but no loss reaches it
    with pytest.raises(ValueError, match=r"reaches no gradient of 1 of .*unused"):
        speed.step_speed(model, seq_len=16, repeats=1, device="cpu", compute_dtype=F32, gradient_checkpointing=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        speed.step_speed(
            copy.deepcopy(tiny[0]).requires_grad_(False), seq_len=16, repeats=1, device="cpu", compute_dtype=F32
        )


def test_step_speed_without_checkpointing_on_a_model_that_has_it_restores_it(tiny):
    from qpeft_bench.train import prepare_for_training

    model = lora_model(tiny)
    prepare_for_training(model, upcast_norms_fp32=False, gradient_checkpointing=True)  # as the recipe does
    hooks = list(model._require_grads_hooks)
    calls = layer_calls(model)
    speed.step_speed(model, seq_len=16, repeats=1, device="cpu", compute_dtype=F32, gradient_checkpointing=False)
    assert calls[0] == 2  # warm-up + 1 repeat, each block run once: checkpointing was off
    assert all(m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing"))
    assert model._require_grads_hooks == hooks


def test_both_measures_run_on_a_bitsandbytes_base_with_lora_and_change_nothing(tiny):
    from qpeft_bench import quant

    base, tok = copy.deepcopy(tiny[0]), tiny[1]
    targets = list(
        models.find_linears(base, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    )
    quant.quantize_model("nf4", base, targets, quant.get("nf4").Config(**quant.preset("nf4")), "float32", "cpu")
    lora = adapters.get("lora")
    model = lora.attach(base, targets, lora.Config(r=4, alpha=8, dropout=0.0, adapter_dtype="float32")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = speed.generation_speed(model, tok, new_tokens=4, repeats=1, device="cpu")
    step = speed.step_speed(model, seq_len=16, repeats=1, device="cpu", compute_dtype=F32)
    assert gen["tokens_per_s"] > 0 and step["forward_ms"] > 0 and step["backward_ms"] > 0
    assert step["trainable_tensors"] == 2 * len(targets)  # lora_A and lora_B of every target reached
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
