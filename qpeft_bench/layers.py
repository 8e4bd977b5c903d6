"""Layer groups and per-module PEFT knobs (docs/design.md §3).

Groups of target modules:
  attn         the attention's linears: q, k, v, o projections (OPT: out_proj; Phi-3: the fused qkv_proj, o_proj)
  mlp          the MLP's linears: gate, up, down projections (OPT: fc1, fc2; Phi-3: the fused gate_up_proj, down_proj)
  first_half   blocks 0 .. n//2 - 1 (closer to the input; with an odd n the middle block is in second_half)
  second_half  blocks n//2 .. n - 1
  <name>       user-defined: a regular expression searched in the full module name (`peft.layer_groups`)

`peft.by_layer.<group>.<knob>=<value>` overrides a knob for the modules of a group. Precedence, lowest first:
the method's default < type group (attn, mlp) < depth group (first_half, second_half) < user groups, in the order
they are defined. So `by_layer.mlp.r=32 by_layer.first_half.r=16` gives r=16 to the MLP of the first half and
r=32 to the MLP of the second half: the more specific selection (depth cuts across types) wins, and a
user-defined group is the most specific of all. Overlaps are resolved this way silently only across levels;
the resolved value of every module is recorded in the run (`peft_layers`).

`peft.variant` is the sweep-friendly spelling of the same overrides, relative to the method's defaults: a list of
edits `<group>.<knob>/<n>` (the default divided by n, which must divide it), `<group>.<knob>*<n>` (multiplied) or
`<group>.<knob>:<value>` (set), e.g. `peft.variant=[mlp.r/2]` or `[attn.lambda1:8,attn.lambda2:8]`. Hydra sweeps
over lists (`peft.variant=[],[attn.r/2],[mlp.r/4]`), so the key-variable study's "rank of one group reduced 2x or
4x" is one axis whatever the baseline rank, and the variant string names the run's column in the report.
"""

from __future__ import annotations

import dataclasses
import re

from qpeft_bench import families
from qpeft_bench.config import ConfigError, from_dict

TYPE_GROUPS = families.type_groups()  # by role: attention in/out, MLP in/out, the same in every family
DEPTH_GROUPS = ("first_half", "second_half")
BUILTIN = (*TYPE_GROUPS, *DEPTH_GROUPS)
_BLOCK = re.compile(r"\.(\d+)\.")


def block_index(module_name: str) -> int:
    found = _BLOCK.search(module_name)
    if found is None:
        raise ValueError(f"{module_name}: no block index in the module name")
    return int(found.group(1))


def members(group: str, module_name: str, num_blocks: int, user_groups: dict[str, str]) -> bool:
    if group in TYPE_GROUPS:
        return module_name.rsplit(".", 1)[-1] in TYPE_GROUPS[group]
    if group in DEPTH_GROUPS:
        first = block_index(module_name) < num_blocks // 2
        return first if group == "first_half" else not first
    return re.search(user_groups[group], module_name) is not None


def resolve(modules: list[str], num_blocks: int, by_layer: dict[str, dict], user_groups: dict[str, str]) -> dict:
    """{module: {knob: value}} of the overrides that apply to each module (modules without any are left out)."""
    order = [g for g in TYPE_GROUPS if g in by_layer] + [g for g in DEPTH_GROUPS if g in by_layer]
    order += [g for g in user_groups if g in by_layer]
    out: dict[str, dict] = {}
    for name in modules:
        knobs: dict = {}
        for group in order:
            if members(group, name, num_blocks, user_groups):
                knobs.update(by_layer[group])
        if knobs:
            out[name] = knobs
    return out


_EDIT = re.compile(r"(?P<group>[A-Za-z_]\w*)\.(?P<knob>\w+)(?P<op>[/*:])(?P<value>[^/*:]+)")


def apply_variant(variant: list[str], by_layer: dict[str, dict], defaults: dict) -> dict[str, dict]:
    """by_layer with the edits of `peft.variant` applied (a new dict); `defaults` are the method's global knobs."""
    out = {g: dict(k or {}) for g, k in (by_layer or {}).items()}
    for edit in variant:
        found = _EDIT.fullmatch(str(edit).strip())
        if found is None:
            raise ConfigError(
                f"peft.variant: {edit!r} is not <group>.<knob>/<n>, <group>.<knob>*<n> or "
                "<group>.<knob>:<value> (e.g. mlp.r/2, attn.balance:4)"
            )
        group, knob, op, text = found["group"], found["knob"], found["op"], found["value"]
        if knob not in defaults:
            raise ConfigError(f"peft.variant: {edit!r}: the method has no knob {knob!r}")
        base = defaults[knob]
        try:
            value = type(base)(text) if op == ":" and isinstance(base, (int, float)) else _number(text)
        except ValueError as err:
            raise ConfigError(f"peft.variant: {edit!r}: {text!r} is not a number") from err
        if op == "/":
            if not isinstance(base, int) or not isinstance(value, int) or value <= 0 or base % value:
                raise ConfigError(f"peft.variant: {edit!r}: {knob}={base} is not divisible by {text}")
            value = base // value
        elif op == "*":
            value = base * value
        current = out.setdefault(group, {}).get(knob)
        if current is not None and current != value:
            raise ConfigError(
                f"peft.variant: {edit!r} sets {group}.{knob}={value}, but peft.by_layer.{group}.{knob}"
                f"={current} already; set it in one place"
            )
        out[group][knob] = value
    return out


def _number(text: str) -> int | float:
    return int(text) if re.fullmatch(r"-?\d+", text) else float(text)


def variant_label(variant: list[str] | None) -> str:
    """The column name of a run in the by-layer-group report: its variant, or 'uniform' for none."""
    return " ".join(variant) if variant else "uniform"


def per_module_configs(
    cfg, modules: list[str], num_blocks: int, by_layer: dict, user_groups: dict, tunable: tuple[str, ...], method: str
) -> dict:
    """{module: the method's Config with that module's overrides}, checked; {} when nothing is overridden.

    `by_layer` is {group: {knob: value or None}}; None means "not set" (the YAML lists every tunable knob so that
    command-line overrides need no `+`)."""
    for name, regex in user_groups.items():
        if name in BUILTIN:
            raise ConfigError(f"peft.layer_groups.{name}: '{name}' is a built-in group; choose another name")
        try:
            re.compile(regex)
        except re.error as err:
            raise ConfigError(f"peft.layer_groups.{name}={regex!r} is not a valid regular expression: {err}") from err
        if not any(re.search(regex, m) for m in modules):
            raise ConfigError(f"peft.layer_groups.{name}={regex!r} matches no adapted module (e.g. {modules[0]})")
    set_knobs = {}
    for group, knobs in (by_layer or {}).items():
        if group not in BUILTIN and group not in user_groups:
            raise ConfigError(
                f"peft.by_layer.{group}: unknown layer group; groups: {', '.join([*BUILTIN, *user_groups])}"
            )
        knobs = {k: v for k, v in (knobs or {}).items() if v is not None}
        bad = sorted(set(knobs) - set(tunable))
        if bad:
            raise ConfigError(
                f"peft.by_layer.{group}: {', '.join(bad)} cannot be set per layer group for "
                f"peft.method={method}; per-group knobs: {', '.join(tunable) or 'none'}"
            )
        if knobs:
            set_knobs[group] = knobs
    if not set_knobs:
        return {}
    base = dataclasses.asdict(cfg)
    for group, knobs in set_knobs.items():  # a wrong type or range named by its knob, not by some module
        from_dict(type(cfg), {**base, **knobs}, f"peft.by_layer.{group}")
    overrides = resolve(modules, num_blocks, set_knobs, user_groups)
    # the method's own checks, per module (where two groups' knobs meet)
    return {name: from_dict(type(cfg), {**base, **overrides.get(name, {})}, f"peft (for {name})") for name in modules}


def knob_summary(per_module: dict, tunable: tuple[str, ...]) -> dict[str, dict]:
    """{module: {knob: value}} of the tunable knobs, for the record."""
    return {name: {k: getattr(c, k) for k in tunable} for name, c in per_module.items()}
