"""Fast tests of qpeft_bench.data: loaders on hub-schema fixtures, split, tokenization, batching, checks.

No network and no files from other modules: the tokenizer is a byte-level BPE trained here, in memory, on
the fixture text.
"""

import gzip
import json
import statistics
import time
from pathlib import Path

import pytest
import yaml

from qpeft_bench import data
from qpeft_bench.data import (
    IGNORE_INDEX,
    check_source,
    collate,
    load_examples,
    make_batches,
    split_train_val,
    tokenize_examples,
)
from qpeft_bench.data_formats import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, FORMATS

ASSETS = Path(data.__file__).parent / "assets" / "data"
FIXTURES = ASSETS / "fixtures"
CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"

# (fixture, format, variant, expected number of examples), counted by hand from the fixture files.
FIXTURE_CASES = [
    ("hh_rlhf.jsonl", "hh_rlhf", None, 12),
    ("oasst1.jsonl", "oasst1", None, 4),  # 7 trees: one deleted root, one unanswered, one aborted
    ("oasst1.jsonl", "oasst1", "en", 3),  # ... and one Spanish
    ("guanaco.jsonl", "guanaco", None, 12),
    ("unnatural_core.jsonl", "unnatural", "core", 18),  # 10 rows, 18 instances
    ("unnatural_core.jsonl", "unnatural", None, 18),
    ("unnatural_full.jsonl", "unnatural", "full", 25),  # + 7 reformulations
    ("unnatural_full.jsonl", "unnatural", "core", 18),
    ("open_platypus.jsonl", "open_platypus", None, 12),
    ("guanaco_llama2_1k.jsonl", "guanaco_llama2", None, 12),
]


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def alpaca_rows(n: int) -> list[dict]:
    return [
        {
            "instruction": f"Add {i} and {i + 1}.",
            "input": "" if i % 3 else f"numbers {i}, {i + 1}",
            "output": f"The sum is {2 * i + 1}.",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [
        ex["source"] + ex["target"]
        for name, fmt, variant, _ in FIXTURE_CASES
        for ex in load_examples(fmt, path=str(FIXTURES / name), variant=variant)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------
# Loading and formatting
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "fmt", "variant", "count"), FIXTURE_CASES)
def test_fixture_loads_with_expected_count(name, fmt, variant, count):
    examples = load_examples(fmt, path=str(FIXTURES / name), variant=variant)
    assert len(examples) == count
    assert all(set(ex) == {"source", "target"} and ex["target"] for ex in examples)
    assert load_examples(fmt, path=str(FIXTURES / name), variant=variant, max_examples=3) == examples[:3]


def test_hh_rlhf_trains_the_chosen_dialogue():
    rows = read_jsonl("hh_rlhf.jsonl")
    examples = load_examples("hh_rlhf", path=str(FIXTURES / "hh_rlhf.jsonl"))
    assert examples == [{"source": "", "target": row["chosen"]} for row in rows]
    assert examples[2]["target"].startswith("\n\nHuman: My neighbour's dog barks all night.")


def test_oasst1_follows_the_top_ranked_path():
    examples = load_examples("oasst1", path=str(FIXTURES / "oasst1.jsonl"))
    # Tree 1: rank 0 at the first level; at the second level the rank-0 reply is deleted, so rank 1 wins;
    # the rank-1 follow-up prompt ("freeze it") and every lower-ranked reply are left out.
    assert examples[0]["target"] == (
        "### Human: How do I keep a sourdough starter alive while I am away for two weeks?"
        "### Assistant: Feed it, let it rise for an hour, then put the jar in the fridge. "
        "A cold starter can go two or three weeks without food."
        "### Human: Will it smell strange when I get back?"
        "### Assistant: Probably a little sour, and a grey liquid may sit on top. "
        "Pour it off, feed the starter twice and it will be lively again."
    )
    # Tree 2: the rank-0 reply failed review; the unanswered follow-up prompt is dropped.
    assert examples[1]["target"] == (
        "### Human: Write a haiku about a lighthouse."
        "### Assistant: Salt wind on the rocks\na single eye turns all night\nships count the long beams"
    )
    assert examples[2]["target"].startswith("### Human: ¿Cuál es la diferencia")
    # Tree 6: an unranked lone reply is taken; rank beats creation date among siblings.
    assert examples[3]["target"].endswith(
        "### Human: Something less common, please.### Assistant: Graphite, Mistral or Tinsel."
    )
    everything = "".join(ex["target"] for ex in examples)
    for excluded in ("throw it away", "freeze it", "cheap watches", "john smith", "Skat", "Canberra", "Nimbus"):
        assert excluded not in everything
    assert all(ex["source"] == "" for ex in examples)


def test_oasst1_language_variant_keeps_only_that_language():
    examples = load_examples("oasst1", path=str(FIXTURES / "oasst1.jsonl"), variant="en")
    assert not any("¿" in ex["target"] for ex in examples)


def test_guanaco_text_is_the_target():
    rows = read_jsonl("guanaco.jsonl")
    assert load_examples("guanaco", path=str(FIXTURES / "guanaco.jsonl")) == [
        {"source": "", "target": row["text"]} for row in rows
    ]


def test_unnatural_instances_and_reformulations():
    core = load_examples("unnatural", path=str(FIXTURES / "unnatural_core.jsonl"), variant="core")
    assert core[0] == {
        "source": "You are given a list of numbers. Return the largest number in the list.\nList: [3, 17, 9, 2]\n",
        "target": "17",
    }
    full = load_examples("unnatural", path=str(FIXTURES / "unnatural_full.jsonl"), variant="full")
    assert {"source": "Which number in [3, 17, 9, 2] is the biggest?\n", "target": "17"} in full
    assert all(ex in full for ex in core)


def test_unnatural_accepts_struct_of_lists(tmp_path):
    # datasets' to_json writes a Sequence feature as a struct of lists; the loader must read it the same.
    rows = read_jsonl("unnatural_core.jsonl")
    for row in rows:
        row["instances"] = {key: [inst[key] for inst in row["instances"]] for key in row["instances"][0]}
    path = write_jsonl(tmp_path / "core.jsonl", rows)
    assert load_examples("unnatural", path=str(path)) == load_examples(
        "unnatural", path=str(FIXTURES / "unnatural_core.jsonl")
    )


def test_unnatural_full_needs_reformulations():
    with pytest.raises(ValueError, match="reformulations"):
        load_examples("unnatural", path=str(FIXTURES / "unnatural_core.jsonl"), variant="full")


def test_open_platypus_uses_the_alpaca_prompt():
    examples = load_examples("open_platypus", path=str(FIXTURES / "open_platypus.jsonl"))
    rows = read_jsonl("open_platypus.jsonl")
    assert examples[0]["source"] == ALPACA_PROMPT_NO_INPUT.format(instruction=rows[0]["instruction"])
    assert examples[3]["source"] == ALPACA_PROMPT_INPUT.format(
        instruction=rows[3]["instruction"], input=rows[3]["input"]
    )
    assert examples[3]["source"].endswith("D. Whales are fish.\n\n### Response: ")
    assert [ex["target"] for ex in examples] == [row["output"] for row in rows]


def test_alpaca_json_list(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(alpaca_rows(6)), encoding="utf-8")
    examples = load_examples("alpaca", path=str(path))
    assert examples[0]["source"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd 0 and 1.\n\n### Input:\nnumbers 0, 1\n\n### Response: "
    )
    assert examples[1]["source"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 1 and 2.\n\n### Response: "
    )
    assert examples[1]["target"] == "The sum is 3."


def test_guanaco_llama2_drops_the_literal_wrapper(tokenizer):
    examples = load_examples("guanaco_llama2", path=str(FIXTURES / "guanaco_llama2_1k.jsonl"))
    assert examples[0]["target"] == (
        "[INST] What is the boiling point of water at sea level? [/INST] "
        "100 degrees Celsius, or 212 degrees Fahrenheit."
    )
    assert examples[4]["target"] == (
        "[INST] What is 15% of 80? [/INST] 15% of 80 is 12. </s><s>[INST] And 20%? [/INST] 20% of 80 is 16."
    )
    feature = tokenize_examples(examples[:1], tokenizer, max_source_len=16, max_target_len=512, train_on_source=False)[
        0
    ]
    assert feature["input_ids"].count(tokenizer.bos_token_id) == 1
    assert feature["input_ids"].count(tokenizer.eos_token_id) == 1


def test_tiny_alpaca_asset_loads():
    path = ASSETS / "tiny_alpaca.json"
    if not path.exists():
        pytest.skip("tiny_alpaca.json is generated by another module")
    check_source("alpaca", str(path), None)
    assert load_examples("alpaca", path=str(path))


def test_local_json_with_2k_examples_loads_in_under_a_second(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(alpaca_rows(2000)), encoding="utf-8")
    start = time.perf_counter()
    examples = load_examples("alpaca", path=str(path))
    assert time.perf_counter() - start < 1.0
    assert len(examples) == 2000


def test_gzip_glob_and_parquet(tmp_path):
    rows = read_jsonl("hh_rlhf.jsonl")
    for name, part in (("harmless-base", rows[:5]), ("helpful-base", rows[5:])):
        (tmp_path / name).mkdir()
        with gzip.open(tmp_path / name / "train.jsonl.gz", "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in part)
    expected = load_examples("hh_rlhf", path=str(FIXTURES / "hh_rlhf.jsonl"))
    assert load_examples("hh_rlhf", path=str(tmp_path / "*" / "train.jsonl.gz")) == expected

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(read_jsonl("unnatural_full.jsonl")), tmp_path / "full.parquet")
    assert load_examples("unnatural", path=str(tmp_path / "full.parquet"), variant="full") == load_examples(
        "unnatural", path=str(FIXTURES / "unnatural_full.jsonl"), variant="full"
    )


def test_bad_variant_and_cap_are_rejected():
    with pytest.raises(ValueError, match="no variant 'large'.*null, core, full"):
        load_examples("unnatural", path=str(FIXTURES / "unnatural_core.jsonl"), variant="large")
    with pytest.raises(ValueError, match="no variant"):
        load_examples("guanaco", path=str(FIXTURES / "guanaco.jsonl"), variant="core")
    with pytest.raises(ValueError, match="max_examples"):
        load_examples("guanaco", path=str(FIXTURES / "guanaco.jsonl"), max_examples=0)


def test_hub_failure_says_how_to_work_offline(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)  # never touch the network in tests
    with pytest.raises(ConnectionError, match="set data.path to a local copy"):
        load_examples("hh_rlhf", hub_id="Anthropic/hh-rlhf")


def test_rows_that_give_no_examples_are_an_error(tmp_path):
    rows = [row for row in read_jsonl("oasst1.jsonl") if row["role"] == "prompter"]
    with pytest.raises(ValueError, match="gave no oasst1 examples"):
        load_examples("oasst1", path=str(write_jsonl(tmp_path / "prompts.jsonl", rows)))


# ---------------------------------------------------------------------------------------------------------
# check_source
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "fmt"), sorted({(name, fmt) for name, fmt, _, _ in FIXTURE_CASES}))
def test_check_source_accepts_the_fixtures(name, fmt):
    check_source(fmt, str(FIXTURES / name), None)


def test_check_source_accepts_a_hub_id_without_network():
    check_source("hh_rlhf", None, "Anthropic/hh-rlhf")


def test_check_source_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.jsonl"):
        check_source("guanaco", str(tmp_path / "nope.jsonl"), None)
    with pytest.raises(FileNotFoundError, match="no data file matches"):
        check_source("guanaco", str(tmp_path / "*.jsonl"), None)


def test_check_source_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        check_source("guanaco", str(tmp_path / "empty.jsonl"), None)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="has no rows"):
        check_source("guanaco", str(tmp_path / "blank.jsonl"), None)


def test_check_source_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 3: malformed JSON"):
        check_source("guanaco", str(path), None)


def test_check_source_malformed_json_list_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    with pytest.raises(ValueError, match=r"bad.json line 3: malformed JSON"):
        check_source("guanaco", str(path), None)


def test_check_source_missing_fields_names_expected_and_found(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"chosen": "x"}, {"prompt": "p", "rejected": "r"}])
    with pytest.raises(
        ValueError,
        match=r"row 2: missing field\(s\) chosen; .*expects chosen "
        r"and the row has prompt, rejected",
    ):
        check_source("hh_rlhf", str(path), None)


def test_check_source_rejects_non_objects(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[{"text": "a"}, "b"]')
    with pytest.raises(ValueError, match="row 2: expected a JSON object, found str"):
        check_source("guanaco", str(path), None)


def test_check_source_unknown_format_and_no_source():
    with pytest.raises(ValueError, match="unknown data format 'sharegpt'; choose one of: alpaca, hh_rlhf"):
        check_source("sharegpt", str(FIXTURES / "guanaco.jsonl"), None)
    with pytest.raises(ValueError, match="neither a path nor a hub_id"):
        check_source("guanaco", None, None)


def test_check_source_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        check_source("guanaco", str(tmp_path), None)


# ---------------------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------------------


def test_split_is_80_20_deterministic_and_disjoint():
    items = list(range(25))
    train, val = split_train_val(items, 0.2, seed=42)
    assert (len(train), len(val)) == (20, 5)
    assert sorted(train + val) == items
    assert split_train_val(items, 0.2, seed=42) == (train, val)
    assert split_train_val(items, 0.2, seed=7)[1] != val


def test_split_of_examples_and_edge_cases():
    examples = load_examples("hh_rlhf", path=str(FIXTURES / "hh_rlhf.jsonl"))
    train, val = split_train_val(examples, 0.2, seed=42)
    assert (len(train), len(val)) == (9, 3)  # ceil(12 * 0.2) = 3, as HF's train_test_split
    assert not {ex["target"] for ex in train} & {ex["target"] for ex in val}
    assert split_train_val(examples, 0.0, seed=1)[1] == []
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(examples, 1.0, seed=1)
    with pytest.raises(ValueError, match="too few"):
        split_train_val([1], 0.5, seed=1)


# ---------------------------------------------------------------------------------------------------------
# Tokenization and collation
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def platypus():
    return load_examples("open_platypus", path=str(FIXTURES / "open_platypus.jsonl"))


def test_labels_mask_exactly_the_source(tokenizer, platypus):
    features = tokenize_examples(platypus, tokenizer, max_source_len=512, max_target_len=512, train_on_source=False)
    assert len(features) == len(platypus)
    for ex, feature in zip(platypus, features, strict=True):
        n_source = 1 + len(encode(tokenizer, ex["source"]))
        target = encode(tokenizer, ex["target"]) + [tokenizer.eos_token_id]
        assert feature["input_ids"][0] == tokenizer.bos_token_id
        assert feature["input_ids"][n_source:] == target
        assert feature["labels"] == [IGNORE_INDEX] * n_source + target


def test_train_on_source_masks_nothing(tokenizer, platypus):
    features = tokenize_examples(platypus, tokenizer, max_source_len=512, max_target_len=512, train_on_source=True)
    assert all(f["labels"] == f["input_ids"] for f in features)
    batch = collate(features, pad_id=tokenizer.pad_token_id)
    assert ((batch["labels"] == IGNORE_INDEX) == (batch["attention_mask"] == 0)).all()


def test_truncation_limits_hold(tokenizer, platypus):
    full = tokenize_examples(platypus, tokenizer, max_source_len=512, max_target_len=512, train_on_source=False)
    cut = tokenize_examples(platypus, tokenizer, max_source_len=8, max_target_len=5, train_on_source=False)
    for whole, short in zip(full, cut, strict=True):
        n_source = short["labels"].count(IGNORE_INDEX)
        assert n_source == 8 and len(short["input_ids"]) - n_source <= 5
        assert short["input_ids"][:8] == whole["input_ids"][:8]  # right truncation keeps the start
        whole_source = whole["labels"].count(IGNORE_INDEX)
        assert short["input_ids"][8:] == whole["input_ids"][whole_source : whole_source + 5]


def test_empty_targets_are_skipped_with_a_warning(tokenizer):
    examples = [{"source": "a", "target": "b"}, {"source": "a", "target": ""}]
    with pytest.warns(UserWarning, match="skipped 1 of 2 examples with an empty target"):
        features = tokenize_examples(examples, tokenizer, max_source_len=8, max_target_len=8, train_on_source=False)
    assert len(features) == 1


def test_bad_lengths_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="max_source_len"):
        tokenize_examples([], tokenizer, max_source_len=0, max_target_len=8, train_on_source=False)


def test_collate_pads_right_and_masks_pads(tokenizer, platypus):
    features = tokenize_examples(platypus[:4], tokenizer, max_source_len=512, max_target_len=512, train_on_source=False)
    # pad == eos, as many causal LMs are set up: the mask must still keep each example's EOS.
    batch = collate(features, pad_id=tokenizer.eos_token_id)
    width = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, width)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == feature["input_ids"]
        assert batch["labels"][row, :n].tolist() == feature["labels"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


# ---------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------


def lengths_for_batching(n: int = 1000) -> list[int]:
    import random

    rng = random.Random(0)
    return [rng.randint(5, 500) for _ in range(n)]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_batches_cover_every_index_once(group_by_length):
    lengths = lengths_for_batching(1003)
    batches = make_batches(lengths, 8, seed=3, group_by_length=group_by_length)
    assert sorted(i for batch in batches for i in batch) == list(range(1003))
    assert sorted(len(b) for b in batches)[1:] == [8] * (len(batches) - 1)
    assert batches == make_batches(lengths, 8, seed=3, group_by_length=group_by_length)
    assert batches != make_batches(lengths, 8, seed=4, group_by_length=group_by_length)
    dropped = make_batches(lengths, 8, seed=3, group_by_length=group_by_length, drop_last=True)
    assert len(dropped) == 1003 // 8 and all(len(b) == 8 for b in dropped)


def test_group_by_length_lowers_within_batch_variance():
    lengths = lengths_for_batching()

    def mean_variance(batches):
        return statistics.mean(statistics.pvariance([lengths[i] for i in b]) for b in batches)

    grouped = make_batches(lengths, 8, seed=0, group_by_length=True)
    shuffled = make_batches(lengths, 8, seed=0, group_by_length=False)
    assert mean_variance(grouped) < 0.1 * mean_variance(shuffled)
    assert max(lengths) in [lengths[i] for i in grouped[0]]  # longest batch first: OOM shows at step 1


def test_make_batches_edge_cases():
    assert make_batches([], 4, seed=0, group_by_length=True) == []
    with pytest.raises(ValueError, match="batch_size"):
        make_batches([1, 2], 0, seed=0, group_by_length=False)


# ---------------------------------------------------------------------------------------------------------
# conf/data
# ---------------------------------------------------------------------------------------------------------

CONFIG_KEYS = {
    "name",
    "format",
    "hub_id",
    "path",
    "variant",
    "template",
    "val_fraction",
    "split_seed",
    "max_source_len",
    "max_target_len",
    "train_on_source",
    "group_by_length",
    "max_examples",
}
# Which fixture stands in for each config's hub data in the test below.
CONFIG_FIXTURES = {
    "alpaca": None,
    "tiny_alpaca": None,
    "hh_rlhf": "hh_rlhf.jsonl",
    "oasst1": "oasst1.jsonl",
    "guanaco": "guanaco.jsonl",
    "unnatural_core": "unnatural_core.jsonl",
    "unnatural_full": "unnatural_full.jsonl",
    "open_platypus": "open_platypus.jsonl",
    "guanaco_llama2_1k": "guanaco_llama2_1k.jsonl",
}


@pytest.mark.parametrize("config", sorted(CONF_DATA.glob("*.yaml")), ids=lambda p: p.stem)
def test_data_config_is_well_formed(config, tmp_path):
    text = config.read_text(encoding="utf-8")
    assert text.startswith("# "), "each config starts with a comment line saying what the data set is"
    cfg = yaml.safe_load(text)
    assert set(cfg) == CONFIG_KEYS
    assert cfg["name"] == config.stem and cfg["format"] in FORMATS
    assert cfg["path"] or cfg["hub_id"]
    assert 0 < cfg["val_fraction"] < 1 and cfg["max_source_len"] >= 1 and cfg["max_target_len"] >= 1
    fixture = CONFIG_FIXTURES[config.stem]
    if fixture is None:  # alpaca-schema configs: a small file written here
        fixture = tmp_path / "alpaca.json"
        fixture.write_text(json.dumps(alpaca_rows(5)), encoding="utf-8")
    examples = load_examples(cfg["format"], path=str(FIXTURES / fixture), variant=cfg["variant"])
    train, val = split_train_val(examples, cfg["val_fraction"], cfg["split_seed"])
    assert train and val


def test_every_data_config_has_a_fixture():
    assert {p.stem for p in CONF_DATA.glob("*.yaml")} == set(CONFIG_FIXTURES)
