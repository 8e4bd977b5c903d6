"""Fine-tuning data: load the studies' data sets, format them as QLoRA does, split, tokenize, batch.

Pipeline (each step takes plain arguments, never the config):
    check_source -> load_examples -> split_train_val -> tokenize_examples -> make_batches -> collate

Every data set is read either from the hub (``hub_id``) or from a local file in the *hub's own schema*
(``path``: .json, .jsonl, .parquet, optionally .gz, or a glob over several files such as the hh-rlhf
subsets). Offline machines therefore run the same formatting code as online ones. data_files.py reads the files
(and names what is wrong with one); here the rows are checked against their format.

Each format (data_formats.py) turns raw rows into examples ``{"source": str, "target": str}``; the loss goes on
the target (and on the source too when ``train_on_source``).
"""

from __future__ import annotations

import functools
import math
import random
import typing
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from qpeft_bench.data_files import not_a_list, read_file, resolve_files, row_label
from qpeft_bench.data_formats import (
    DEFAULT_TEMPLATE,
    Example,
    Row,
    RowCheck,
    build_examples,
    check_template,
    check_variant,
    get_format,
    required_fields,
)

if TYPE_CHECKING:  # torch costs ~1 s to import; check_source and load_examples must stay cheap
    import torch

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips

# Sort window of group-by-length batching, in batches: HF's LengthGroupedSampler uses 50.
MEGABATCH_FACTOR = 50


# ---------------------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------------------


def _read_rows(path: str, fields: tuple[str, ...], check: RowCheck | None = None) -> list[Row]:
    """Every row of the file(s) at `path`, each an object with `fields` and passing `check` (a format's row check).
    Also the reader of evaluation.perplexity's local WikiText copies."""
    rows = []
    for file in resolve_files(path):
        file_rows, lines = read_file(file)
        if not file_rows:
            raise ValueError(f"data file {file} has no rows")
        _check_rows(file_rows, fields, file, lines, check)
        rows.extend(file_rows)
    return rows


def _check_rows(
    rows: list, fields: tuple[str, ...], where: Path | str, lines: list[int] | None, check: RowCheck | None
) -> None:
    """Every row an object with `fields`, then (a second pass, so a missing field is named first) each field the
    format reads of the right type (data_formats' row checks). ValueError naming the row, and its line if it is not
    the row's number."""

    if len(rows) == 1 and isinstance(rows[0], dict) and any(name not in rows[0] for name in fields):
        if any(isinstance(v, list) for v in rows[0].values()):  # {"data": [...]} on one line
            raise not_a_list(rows[0], where)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(
                f"{row_label(where, number, lines)}: expected a JSON object, found {'null' if row is None else type(row).__name__}"
            )
        missing = [name for name in fields if name not in row]
        if missing:
            raise ValueError(
                f"{row_label(where, number, lines)}: missing field(s) {', '.join(missing)}; this format expects "
                f"{', '.join(fields)} and the row has {', '.join(row) or 'no fields'}"
            )
    for number, row in enumerate(rows, start=1):
        if check and (problem := check(row)):
            raise ValueError(f"{row_label(where, number, lines)}: {problem}")


def _require_source(fmt: str, path: str | None, hub_id: str | None) -> None:
    if path is None and not hub_id:
        raise ValueError(f"data format {fmt!r} has neither a path nor a hub_id; set data.path or data.hub_id")


def _hub_rows(hub_id: str) -> list[Row]:
    import datasets  # lazy: ~1 s to import and never needed for local files

    # Only the train split: the studies' counts (hh-rlhf 160,800, guanaco 9,846) are train-split counts,
    # and we make our own 80/20 split from it. Anthropic/hh-rlhf's default config already combines the
    # helpful and harmless subsets.
    try:
        return datasets.load_dataset(hub_id, split="train").to_list()
    except ConnectionError as err:  # what an offline machine gets
        raise ConnectionError(f"{err}; offline, set data.path to a local copy in the hub's schema") from err


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def check_source(fmt: str, path: str | None, hub_id: str | None, template: str = DEFAULT_TEMPLATE) -> None:
    """Cheap pre-flight check of a data source: no model, no tokenizer, no network.

    Reads and parses every file (52k Alpaca rows in ~0.3 s) and raises ValueError or FileNotFoundError, each one line
    that names the file, and the row (and line) and field where there is one, and says what to fix: an unknown
    format, a template the format does not take, a missing file, a glob that matches nothing or a directory, a file
    that is empty, not a regular file, not UTF-8 (line and byte offset), a Git LFS pointer, named .gz but not gzip
    or truncated, not Parquet, malformed JSON (line), one JSON object or scalar instead of a list of rows, a row that
    is not an object, lacks a field, or holds a field of the wrong type (a null instruction, a numeric output: each
    format's row check in data_formats). A hub id cannot be checked offline; only its presence is.
    """
    fields = get_format(fmt).fields
    check_template(fmt, template)
    _require_source(fmt, path, hub_id)
    if path is not None:
        _read_rows(path, fields, get_format(fmt).check)


def load_examples(
    fmt: str,
    *,
    path: str | None = None,
    hub_id: str | None = None,
    variant: str | None = None,
    max_examples: int | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> list[Example]:
    """Load a data set and format it as ``[{"source": str, "target": str}, ...]`` (see the module doc).

    ``path`` (a local file or glob in the hub's schema) wins over ``hub_id``. ``max_examples`` keeps the
    first N formatted examples, in file order, for smoke runs. ``template``: the Alpaca prompt (qlora, stanford).
    """
    check_variant(fmt, variant)
    check_template(fmt, template)
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or null, got {max_examples}")
    fields = required_fields(fmt, variant)
    _require_source(fmt, path, hub_id)
    if path is not None:
        rows, where = _read_rows(path, fields, get_format(fmt).check), path
    else:
        rows, where = _hub_rows(hub_id), hub_id
        _check_rows(rows, fields, where, None, get_format(fmt).check)
    examples = build_examples(fmt, rows, variant, template)
    if not examples:
        raise ValueError(f"{where}: {len(rows)} rows gave no {fmt} examples (check the format and variant)")
    return examples if max_examples is None else examples[:max_examples]


def split_train_val(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic shuffled split; the validation part has ceil(n * val_fraction) items, as HF's
    ``train_test_split`` rounds. Both parts keep the shuffled order."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = math.ceil(len(examples) * val_fraction)
    if n_val >= len(examples):
        raise ValueError(f"{len(examples)} examples are too few for val_fraction={val_fraction}")
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def _special_ids(tokenizer) -> tuple[list[int], int]:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; the target needs one to learn where to stop")
    # Some tokenizers (e.g. Qwen's) have no BOS; their models are trained without one, so add none.
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return bos, tokenizer.eos_token_id


def check_tokenizer(tokenizer, where: str, vocab_size: int | None = None) -> None:
    """Pre-flight: the tokenizer has what tokenization and batching need, an EOS (where every target ends) and a pad
    id (models.load_tokenizer pads with unk or EOS when a tokenizer ships without one, as LLaMA's does), and no id
    beyond the model's `vocab_size` embedding rows. Raises ValueError naming `where` (its directory or hub id),
    before the model is loaded rather than after."""
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer of {where} has {len(tokenizer)} ids but the model's embedding has vocab_size={vocab_size} "
            "rows: ids beyond it would index past the embedding; use the checkpoint's own tokenizer"
        )
    problems = []
    if tokenizer.eos_token_id is None:
        problems.append("no eos_token (where every target ends)")
    if tokenizer.pad_token_id is None:
        problems.append("no pad_token, nor an unk_token or eos_token to pad batches with")
    if problems:
        raise ValueError(
            f"the tokenizer of {where} has {' and '.join(problems)}; set them in its "
            'tokenizer_config.json (e.g. "eos_token": "</s>", "pad_token": "<unk>") or choose another '
            "model.path"
        )


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # add_special_tokens=False so that BOS/EOS come only from _special_ids, whatever the tokenizer's
    # auto-BOS setting; one batched call so fast tokenizers use their Rust thread pool.
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def tokenize_examples(
    examples: list[Example], tokenizer, *, max_source_len: int, max_target_len: int, train_on_source: bool
) -> list[dict[str, list[int]]]:
    """Tokenize as QLoRA's collator does: ``[BOS] + source`` cut to ``max_source_len`` tokens, then
    ``target + [EOS]`` cut to ``max_target_len``; labels are IGNORE_INDEX on the source unless
    ``train_on_source``.

    Both parts are truncated from the right, like QLoRA (the tokenizer default), so runs match the
    studies: the source keeps BOS and the start of the instruction (it may lose the "### Response:" cue
    when longer than max_source_len), a long target loses its end and its EOS.

    Examples whose target has no tokens (an empty reply: nothing but EOS to learn) are skipped with a
    warning; the number skipped is ``len(examples) - len(result)``.
    """
    if max_source_len < 1 or max_target_len < 1:
        raise ValueError(f"max_source_len and max_target_len must be >= 1, got {max_source_len}, {max_target_len}")
    bos, eos = _special_ids(tokenizer)
    sources = _encode(tokenizer, [ex["source"] for ex in examples])
    targets = _encode(tokenizer, [ex["target"] for ex in examples])
    features = []
    for source_ids, target_ids in zip(sources, targets, strict=True):
        if not target_ids:
            continue
        source = (bos + source_ids)[:max_source_len]
        target = (target_ids + [eos])[:max_target_len]
        labels = source + target if train_on_source else [IGNORE_INDEX] * len(source) + target
        features.append({"input_ids": source + target, "labels": labels})
    if skipped := len(examples) - len(features):
        warnings.warn(f"skipped {skipped} of {len(examples)} examples with an empty target", stacklevel=2)
    return features


def make_batches(
    lengths: list[int], batch_size: int, *, seed: int, group_by_length: bool, drop_last: bool = False
) -> list[list[int]]:
    """Index batches for one epoch (pass a different seed per epoch, e.g. seed + epoch).

    Without group_by_length: a seeded random order cut into batches. With it (QLoRA's option, HF's
    LengthGroupedSampler): after a seeded shuffle, each megabatch of MEGABATCH_FACTOR * batch_size
    indices is sorted by length, so a batch holds similar lengths and wastes little padding; the batch
    order is then shuffled, and the batch holding the longest sequence goes first, as HF does, so an
    out-of-memory error shows at step 1 rather than hours in. (A memory peak measured only after warm-up
    will therefore miss that batch.) Similar lengths per batch make the loss curve oscillate.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = MEGABATCH_FACTOR * batch_size
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda i: -lengths[i])
        ]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length and batches:
        rng.shuffle(batches)
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def collate(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. The attention mask comes from the true lengths, not from ``input_ids != pad_id``
    (QLoRA's way), which would hide the EOS of every example when pad_id == eos_id."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.tensor(feature["input_ids"])
        labels[row, :n] = torch.tensor(feature["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Prepared(typing.NamedTuple):
    """A data set read, formatted, split and tokenized: what training and the held-out evaluation start from."""

    examples: int  # formatted examples kept (after max_examples)
    train_examples: list[Example]  # the training split before tokenization (calibration windows are cut from it)
    train_set: list[dict[str, list[int]]]
    val_set: list[dict[str, list[int]]]


def prepare(d, tokenizer) -> Prepared:
    """`d` (the data section: format, path or hub_id, variant, template, max_examples, val_fraction, split_seed,
    lengths) read, formatted, split and tokenized. The recipe calls it before the run's first record and before any
    model is loaded, so a data set that cannot train (too few rows for the split, every target empty) is one line
    naming the knobs and the file, not a failed run."""
    where = d.path or d.hub_id
    examples = load_examples(
        d.format, path=d.path, hub_id=d.hub_id, variant=d.variant, max_examples=d.max_examples, template=d.template
    )
    n_val = math.ceil(len(examples) * d.val_fraction)
    if n_val >= len(examples) or n_val < 1:
        kept = f" (data.max_examples={d.max_examples})" if d.max_examples is not None else ""
        raise ValueError(
            f"data {where}: {len(examples)} example(s){kept} are too few for data.val_fraction={d.val_fraction}: "
            f"the split needs at least one training and one validation example; add rows, raise data.max_examples "
            "or change data.val_fraction"
        )
    train_ex, val_ex = split_train_val(examples, d.val_fraction, d.split_seed)
    with warnings.catch_warnings():  # the counts below say it, once
        warnings.simplefilter("ignore")
        tok = functools.partial(
            tokenize_examples,
            tokenizer=tokenizer,
            max_source_len=d.max_source_len,
            max_target_len=d.max_target_len,
            train_on_source=d.train_on_source,
        )
        train_set, val_set = tok(train_ex), tok(val_ex)
    if not train_set or not val_set:
        raise ValueError(
            f"data {where}: {len(train_set)} of {len(train_ex)} training and {len(val_set)} of {len(val_ex)} validation "
            "examples have a non-empty target after tokenization; need at least one of each (are the targets empty?)"
        )
    if skipped := len(train_ex) + len(val_ex) - len(train_set) - len(val_set):
        warnings.warn(f"data {where}: skipped {skipped} of {len(examples)} examples with an empty target", stacklevel=2)
    return Prepared(len(examples), train_ex, train_set, val_set)
