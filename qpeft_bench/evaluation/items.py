"""(Placeholder of the lead while helper A writes the real module: read side of /work/helpers/ITEMS21.md only.)"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path


class ItemsError(ValueError):
    pass


def read_items(record_path: Path, record: dict) -> dict | None:
    ref = (record.get("eval") or {}).get("items")
    if ref is None:
        return None
    path = Path(record_path).parent / ref["file"]
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ItemsError(f"{path}: {exc}") from exc
    if hashlib.sha256(blob).hexdigest() != ref["sha256"]:
        raise ItemsError(f"{path}: sha256 differs from the record's")
    return json.loads(gzip.decompress(blob))
