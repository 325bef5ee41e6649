"""Atomic file writes: a temporary file in the destination's folder, flushed to disk, then renamed over it.

A crash or a full disk mid-write leaves the previous file intact and no temporary behind. The new file gets
the permissions a plain ``open(path, "wb")`` would give it: an existing file's mode is kept, a new file gets
0o666 less the umask (``tempfile.mkstemp`` would make every result 0o600, unreadable to other users and to
serving containers). Used by adapter files, benchmark results and the example's results alike.
"""
from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (creating its folder); returns the path.

    A symbolic link is written through, as ``open()`` would (Hugging Face's cache links files), not replaced.
    """
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    # O_EXCL: never write through a file someone else created; mode 0o666 is then cut by the umask, as open() does.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))
