"""Crash-safe writes: whoever reads a file the project wrote sees the old version or the new one, never half.

Whole files go to a temp file beside the target (same directory, so same filesystem), are fsynced and renamed
over it: POSIX rename is atomic within a filesystem. Append-only logs (``collapse.jsonl``, ``metrics.csv``)
append and fsync; a kill mid-append can leave a torn last line, which :func:`read_lines` drops with a warning.
A killed process leaves its temp file behind; :func:`remove_stale_temps` clears them when a run (re)starts.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"  # temp files are ".<target name>.tmp-<pid><suffix>", hidden and recognisable


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; write it inside the block. On success it replaces ``path``
    atomically; on an exception it is removed and ``path`` is untouched.

    The temp keeps the target's suffix, because writers such as ``savefig`` pick the format by it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself survives a power cut only once the directory is synced
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_figure(fig, path: str | Path, **kwargs) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)
    return Path(path)


def append_lines(path: str | Path, lines: list[str]) -> None:
    """Append whole lines and fsync, so a line is on disk before anything that depends on it is written."""
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def read_lines(path: str | Path, repair: bool = False) -> list[str]:
    """The complete lines of an append-only file ([] if it does not exist). A last line without its newline
    was torn by a kill mid-append: it is dropped with a warning, and with ``repair`` also cut from the file
    (atomically), so the next append starts on a fresh line."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    complete, _, torn = text.rpartition("\n")
    if torn:
        log.warning(f"{path}: dropped a torn last line ({len(torn)} characters, written when a run was killed)")
        if repair:
            write_text(path, complete + "\n" if complete else "")
    return complete.split("\n") if complete else []


def remove_stale_temps(*folders: str | Path) -> list[Path]:
    """Remove temp files that killed processes left in ``folders`` (not recursive); returns them."""
    stale = [p for folder in folders if Path(folder).is_dir()
             for p in Path(folder).glob(f".*{TEMP_MARK}*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def check_writable(folder: str | Path) -> str | None:
    """Create ``folder`` if needed and try writing a file there: None if that works, else the reason."""
    folder = Path(folder)
    probe = folder / f".write-check-{os.getpid()}"  # per process: DDP ranks check the same folder at once
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None
