"""Fine-tuning data formats: raw rows of each data set, in the hub's own schema, turned into examples.

Each loader turns raw rows into examples ``{"source": str, "target": str}``; the loss goes on the target
(and on the source too when ``train_on_source``). What each format produces:

- ``alpaca``, ``open_platypus``: source = the Alpaca prompt of ``template`` (with or without the input block),
  target = ``output``. ``qlora`` (default): QLoRA's qlora.py, ending "### Response: " with a space, as the studies
  ran; ``stanford``: Stanford Alpaca's train.py, ending "### Response:" with none. Only the prompt changes:
  source and target are tokenized apart (data.tokenize_examples), never as one joined string as train.py does.
  The other formats bring their own layout and take only the default (``check_template``).
- ``hh_rlhf``: source = "", target = the whole ``chosen`` dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ...").
- ``oasst1``: raw OpenAssistant message trees. Per tree, follow the best reply at each level (lowest
  ``rank``, skipping deleted messages and messages that failed review) from the root prompt down to the
  last assistant reply; source = "", target = "### Human: ...### Assistant: ..." (guanaco's layout).
  ``variant`` = a language code (e.g. "en") keeps only trees whose root prompt is in that language;
  ``None`` keeps all languages, as timdettmers/openassistant-guanaco does.
- ``guanaco``: source = "", target = ``text`` ("### Human: ...### Assistant: ...").
- ``unnatural``: one example per instance: source = ``instruction_with_input`` + "\\n", target =
  ``output``; ``variant="full"`` adds one example per reformulation (the 240,670-example set),
  ``"core"`` (or ``None``) uses the instances only (66,010 rows, 68,478 instances).
- ``guanaco_llama2``: source = "", target = ``text`` without its outer "<s>" / "</s>" (we add BOS/EOS
  ids ourselves; inner turn markers stay as text).

Every format also has a row check (``_Format.check``): each field it reads has the type the hub dataset gives it,
so a ``null`` instruction is refused rather than trained on as the text "None". It returns the first problem of a
row as text (data.check_source adds the file and row), or None.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

# The authors' prompts byte for byte. QLoRA's ends with a space after "Response:" (so runs match the studies);
# Stanford Alpaca's train.py has the same words with no space (its target, output + EOS, follows directly).
_ALPACA_INTRO_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
_ALPACA_INTRO_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_PROMPT_INPUT = _ALPACA_INTRO_INPUT + " "
ALPACA_PROMPT_NO_INPUT = _ALPACA_INTRO_NO_INPUT + " "
# data.template -> (prompt with an input, prompt without); the keys are DataConfig.template's choices
ALPACA_TEMPLATES: dict[str, tuple[str, str]] = {
    "qlora": (ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT),
    "stanford": (_ALPACA_INTRO_INPUT, _ALPACA_INTRO_NO_INPUT),
}
DEFAULT_TEMPLATE = "qlora"
OASST_SPEAKERS = {"prompter": "Human", "assistant": "Assistant"}
HH_ASSISTANT = "\n\nAssistant:"  # every hh-rlhf dialogue has one (DPO's get_hh asserts it on the whole train split)

Example = dict[str, str]
Row = dict
RowCheck = Callable[[Row], str | None]  # the first problem of a row as text, or None


def _alpaca_example(row: Row, prompts: tuple[str, str]) -> Example:
    # Both authors treat a missing input like an empty one; Open-Platypus rows almost always have input "".
    prompt = prompts[0] if row.get("input") else prompts[1]
    source = prompt.format(instruction=row["instruction"], input=row.get("input") or "")
    return {"source": source, "target": row["output"]}


def _alpaca(rows: list[Row], variant: str | None, template: str = DEFAULT_TEMPLATE) -> list[Example]:
    prompts = ALPACA_TEMPLATES[template]
    return [_alpaca_example(row, prompts) for row in rows]


def _hh_rlhf(rows: list[Row], variant: str | None) -> list[Example]:
    # The studies train on the preferred dialogue only; the whole dialogue is the target (QLoRA).
    return [{"source": "", "target": row["chosen"]} for row in rows]


def _guanaco(rows: list[Row], variant: str | None) -> list[Example]:
    return [{"source": "", "target": row["text"]} for row in rows]


def _strip_llama2_wrapper(text: str) -> str:
    # The text carries literal "<s>" / "</s>" around it; we add BOS/EOS as ids, and leaving the strings in
    # would give a double BOS (tokenizers that parse special-token strings) or train on the characters
    # "<s>" (tokenizers that don't, e.g. OPT's, whose BOS is "</s>").
    text = text.strip()
    text = text.removeprefix("<s>")
    return text.removesuffix("</s>").strip()


def _guanaco_llama2(rows: list[Row], variant: str | None) -> list[Example]:
    return [{"source": "", "target": _strip_llama2_wrapper(row["text"])} for row in rows]


def _as_records(value: list | dict | None) -> list[dict]:
    # The hub stores instances as list<struct>; a file written by datasets' to_json from a Sequence
    # feature holds the same data as a struct of lists. Accept both.
    if not value:
        return []
    if isinstance(value, dict):
        return [dict(zip(value, items, strict=True)) for items in zip(*value.values(), strict=True)]
    return list(value)


def _unnatural(rows: list[Row], variant: str | None) -> list[Example]:
    # A newline ends the source so the response starts on its own line for every tokenizer: byte-level
    # BPE tokenizers would otherwise glue the first output word to the end of the input.
    fields = ("instances", "reformulations") if variant == "full" else ("instances",)
    return [
        {"source": item["instruction_with_input"] + "\n", "target": item["output"]}
        for row in rows
        for field in fields
        for item in _as_records(row.get(field))
    ]


def _oasst_usable(msg: Row) -> bool:
    # Deleted messages and those that failed review are not training data, nor is anything below them.
    # review_result is None for messages with too few reviews: only an explicit failed review excludes one.
    ready = msg.get("tree_state", "ready_for_export") == "ready_for_export"
    return ready and not msg.get("deleted") and msg.get("review_result") is not False


def _oasst_rank_key(item: tuple[int, Row]) -> tuple:
    # Lowest rank wins (0 = best). Unranked replies (a lone reply, most prompter replies) come after ranked
    # ones; ties fall to the earliest message, then file order, so the choice is deterministic.
    position, msg = item
    rank = msg.get("rank")
    return (rank is None, rank if rank is not None else 0, msg.get("created_date") or "", position)


def _oasst_best_path(root: Row, children: dict[str, list[tuple[int, Row]]]) -> list[Row]:
    path = [root]
    while replies := children.get(path[-1]["message_id"]):
        path.append(min(replies, key=_oasst_rank_key)[1])
    while path and path[-1]["role"] != "assistant":  # a trailing prompt has no answer to learn
        path.pop()
    return path


def _oasst_conversation(path: list[Row]) -> str:
    return "".join(f"### {OASST_SPEAKERS[msg['role']]}: {msg['text']}" for msg in path)


def _oasst1(rows: list[Row], variant: str | None) -> list[Example]:
    children: dict[str | None, list[tuple[int, Row]]] = defaultdict(list)
    for position, msg in enumerate(rows):
        if _oasst_usable(msg):
            children[msg["parent_id"]].append((position, msg))
    examples = []
    for _, root in children.get(None, []):
        if variant is not None and root.get("lang") != variant:
            continue
        if path := _oasst_best_path(root, children):
            examples.append({"source": "", "target": _oasst_conversation(path)})
    return examples


# ---------------------------------------------------------------------------------------------------------
# Row checks: the first problem of a row as text, or None. Missing fields are data.py's (_check_fields).
# ---------------------------------------------------------------------------------------------------------


def describe(value: object) -> str:
    """A JSON value's kind as an error message names it: null, a number (3), a list, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    kinds = {str: "a string", dict: "an object", list: "a list"}
    return kinds.get(type(value), type(value).__name__)


def _expect(row: Row, name: str, kinds: tuple[type, ...], what: str, optional: bool = False) -> str | None:
    # optional: the field may be absent or null (what Arrow gives for a row without it)
    value = row.get(name)
    if value is None and optional:
        return None
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return None
    found = "missing" if name not in row else describe(value)
    return f"field {name!r} is {found}; expected {what}"


def _text(row: Row, name: str, optional: bool = False) -> str | None:
    if type(row.get(name)) is str:  # the common case first: 52k Alpaca rows are checked in the pre-flight
        return None
    return _expect(row, name, (str,), "a string", optional)


def _first(*problems: str | None) -> str | None:
    return next((p for p in problems if p), None)


def _check_alpaca(row: Row) -> str | None:
    # `input` may be "", absent or null: all three get the prompt without the input block (_alpaca_example), as
    # both authors do for an absent or empty one; Arrow (a parquet or hub copy) turns an absent key into null.
    return _first(_text(row, "instruction"), _text(row, "output"), _text(row, "input", optional=True))


def _check_hh_rlhf(row: Row) -> str | None:
    if problem := _text(row, "chosen"):
        return problem
    if HH_ASSISTANT not in row["chosen"]:
        return (
            "field 'chosen' holds no \"\\n\\nAssistant:\" turn; an hh_rlhf row is a dialogue "
            '"\\n\\nHuman: ...\\n\\nAssistant: ..." (is this another data set\'s format?)'
        )
    return None


def _check_text(row: Row) -> str | None:
    return _text(row, "text")


def _check_oasst1(row: Row) -> str | None:
    if problem := _text(row, "role"):
        return problem
    if row["role"] not in OASST_SPEAKERS:
        return f"field 'role' is {row['role']!r}; expected one of {', '.join(OASST_SPEAKERS)}"
    return _first(
        _text(row, "message_id"),
        _text(row, "parent_id", optional=True),  # null for a tree's root prompt
        _text(row, "text"),
        _expect(row, "rank", (int, float), "a number or null", optional=True),  # null: unranked
        _text(row, "created_date", optional=True),
        _text(row, "lang", optional=True),
        _text(row, "tree_state", optional=True),
        _expect(row, "deleted", (bool,), "true, false or null", optional=True),
        _expect(row, "review_result", (bool,), "true, false or null", optional=True),
    )


def _check_records(row: Row, field: str) -> str | None:
    value = row[field]
    if isinstance(value, dict):  # a struct of lists (_as_records)
        columns = list(value.values())
        if not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) > 1:
            return f"field {field!r} is an object whose values are not lists of one length; expected a list of objects"
        value = _as_records(value)
    elif not isinstance(value, list):
        return f"field {field!r} is {describe(value)}; expected a list of objects"
    for number, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            return f"field {field!r} item {number} is {describe(item)}; expected an object"
        if problem := _first(_text(item, "instruction_with_input"), _text(item, "output")):
            return f"field {field!r} item {number}: {problem}"
    return None


def _check_unnatural(row: Row) -> str | None:
    # reformulations are read only with variant=full (required_fields); null or absent otherwise
    present = ("instances", "reformulations") if row.get("reformulations") is not None else ("instances",)
    return _first(*(_check_records(row, field) for field in present))


@dataclass(frozen=True)
class _Format:
    build: Callable[..., list[Example]]  # (rows, variant), and the template when `templated`
    fields: tuple[str, ...]  # top-level fields every row must have
    check: RowCheck  # the row check (above)
    variants: tuple[str | None, ...] = (None,)  # allowed values of `variant`; () means "any string"
    templated: bool = False  # the prompt follows data.template (ALPACA_TEMPLATES)


FORMATS: dict[str, _Format] = {
    "alpaca": _Format(_alpaca, ("instruction", "output"), _check_alpaca, templated=True),
    "hh_rlhf": _Format(_hh_rlhf, ("chosen",), _check_hh_rlhf),
    "oasst1": _Format(_oasst1, ("message_id", "parent_id", "role", "text", "rank"), _check_oasst1, variants=()),
    "guanaco": _Format(_guanaco, ("text",), _check_text),
    "unnatural": _Format(_unnatural, ("instances",), _check_unnatural, variants=(None, "core", "full")),
    "open_platypus": _Format(_alpaca, ("instruction", "output"), _check_alpaca, templated=True),
    "guanaco_llama2": _Format(_guanaco_llama2, ("text",), _check_text),
}


def get_format(fmt: str) -> _Format:
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def required_fields(fmt: str, variant: str | None) -> tuple[str, ...]:
    extra = ("reformulations",) if (fmt, variant) == ("unnatural", "full") else ()
    return get_format(fmt).fields + extra


def check_variant(fmt: str, variant: str | None) -> None:
    allowed = get_format(fmt).variants
    if allowed and variant not in allowed:
        names = ", ".join("null" if v is None else v for v in allowed)
        if allowed == (None,):
            raise ValueError(f"data format {fmt!r} has no variant {variant!r} (it has none); set data.variant=null")
        raise ValueError(f"data format {fmt!r} has no variant {variant!r}; use one of: {names}")


def check_template(fmt: str, template: str) -> None:
    """A template other than the default only where the format's prompt follows one: elsewhere it would change
    nothing but the run id, and the run would be recorded as trained on a prompt it never saw."""
    if template not in ALPACA_TEMPLATES:
        raise ValueError(
            f"data.template={template!r} is not a prompt template; choose one of: {', '.join(ALPACA_TEMPLATES)}"
        )
    if template != DEFAULT_TEMPLATE and not get_format(fmt).templated:
        takes = ", ".join(name for name, f in FORMATS.items() if f.templated)
        raise ValueError(
            f"data.template={template} applies to the Alpaca prompt ({takes}); data format {fmt!r} has its own "
            f"layout: remove data.template or set it to {DEFAULT_TEMPLATE}"
        )


def build_examples(fmt: str, rows: list[Row], variant: str | None, template: str = DEFAULT_TEMPLATE) -> list[Example]:
    """Format `rows` of data format `fmt` into examples (module doc); `template` picks the Alpaca prompt."""
    check_template(fmt, template)
    spec = get_format(fmt)
    return spec.build(rows, variant, template) if spec.templated else spec.build(rows, variant)
