"""Fast checks that the embedded tiny model and data (built by scripts/build_tiny_model.py) are sound."""

import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the assets must never need the network

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "qpeft_bench/assets/tiny_llama"
DATA = ROOT / "qpeft_bench/assets/data"
sys.path.insert(0, str(ROOT / "scripts"))
import tiny_world  # noqa: E402

# Held-out NLL measured at build time is 0.619 (see the model card); ln(2048) = 7.62 for an untrained model.
# The margin absorbs numeric drift across torch/transformers versions, not a worse model.
NLL_BOUND = 0.70
ALPACA_SEED = 2_000_003  # build seed 0 + the offset build_tiny_model.py uses for the instruction set
# Alpaca's prompt templates (no-input and with-input variants), used for the length budget.
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_IN = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(MODEL).eval()


@pytest.fixture(scope="module")
def alpaca():
    return json.loads((DATA / "tiny_alpaca.json").read_text())


def test_model_config_and_size(model):
    c = model.config
    assert model.__class__.__name__ == "LlamaForCausalLM"
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (256, 768, 4)
    assert (c.num_attention_heads, c.num_key_value_heads, c.tie_word_embeddings) == (4, 2, False)
    assert model.model.layers[0].self_attn.k_proj.out_features == 128  # GQA: k/v out != in
    n = sum(p.numel() for p in model.parameters())
    assert 2_000_000 <= n <= 8_000_000
    assert (MODEL / "model.safetensors").stat().st_size <= 10.5e6
    assert json.loads((MODEL / "config.json").read_text())["dtype"] == "bfloat16"


def test_tokenizer(tok, model):
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(tok, f"{name}_token") == {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}[name]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        model.config.bos_token_id,
        model.config.eos_token_id,
        model.config.pad_token_id,
    )
    assert len(tok) == model.config.vocab_size
    text = "Mira lives in Olden. 17 plus 25 is 42.\nCafé, naïve & unseen words!"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id  # LLaMA-like: <s> prepended, no </s>
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_alpaca_schema(alpaca, tok):
    assert isinstance(alpaca, list) and 1500 <= len(alpaca) <= 3000
    for ex in alpaca:
        assert set(ex) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in ex.values()) and ex["instruction"] and ex["output"]
    assert len({(ex["instruction"], ex["input"]) for ex in alpaca}) == len(alpaca)
    texts = [(PROMPT_IN if ex["input"] else PROMPT).format(**ex) + ex["output"] for ex in alpaca]
    assert max(len(ids) + 1 for ids in tok(texts)["input_ids"]) <= 160  # + </s>


def test_generator_deterministic(alpaca):
    assert tiny_world.alpaca(ALPACA_SEED, 50) == tiny_world.alpaca(ALPACA_SEED, 50) == alpaca[:50]
    assert tiny_world.alpaca(ALPACA_SEED + 1, 50) != alpaca[:50]
    assert tiny_world.corpus(7, 100) == tiny_world.corpus(7, 100) != tiny_world.corpus(8, 100)


def test_model_is_pretrained(model, tok):
    # Same packing as the build script: each blank-line-separated document is <s> doc </s>, windows of 256.
    docs = (DATA / "tiny_text.txt").read_text().strip().split("\n\n")
    assert 50_000 <= (DATA / "tiny_text.txt").stat().st_size <= 100_000
    stream = []
    for ids in tok(docs, add_special_tokens=False)["input_ids"]:
        stream += [tok.bos_token_id] + ids + [tok.eos_token_id]
    n = len(stream) // 256
    windows = torch.tensor(stream[: n * 256]).view(n, 256)
    with torch.no_grad():
        nll = sum(model(input_ids=w, labels=w).loss.item() * len(w) for w in windows.split(32)) / n
    assert nll < 0.6 * math.log(model.config.vocab_size)
    assert nll < NLL_BOUND, nll
