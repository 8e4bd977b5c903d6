"""Is the model a card names the model that will load? The card's shapes against the checkpoint's own config.json
(at model.path, or the hub id's snapshot in the local Hugging Face cache), and a hub id never ignored silently.
Run by spec.validate before any weight is read; never downloads. A run that trains also needs the weights to be
there (check_weights, in the recipe's pre-flight: plan mode reads config.json alone)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from qpeft_bench import families
from qpeft_bench.config import ConfigError, ModelConfig, cached_hub_file
from qpeft_bench.data_files import is_lfs_pointer

# Shapes a card and its checkpoint must agree on (the rest, e.g. rope_theta, may be tuned by a user's card).
ARCH_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "ffn_dim",
    "vocab_size",
)


def _compare_arch(expected: dict, expected_where: str, found: tuple[dict, str] | None, name: str) -> None:
    if found is None:
        return
    config, where = found
    for key in ARCH_KEYS:
        want, got = expected.get(key), config.get(key)
        if key == "num_key_value_heads":  # absent means one KV head per attention head
            want = want if want is not None else expected.get("num_attention_heads")
            got = got if got is not None else config.get("num_attention_heads")
        if want is not None and got is not None and want != got:
            raise ConfigError(
                f"model {name!r}: {expected_where} has {key}={want} but the checkpoint's {where} has {key}={got}; "
                "it is another model: choose its card, or a card with arch: null to read config.json"
            )


def check_checkpoint(card: ModelConfig, where: str = "model") -> None:
    """A named model must be that model: the card's shapes against the checkpoint's config.json, and a hub id
    never ignored silently (with both path and hub_id set the path is loaded)."""
    found = card.checkpoint_config()
    if card.path is not None and card.hub_id and card.arch is None:
        hub = cached_hub_file(card.hub_id, "config.json")
        if hub is None:
            raise ConfigError(
                f"{where}.hub_id={card.hub_id!r} and {where}.path={card.path!r} are both set and the card has no "
                f"arch to tell them apart; the path would be loaded: set {where}.path=null to load "
                f"{card.hub_id} (from the local HF cache), or {where}.hub_id=null"
            )
        _compare_arch(json.loads(hub.read_text()), f"{card.hub_id} ({hub})", found, card.name)
    if card.arch is not None and found is not None:
        _compare_arch({"model_type": card.family, **card.arch}, f"the card {card.name!r}", found, card.name)


def resolve_family(card: ModelConfig, where: str = "model") -> ModelConfig:
    """The card with its family and linears made concrete: `family: null` (a model without a card) takes the
    checkpoint's model_type; a family that contradicts the checkpoint's is refused; `linear_names: null` is every
    linear of the family; `name: auto` is the checkpoint's folder or hub id. One line for an unknown model_type."""
    found = card.checkpoint_config()
    found_type = found[0].get("model_type") if found else None
    family = card.family
    if family is None:
        if found is None:
            raise ConfigError(
                f"{where}.family is null and there is no config.json to read it from ({where}.path="
                f"{card.path!r}, {where}.hub_id={card.hub_id!r} not in the local HF cache): set {where}.path to the "
                "checkpoint's directory"
            )
        if not found_type:
            raise ConfigError(f"{found[1]} has no model_type: set {where}.family")
        family = found_type
    elif found_type and found_type != family:
        raise ConfigError(
            f"model {card.name!r}: the card's family={family} but {found[1]} has model_type={found_type}; it is "
            f"another model: choose its card, or model=auto {where}.path=..."
        )
    fam = families.get(family)
    names = list(card.linear_names) if card.linear_names is not None else fam.linear_names
    unknown = [n for n in names if n not in fam.linear_names]
    if unknown:
        raise ConfigError(
            f"{where}.linear_names {unknown} are no linear of a {family} block ({', '.join(fam.linear_names)})"
        )
    name = card.name
    if name == "auto":
        name = Path(card.path).name if card.path is not None else str(card.hub_id).rsplit("/", 1)[-1]
    return dataclasses.replace(card, name=name, family=family, linear_names=names)


# What transformers' from_pretrained reads from a local directory: one file, or the shards an index names.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_weights(card: ModelConfig, where: str = "model") -> None:
    """model.path holds weights transformers can load: a weight file, or every shard its index names, none of them
    a Git LFS pointer. A hub id is left to the cache lookup of from_pretrained."""
    if card.path is None:
        return
    root = Path(card.path)
    files = [root / name for name in WEIGHT_FILES if (root / name).is_file()]
    for index in (root / name for name in WEIGHT_INDEXES):
        if not index.is_file() or files:
            continue
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{index} is not a readable weight index ({type(err).__name__}: {err})") from err
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise ConfigError(
                f"{where}.path={card.path!r}: {index.name} names {len(missing)} shard(s) that are not there, "
                f"e.g. {missing[0]}; finish the download"
            )
        files = [root / s for s in shards]
    if not files:
        raise ConfigError(
            f"{where}.path={card.path!r} holds no weights ({', '.join(WEIGHT_FILES)} or a sharded index); "
            "mode=plan needs only config.json, a run needs the checkpoint"
        )
    for file in files:
        if is_lfs_pointer(file):
            raise ConfigError(f"{file} is a Git LFS pointer, not the weights; run `git lfs pull` in {root}")
    _check_block_count(card, [f for f in files if f.suffix == ".safetensors"], where)


_BLOCK_KEY = re.compile(r"\.layers\.(\d+)\.")


def _check_block_count(card: ModelConfig, files: list[Path], where: str) -> None:
    """The weights hold as many decoder blocks as the architecture says: transformers would otherwise initialise
    the missing blocks at random (or drop the extra ones) with only a log line, and the run would complete on a
    model that is not the checkpoint. Reads the safetensors headers only."""
    if not files:
        return
    from safetensors import safe_open

    blocks: set[int] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            blocks.update(int(m.group(1)) for k in f.keys() if (m := _BLOCK_KEY.search(k)))
    want = card.arch_dict().get("num_hidden_layers")
    have = max(blocks) + 1 if blocks else 0
    if want is not None and have != want:
        raise ConfigError(
            f"{where}.path={card.path!r}: the weights hold {have} decoder blocks but the architecture says "
            f"num_hidden_layers={want}; the config.json (or the card) is not this checkpoint's"
        )
