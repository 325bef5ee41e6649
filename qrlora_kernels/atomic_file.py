"""Atomic file writes: a temporary file in the destination's folder, flushed to disk, then renamed over it.

A crash or a full disk mid-write leaves the previous file intact and no temporary behind. The new file gets
the permissions a plain ``open(path, "wb")`` would give it: an existing file's mode is kept, a new file gets
0o666 less the umask (``tempfile.mkstemp`` would make every result 0o600, unreadable to other users and to
serving containers). Used by adapter files, benchmark results and the example's results alike.

Files that only make sense together (an adapter's weights and its config) go through ``atomic_write_files``: every
new file is on disk before the first rename, and a failure between two renames puts the earlier ones back, so an
error or an interrupt leaves the old set (a crash of the machine between two renames can still mix them; the
adapter's loader then refuses the pair by its checksums).
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]


def check_writable_folder(folder: PathLike) -> Path:
    """Make ``folder`` (and its parents) and check that a file can be written in it, before a long run whose
    results would go there: an OSError (a file in the way, no permission, a read-only disk) comes now, not at
    the end. Returns the folder as a Path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()
    return folder


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.{suffix}")


def _write_temporary(path: Path, data: bytes) -> Path:
    """``data`` in a new file beside ``path``, flushed to disk, with the mode ``open(path, "wb")`` would give."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
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
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (creating its folder); returns the path.

    A symbolic link is written through, as ``open()`` would (Hugging Face's cache links files), not replaced.
    """
    return atomic_write_files({path: data})[0]


def atomic_write_files(files: dict[PathLike, bytes]) -> list[Path]:
    """Write several files as one: either all of them are replaced, or (on an error or an interrupt) none is.

    Each file is written as ``atomic_write_bytes`` writes it; only then are they renamed into place, one after
    another. If a rename fails, the files already replaced get their previous contents back (kept as hard links
    until the last rename) and the ones that did not exist are removed. Returns the paths written.
    """
    paths = [Path(os.path.realpath(p)) for p in files]
    if len(set(paths)) != len(paths):
        raise ValueError(f"atomic_write_files: the same file twice in {[str(p) for p in files]}")
    temporaries: list[Path] = []
    backups: list[Path] = []
    replaced: dict[Path, Optional[Path]] = {}  # path -> its previous contents (None: it did not exist)
    try:
        for path, data in zip(paths, files.values()):
            temporaries.append(_write_temporary(path, data))
        for path, tmp in zip(paths, temporaries):
            if len(paths) > 1:  # one file needs no undo: its rename is the whole write
                previous = None
                if os.path.exists(path):
                    previous = _sibling(path, "previous")
                    backups.append(previous)
                    _link_or_copy(path, previous)
                # Recorded before the rename: an interrupt raised as the rename returns must still undo it (and
                # putting the previous contents back is harmless when the rename did not happen).
                replaced[path] = previous
            os.replace(tmp, path)
    except BaseException:
        for path, previous in replaced.items():  # back to the previous set
            if previous is None:
                _unlink_quietly(path)
            else:
                os.replace(previous, path)
        for leftover in temporaries + backups:
            _unlink_quietly(leftover)
        raise
    for previous in backups:
        _unlink_quietly(previous)
    return paths


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` holds what ``source`` holds now (a hard link where the file system has them)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))
