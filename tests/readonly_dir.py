"""A callback that makes the run directory read-only for this process from a given step on (for the test of a
run dir made unwritable mid-run: root ignores a real ``chmod``, so the tests cannot use one).

``+callbacks.readonly._target_=tests.readonly_dir.ReadOnlyFrom +callbacks.readonly.step=10`` (and
``+callbacks.readonly.sub=csv`` for one subfolder only): from the end of that step, every new write under the
run directory fails as it does on a read-only folder, with
``PermissionError(EACCES)``: opening a file for writing or appending, creating, renaming or removing one.
Files this process already holds open stay writable, as they do after a real ``chmod -R a-w``.
"""
from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

from lightning.pytorch import Callback

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _denied(path) -> PermissionError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))


def make_read_only(folder: Path) -> None:
    folder = str(Path(folder).resolve())

    def inside(path) -> bool:
        try:
            return os.path.abspath(os.fspath(path)).startswith(folder)
        except TypeError:  # a file descriptor
            return False

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if inside(file) and any(c in mode for c in "wax+"):
            raise _denied(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & _WRITE_FLAGS:
            raise _denied(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guard(function):
        def guarded(src, *args, **kwargs):
            if inside(src) or any(inside(a) for a in args[:1]):
                if function.__name__ in ("unlink", "remove", "rmdir") and not os.path.lexists(src):
                    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(src))
                if function.__name__ == "mkdir" and os.path.lexists(src):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(src))
                raise _denied(src)
            return function(src, *args, **kwargs)
        return guarded

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
    for name in ("replace", "rename", "unlink", "remove", "mkdir", "rmdir"):
        setattr(os, name, guard(getattr(os, name)))


class ReadOnlyFrom(Callback):
    """From the end of training step ``step``, the run directory (or its subfolder ``sub``) is read-only."""

    def __init__(self, step: int, sub: str = ""):
        self.step, self.sub, self.done = step, sub, False

    def on_train_batch_end(self, trainer, *args) -> None:
        if not self.done and trainer.global_step >= self.step:
            self.done = True
            make_read_only(Path(trainer.default_root_dir) / self.sub)
