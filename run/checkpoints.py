"""Which checkpoint a run resumes from, checked before training starts."""
from __future__ import annotations

from pathlib import Path

from common.checkpoints import LAST, inspect, newest_loadable
from common.configs import flatten
from common.errors import UserError


def checkpoint_folder(trainer, out: Path) -> Path:
    """Where the trainer writes checkpoints: ``callbacks.checkpoint.dirpath``, else ``<run dir>/checkpoints``."""
    return Path(getattr(trainer.checkpoint_callback, "dirpath", None) or out / "checkpoints")


def resolve_checkpoint(ckpt_path: str | None, folder: Path, task) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` checked, or with ``auto`` the newest loadable checkpoint
    in ``folder`` (None when there is none yet). Says which one and why; bad ones are one-line errors."""
    if ckpt_path is None:
        return None
    if ckpt_path == "auto":
        path, step, problems = newest_loadable(folder)
        if path is None and problems:
            found = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
            raise UserError(f"ckpt_path=auto: no checkpoint in {folder} loads ({found}); delete them to train from "
                            f"step 0, or pass ckpt_path=<a good .ckpt>")
        if path is None:
            print(f"ckpt_path=auto: no checkpoint in {folder} yet; training from step 0")
            return None
        why = ""
        if path.name != LAST:
            last_state, last_problem = inspect(folder / LAST) if (folder / LAST).exists() else (None, "missing")
            why = f" (last.ckpt is {last_problem or 'older: step %d' % last_state['global_step']})"
        print(f"ckpt_path=auto: resuming from {path}, step {step}{why}")
        state, _ = inspect(path)
    else:
        path = Path(ckpt_path)
        if not path.is_file():
            raise UserError(f"checkpoint {path} does not exist; pass ckpt_path=<run dir>/checkpoints/last.ckpt "
                            f"or ckpt_path=auto")
        state, problem = inspect(path)
        if problem:
            other, step, _ = newest_loadable(path.parent, skip=path)
            hint = (f"resume from {other} (step {step}) instead" if other else
                    "no other checkpoint beside it loads: train from step 0 without ckpt_path")
            raise UserError(f"checkpoint {path} is corrupt or not a Lightning checkpoint ({problem}); {hint}")
    check_identity(state, task, path)
    check_architecture(state, task, path)
    return str(path)


# What makes a run this run: the keys that shape its weights or its records. Execution settings (trainer
# devices and length, threads, logger, tags, compile, printing) may change between a run and its resume.
IDENTITY = ("router.", "task.", "data.", "seed", "data_seed", "probe_sequences", "callbacks.collapse_monitor.")


def _refuse(path: Path, changed: list[str]) -> None:
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    raise UserError(f"checkpoint {path} holds a different run ({', '.join(changed[:3])}{more}); resume with the "
                    f"settings it was trained with, or start a new run without ckpt_path (in another folder: "
                    f"hydra.run.dir=<new folder>)")


def check_identity(state: dict, task, path: Path) -> None:
    """A resume must continue the same run: the resolved model, task, data, seeds and monitor settings stored
    in the checkpoint must equal today's (checkpoints from before configs were stored are not checked, nor keys
    added to the configs after the checkpoint was written)."""
    stored = state.get("hyper_parameters", {}).get("config")
    current = task.hparams.get("config")
    if not stored or not current:
        return
    then, now = flatten(stored), flatten(current)
    # Keys the stored config lacks came with a newer version of this code: not a change the user made.
    keys = sorted(k for k in then if k.startswith(IDENTITY) or k in IDENTITY)
    changed = [f"{k}={then.get(k)} there, {now.get(k)} here" for k in keys if then.get(k) != now.get(k)]
    if changed:
        _refuse(path, changed)


def check_architecture(state: dict, task, path: Path) -> None:
    """A resume must rebuild the model it saved: name the config that differs, not a state_dict error."""
    ours, theirs = task.state_dict(), state["state_dict"]
    differ = sorted(k for k in ours.keys() | theirs.keys()
                    if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape)
    if differ:
        _refuse(path, [f"{len(differ)} tensors differ, e.g. {differ[0]}"])
