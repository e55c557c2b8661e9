"""Finding checkpoints: which one in a folder loads and is newest, and a run directory's newest one. Training
(resume), the outcome report and analysis all find checkpoints here; writing them is callbacks/checkpointing.py.
Importing this loads torch, not Lightning."""
from __future__ import annotations

from pathlib import Path

import torch

from common.checksum import CHECKSUM, tensor_checksum
from common.errors import UserError

LAST = "last.ckpt"


def inspect(path: Path) -> tuple[dict | None, str | None]:
    """``(checkpoint, None)`` if ``path`` loads as a Lightning training checkpoint, else ``(None, what is wrong)``.
    Memory-mapped, so checking a large checkpoint reads little."""
    try:
        if path.stat().st_size == 0:
            return None, "empty (0 bytes)"
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        return None, f"unreadable ({type(e).__name__})"
    if not isinstance(state, dict) or not {"state_dict", "loops", "global_step"} <= state.keys():
        return None, "not a Lightning training checkpoint"
    try:
        if CHECKSUM in state and tensor_checksum(state) != state[CHECKSUM]:
            return None, "corrupt (its tensors' checksum does not match: bytes changed after it was written)"
    except Exception as e:  # a tensor whose storage cannot be read back
        return None, f"unreadable ({type(e).__name__})"
    return state, None


def newest_loadable(folder: Path, skip: Path | None = None) -> tuple[Path | None, int, dict[str, str]]:
    """The newest checkpoint in ``folder`` that loads (by training step; last.ckpt on a tie), its step, and
    what is wrong with each one that does not load."""
    best, best_key, problems = None, None, {}
    for path in sorted(Path(folder).glob("*.ckpt")):
        if path.name.startswith(".") or (skip is not None and path.resolve() == skip.resolve()):
            continue  # hidden: the temp file of a write that was killed
        state, problem = inspect(path)
        if problem:
            problems[path.name] = problem
            continue
        key = (int(state["global_step"]), path.name == LAST)
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best, (best_key[0] if best_key else -1), problems


def newest_checkpoint(path: str | Path) -> Path:
    """A ``.ckpt`` as given, or a run directory's newest checkpoint: ``checkpoints/last.ckpt``, unless a step file
    is further along (a kill while last.ckpt was rewritten leaves it stale beside the newer step file)."""
    path = Path(path)
    if path.is_file():
        return path
    last = path / "checkpoints" / "last.ckpt"
    steps = {int(p.stem[4:]): p for p in last.parent.glob("step*.ckpt") if p.stem[4:].isdigit()}
    if last.is_file():
        try:
            last_step = int(torch.load(last, map_location="cpu", weights_only=False, mmap=True)["global_step"])
        except Exception:
            last_step = -1  # unreadable: load_checkpoint names it and the good one beside it
        newest = max(steps, default=-1)
        return steps[newest] if newest > last_step and last_step >= 0 else last
    if steps:
        return steps[max(steps)]
    raise UserError(f"no checkpoint at {path}; pass run=<run dir with checkpoints/last.ckpt> or run=<file.ckpt>")
