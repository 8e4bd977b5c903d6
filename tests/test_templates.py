"""data.template (issue 19): Alpaca's prompt is QLoRA's (the default, "### Response: " with a space, byte for byte
what the runs used before the knob existed) or Stanford Alpaca's train.py one ("### Response:" with none); other
values are a config error naming the knob, and formats with their own layout refuse a non-default template."""

from __future__ import annotations

import json

import pytest
from conftest import FAST

from qpeft_bench import recipe, results
from qpeft_bench.config import ConfigError
from qpeft_bench.data import check_source, load_examples
from qpeft_bench.data_formats import ALPACA_TEMPLATES, FORMATS
from qpeft_bench.spec import validate

# Rows as github.com/tatsu-lab/stanford_alpaca's alpaca_data.json holds them: one JSON array, indented, every row
# with all three keys and input "" where there is none.
ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well.\n2. Sleep."},
    {"instruction": "Translate the sentence into French.", "input": "I like cheese.", "output": "J'aime le fromage."},
]
INTRO_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
INTRO_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
EXPECTED = {
    "qlora": [
        INTRO_NO_INPUT + "### Instruction:\nGive three tips for staying healthy.\n\n### Response: ",
        INTRO_INPUT
        + "### Instruction:\nTranslate the sentence into French.\n\n### Input:\nI like cheese.\n\n### Response: ",
    ],
    "stanford": [
        INTRO_NO_INPUT + "### Instruction:\nGive three tips for staying healthy.\n\n### Response:",
        INTRO_INPUT
        + "### Instruction:\nTranslate the sentence into French.\n\n### Input:\nI like cheese.\n\n### Response:",
    ],
}


@pytest.fixture
def alpaca_json(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(ROWS, indent=4, ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("template", sorted(EXPECTED))
def test_each_template_gives_the_authors_prompt_with_and_without_input(alpaca_json, template):
    examples = load_examples("alpaca", path=alpaca_json, template=template)
    assert [ex["source"] for ex in examples] == EXPECTED[template]
    assert [ex["target"] for ex in examples] == [row["output"] for row in ROWS]  # EOS is added as an id


def test_the_default_is_qlora_byte_for_byte(alpaca_json):
    assert [ex["source"] for ex in load_examples("alpaca", path=alpaca_json)] == EXPECTED["qlora"]


def test_open_platypus_follows_the_template(tmp_path):
    path = tmp_path / "platypus.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    examples = load_examples("open_platypus", path=str(path), template="stanford")
    assert [ex["source"] for ex in examples] == EXPECTED["stanford"]


def test_the_config_knob_takes_the_templates_and_names_the_choices_otherwise(compose):
    for template in ALPACA_TEMPLATES:  # every template data_formats knows is a choice of the schema
        assert validate(compose([f"data.template={template}"])).data.template == template
    assert validate(compose([])).data.template == "qlora"
    with pytest.raises(ConfigError, match=r"data\.template='alpaca' .*qlora .*stanford"):
        validate(compose(["data.template=alpaca"]))


@pytest.mark.parametrize("fmt", sorted(name for name, f in FORMATS.items() if not f.templated))
def test_formats_with_their_own_layout_refuse_another_template(fmt, tmp_path):
    with pytest.raises(ValueError, match=rf"data\.template=stanford applies to the Alpaca prompt .*'{fmt}'"):
        load_examples(fmt, path=str(tmp_path / "unread.jsonl"), template="stanford")
    with pytest.raises(ValueError, match="data.template=stanford"):
        check_source(fmt, None, "some/hub-id", template="stanford")
    check_source(fmt, None, "some/hub-id", template="qlora")  # the default is what they always did


def test_a_refused_template_stops_the_run_before_loading(compose, tmp_path, caplog):
    config = compose(["data=oasst1", "data.max_target_len=256", "data.template=stanford"])
    assert recipe.run(config, tmp_path / "run", progress=False) == "failed"
    assert "config error: data.template=stanford applies to the Alpaca prompt" in caplog.text


def test_the_default_template_keeps_the_run_ids_of_runs_made_before_the_knob(compose):
    config = compose([])
    without = {**config, "data": {k: v for k, v in config["data"].items() if k != "template"}}
    assert results.run_id(config) == results.run_id(without)
    assert results.run_id(compose(["data.template=stanford"])) != results.run_id(config)


def test_the_template_reaches_training(compose, tmp_path, monkeypatch):
    """Through the recipe: the held-out perplexity of the base differs with the prompt it is conditioned on."""
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    before = {}
    for template in ("qlora", "stanford"):
        run_dir = tmp_path / template
        overrides = [*FAST, "train.max_steps=2", "eval.tasks=[ppl_heldout]", f"data.template={template}"]
        assert recipe.run(compose(overrides), run_dir, progress=False) == "completed"
        record = json.loads((run_dir / results.RECORD).read_text())
        assert record["config"]["data"]["template"] == template
        before[template] = record["eval"]["before"]["ppl_heldout"]
    assert before["qlora"] != before["stanford"]
