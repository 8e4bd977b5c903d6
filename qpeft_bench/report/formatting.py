"""Cell formatters (value -> display text; None -> empty cell) and the raw CSV form of a value."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from qpeft_bench.report.rows import is_number

GIB = 2**30
MIB = 2**20

Formatter = Callable[[Any], str]


def _numeric(fmt: Callable[[float], str]) -> Formatter:
    """Wrap a number formatter: None -> empty cell, non-numbers shown verbatim rather than crashing."""

    def format_value(value: Any) -> str:
        if value is None:
            return ""
        if not is_number(value):
            return str(value)
        return fmt(value)

    return format_value


def fmt_text(value: Any) -> str:
    return "" if value is None else str(value)


@_numeric
def fmt_count(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}"


def fmt_fixed(decimals: int) -> Formatter:
    return _numeric(lambda value: f"{value:,.{decimals}f}")


def fmt_plain(decimals: int) -> Formatter:
    """Without thousands separators: for cells that scripts parse back (by_layer_group's 'mean ± std (n)')."""
    return _numeric(lambda value: f"{value:.{decimals}f}")


def fmt_scaled(divisor: int, decimals: int) -> Formatter:
    """Bytes -> GiB/MiB; the divisor is binary (2^30 / 2^20), as the table notes say."""
    return _numeric(lambda value: f"{value / divisor:,.{decimals}f}")


def raw_value(value: Any) -> str:
    """CSV cell: the unformatted value, so that float(cell) / int(cell) gives back the record's number."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)
