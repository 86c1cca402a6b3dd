"""Atomic file writes: the one way every stage and command replaces an output file.

A reader (a person, DVC, the next stage) never sees half a file: the content goes to a temporary
file in the same folder, which is renamed over the target only when complete.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_replacing(folder: Path, name: str, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``folder/name`` through a new temporary file in ``folder`` renamed over it.

    The temporary file is created exclusively (it never opens an existing file or link), and the
    rename replaces whatever entry ``name`` was, a symbolic link included, without following it.
    A failed write leaves the old file and no temporary one."""
    target = folder / name
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as an ordinary new file would be, not mkstemp's 0600
        with os.fdopen(fd, "wb") as stream:
            write(stream)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_text_replacing(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically, creating its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_replacing(path.parent, path.name, lambda stream: stream.write(text.encode("utf-8")))
