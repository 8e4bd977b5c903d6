"""The method x quantizer support matrix: README's table is what the code says, and every "yes" trains."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import ROOT
from transformers import LlamaConfig, LlamaForCausalLM

from qpeft_bench import adapters, calibration, models, plan, quant
from qpeft_bench.config import adapter_target
from qpeft_bench.spec import validate

spec_ = importlib.util.spec_from_file_location("support_matrix", ROOT / "scripts" / "support_matrix.py")
support_matrix = importlib.util.module_from_spec(spec_)
spec_.loader.exec_module(support_matrix)


@pytest.fixture(scope="module")
def cells(compose):
    return support_matrix.matrix(compose)


def test_readme_support_matrix_is_current(cells):
    readme = (ROOT / "README.md").read_text()
    assert support_matrix.readme_with(support_matrix.markdown(cells), readme) == readme, (
        "README.md's support matrix is stale: run python scripts/support_matrix.py --write"
    )


def test_every_quantizer_and_method_appear(cells):
    assert {q for _, q in cells} == set(quant.names())
    assert {p for p, _ in cells} >= set(adapters.names()) - {"lora"} | {"lora", "rslora", "dora", "loftq"}


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def test_every_supported_cell_trains(compose, cells, tmp_path, monkeypatch):
    """A training step on a small random LLaMA for each "yes": finite loss, gradients on every adapter tensor."""
    yes = sorted(k for k, why in cells.items() if why is None)
    assert len(yes) > len(cells) // 2
    windows = calibration.random_windows(256, 4, 32, 0)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    # LoftQ reads the unquantized weights from the checkpoint the model was loaded from: give it one
    checkpoint = tmp_path / "tiny"
    _tiny_llama().save_pretrained(checkpoint)
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    for peft_option, quant_option in yes:
        spec = validate(compose(support_matrix.cell_overrides(peft_option, quant_option, compose)))
        model = models.load_model(str(checkpoint), "bfloat16", "cpu")
        targets = list(models.find_linears(model, spec.model.linear_names))
        quant.quantize_model(spec.quant_name, model, targets, spec.quant, "bfloat16", "cpu", windows=windows)
        with models.seeded(0):
            model = adapters.get(spec.peft_method).attach(
                model, [t for t in targets if adapter_target(t, spec.peft_targets)], spec.peft
            )
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert trainable, (peft_option, quant_option)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss), (peft_option, quant_option)
        no_grad = [n for n, p in trainable if p.grad is None]
        assert not no_grad, (peft_option, quant_option, no_grad[:3])


@pytest.mark.parametrize("card", support_matrix.options("model"))
def test_plan_mode_counts_every_method_on_every_card(compose, cells, card):

    for peft_option in sorted({p for p, _ in cells}):
        quant_option = next(q for (p, q), why in sorted(cells.items()) if p == peft_option and why is None)
        overrides = [*support_matrix.cell_overrides(peft_option, quant_option, compose), f"model={card}", "mode=plan"]
        try:
            spec = validate(compose(overrides))
        except Exception as err:
            assert type(err).__name__ == "ConfigError", (card, peft_option, err)
            continue
        acc = plan.plan_accounting(spec)
        shapes = models.linear_shapes(spec.model.arch_dict(), spec.model.dtype, spec.model.linear_names)
        assert acc["trainable_params"] == _expected_count(spec, shapes), (card, peft_option)
        assert 0 < acc["trainable_params"] < acc["total_params"]


def _expected_count(spec, shapes: dict[str, tuple[int, int]]) -> int:
    """Each method's trainable parameters from its definition (docs/design.md §2) and the card's shapes alone."""
    return sum(
        _module_count(spec.peft_method, spec.peft, name.rsplit(".", 1)[-1], i, o) for name, (i, o) in shapes.items()
    )


def _module_count(method: str, c, kind: str, i: int, o: int) -> int:
    if method == "lora":
        return c.r * (i + o) + (o if c.use_dora else 0)
    if method == "ia3":
        return i if kind in c.feedforward else o
    if method == "qa_lora":
        return c.r * (i // c.group_size) + o * c.r
    if method == "qbara":
        return c.r * (i + o)  # LoRA's count at the same r
    if method == "qahira":
        return i * o // (c.lambda1 * c.lambda2)
    if method == "irqlora":
        return c.r * (i + o) + 2  # LoRA plus beta1, beta2
    if method == "weak_columns":
        return c.k * o
    raise AssertionError(f"no expected count for {method}")
