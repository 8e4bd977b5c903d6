"""Writing the report's files all or nothing: every file goes to a temporary file beside its target first, and only
when all are written are they renamed into place; on any error the temporary files and the directories made for them
are removed, so a failed report leaves what was there before, never a half-written table."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path


class OutputError(Exception):
    """A file or directory of the report that cannot be written; the message names it and says why."""


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def make_dirs(directory: Path, made: list[Path]) -> None:
    """mkdir -p that appends each directory it creates to ``made`` (outermost first), so they can be removed again."""
    missing = []
    for level in (directory, *directory.parents):
        if level.is_dir():
            break
        if os.path.lexists(level):
            raise OutputError(f"cannot write into {level}: it exists and is not a directory")
        missing.append(level)
    for level in reversed(missing):
        try:
            level.mkdir()
        except FileExistsError:  # made meanwhile by someone else: fine if it is a directory
            if not level.is_dir():
                raise OutputError(f"cannot write into {level}: it exists and is not a directory") from None
            continue
        except OSError as exc:
            raise OutputError(f"cannot create directory {level}: {_reason(exc)}") from exc
        made.append(level)


def _write_temp(path: Path, content: bytes) -> Path:
    # 0666 less the umask, as a plain open() gives (mkstemp's 0600 would survive the rename)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_files(files: Mapping[Path, str | bytes]) -> list[Path]:
    """Write every {path: content} (text as UTF-8); returns the paths in the given order. Raises OutputError naming
    the path when one cannot be written, having replaced none of them: the renames come last, after every file was
    written, and a target that is a directory (onto which a rename would fail halfway) is refused before anything."""
    for path in files:
        if path.is_dir():
            raise OutputError(f"cannot write {path}: it is a directory")
    made: list[Path] = []
    temps: dict[Path, Path] = {}
    try:
        for path, content in files.items():
            make_dirs(path.parent, made)
            try:
                temps[path] = _write_temp(path, content.encode("utf-8") if isinstance(content, str) else content)
            except OSError as exc:
                raise OutputError(f"cannot write {path}: {_reason(exc)}") from exc
        for path, tmp in temps.items():
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise OutputError(f"cannot write {path}: {_reason(exc)}") from exc
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        for directory in reversed(made):
            try:
                directory.rmdir()
            except OSError:  # something else was put there meanwhile: leave it
                pass
        raise
    return list(files)
