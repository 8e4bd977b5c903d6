"""Cell formatters (value -> display text; None -> empty cell) and the raw CSV form of a value."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from qpeft_bench.report.rows import is_number

GIB = 2**30
MIB = 2**20
HUGE = 1e18  # beyond any real count, byte size or time: shown in scientific notation

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


def _grouped(value: float, spec: str) -> str:
    """value in ``spec`` ('.3f', ',.3f', ','), or in scientific notation when beyond HUGE: a corrupt record's 1e300
    bytes would otherwise print as a 300-digit cell."""
    return f"{value:.3e}" if abs(value) >= HUGE else format(value, spec)


def fmt_text(value: Any) -> str:
    return "" if value is None else str(value)


@_numeric
def fmt_count(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return _grouped(value, ",")


def fmt_fixed(decimals: int) -> Formatter:
    return _numeric(lambda value: _grouped(value, f",.{decimals}f"))


def fmt_plain(decimals: int) -> Formatter:
    """Without thousands separators: for cells that scripts parse back (by_layer_group's 'mean ± std (n)')."""
    return _numeric(lambda value: _grouped(value, f".{decimals}f"))


def fmt_scaled(divisor: int, decimals: int) -> Formatter:
    """Bytes -> GiB/MiB; the divisor is binary (2^30 / 2^20), as the table notes say."""
    return _numeric(lambda value: _grouped(value / divisor, f",.{decimals}f"))


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


def printable(text: str) -> str:
    """Text any UTF-8 file or terminal takes: a path byte that is not UTF-8 (which Python carries as a lone
    surrogate) as \\xNN, and a lone surrogate from a record's JSON (\\ud800) as \\uNNNN, instead of an encoding
    error."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no undecodable byte stands for
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")
