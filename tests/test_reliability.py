"""Nothing lost: kills, corrupt files, W&B outages, non-finite losses, preemption and failing sweep jobs.

Kills are real SIGKILLs of training processes forked from a forkserver that paid the imports once (a fresh
Python process pays ~7 s). Each killed run is resumed with ``ckpt_path=auto`` in the same run dir, and the
result is compared with an uninterrupted run: every monitor record, every CSV metric, the final weights.
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import random
import re
import signal
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning.pytorch import Callback

from routers.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
# Monitor every 4 steps, validation every 4, checkpoints every 6: checkpoints with and without a validation.
SMALL = [
    "data=synthetic", "data.synthetic.vocab_size=64", "data.synthetic.n_tokens=20000", "data.context_length=16",
    "data.batch_size=4", "data.probe_sequences=4", "data.probe_length=16",
    "router.n_layer=1", "router.d_model=16", "router.n_head=2", "router.context_length=16",
    "trainer.max_steps=24", "trainer.val_check_interval=4", "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "+trainer.enable_model_summary=false",
    "callbacks.collapse_monitor.every_n_steps=4", "callbacks.collapse_monitor.probe_batch_size=4",
    "callbacks.checkpoint.every_n_train_steps=6", "print_table=false", "logger=csv",
]


# --- training in forked processes, killed at chosen points ------------------------------------------------

def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(event: str, n: int) -> None:
    """SIGKILL this process at the ``n``-th ``event``: after the monitor's work at the end of a training step or
    a validation (before the checkpoint), halfway through writing a checkpoint, or halfway through an append
    to collapse.jsonl or metrics.csv."""
    from callbacks.collapse_monitor import CollapseMonitor
    from common import atomic

    count = {"n": 0}

    def hit() -> bool:
        count["n"] += 1
        return count["n"] == n

    def after(method_name: str, act):
        method = getattr(CollapseMonitor, method_name)

        def wrapped(self, trainer, *args):
            method(self, trainer, *args)
            act()
        setattr(CollapseMonitor, method_name, wrapped)

    if event in ("batch_end", "validation_end"):
        after(f"on_{event.replace('batch_end', 'train_batch_end')}", lambda: hit() and _kill_self())
    elif event == "checkpoint_write":
        write_bytes = atomic.write_bytes

        def torn_write(path, data):
            if Path(path).suffix == ".ckpt" and hit():
                tmp = Path(path).with_name(f".{Path(path).name}{atomic.TEMP_MARK}{os.getpid()}.ckpt")
                tmp.write_bytes(data[:len(data) // 2])
                _kill_self()
            write_bytes(path, data)
        atomic.write_bytes = torn_write
    elif event == "final_measure":  # the end-of-run measurement, after the last checkpoint was written
        def killed_at_the_end(self, trainer, *args):
            if hit():
                _kill_self()
        CollapseMonitor.on_train_end = killed_at_the_end
    elif event == "figures":  # halfway through drawing the run's figures
        import callbacks.collapse_monitor as monitor_module

        save_run_figures = monitor_module.save_run_figures

        def torn_figures(run_dir, *args):
            if hit():
                (Path(run_dir) / "collapse_profile.png").write_bytes(b"\x89PNG half")
                _kill_self()
            return save_run_figures(run_dir, *args)
        monitor_module.save_run_figures = torn_figures
    elif event in ("jsonl_append", "csv_append"):
        append_lines, name = atomic.append_lines, {"jsonl_append": "collapse.jsonl", "csv_append": "metrics.csv"}[event]

        def torn_append(path, lines):
            if Path(path).name == name and hit():
                with open(path, "a") as f:
                    f.write("\n".join(lines)[:max(1, len("\n".join(lines)) // 2)])
                _kill_self()
            append_lines(path, lines)
        atomic.append_lines = torn_append
    else:
        raise ValueError(event)


class Sleep(Callback):
    """``+callbacks.sleep._target_=tests.test_reliability.Sleep``: slow steps, to signal a job mid-run."""

    def __init__(self, ms: int):
        self.ms = ms

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.ms / 1000)


def _train_in_child(out: str, overrides: list[str], cache: str, kill: tuple[str, int] | None) -> None:
    log = open(Path(out).parent / f"{Path(out).name}.log", "a")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    os.environ.update(ROUTECOLLAPSE_DATA=cache, WANDB_MODE="offline", WANDB_SILENT="true")
    torch.set_num_threads(1)
    if kill:
        _arm(*kill)
    import train
    from common.errors import UserError
    from run import compose_run

    try:
        train.train(compose_run(Path(out), SMALL + overrides))
    except UserError as e:
        print(f"error: {e}", flush=True)
        sys.exit(2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def forked(cache):
    """``run(out, *overrides, kill=None) -> exit code`` of a training process forked from a warm forkserver."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["train", "run", "tests.test_reliability"])

    def run(out: Path, *overrides: str, kill: tuple[str, int] | None = None, wait: bool = True):
        process = context.Process(target=_train_in_child, args=(str(out), list(overrides), cache, kill))
        process.start()
        if not wait:
            return process
        process.join(timeout=120)
        return process.exitcode

    return run


@pytest.fixture(scope="module")
def reference(forked, tmp_path_factory):
    """An uninterrupted run: what every interrupted one must end up equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert forked(out) == 0, (out.parent / "run.log").read_text()[-3000:]
    return out


@pytest.fixture
def train_here(tmp_path, cache, monkeypatch):
    """Train in this process (no kill needed): ``run(*overrides, name="run") -> run dir``."""
    import train
    from run import compose_run

    monkeypatch.setenv("ROUTECOLLAPSE_DATA", cache)

    def run(*overrides: str, name: str = "run") -> Path:
        train.train(compose_run(tmp_path / name, SMALL + list(overrides)))
        return tmp_path / name

    return run


def records(run: Path) -> list[dict]:
    lines = (run / "collapse.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def metrics(run: Path) -> dict[tuple[int, str], str]:
    """Every (step, metric) -> value of csv/metrics.csv; a step logged again after a resume keeps its last row."""
    values = {}
    for row in csv.DictReader(open(run / "csv" / "metrics.csv")):
        for key, value in row.items():
            if value != "" and key not in ("step", "collapse/seconds"):
                values[int(row["step"]), key] = value
    return values


def assert_same_run(run: Path, reference: Path) -> None:
    ours, theirs = records(run), records(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs):
        assert _close(a, b), f"monitor record at step {a['step']} differs"
    got, expected = metrics(run), metrics(reference)
    assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())[:10]
    for key in expected:
        assert float(got[key]) == pytest.approx(float(expected[key]), rel=1e-5, abs=1e-6, nan_ok=True), key
    ours, theirs = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=False) for r in (run, reference))
    assert ours["global_step"] == theirs["global_step"]
    for name, tensor in theirs["state_dict"].items():
        torch.testing.assert_close(ours["state_dict"][name], tensor, rtol=1e-5, atol=1e-6)
    assert not list(run.rglob("*.tmp-*")), "temp files left behind"


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-6, nan_ok=True)
    return a == b


# --- 1. ten random kill points lose nothing ---------------------------------------------------------------

KILL_EVENTS = {"batch_end": 6, "validation_end": 2, "checkpoint_write": 2, "jsonl_append": 3, "csv_append": 4}


def test_ten_random_kills_lose_no_record_metric_or_step(forked, reference, tmp_path):
    rng = random.Random(0)
    events = rng.sample(sorted(KILL_EVENTS) * 2, k=10)  # each kind of point twice, in random order
    kills = [(event, rng.randint(1, KILL_EVENTS[event])) for event in events]
    out = tmp_path / "run"
    codes = [forked(out, "ckpt_path=auto", kill=kill) for kill in kills]
    assert set(codes) <= {-signal.SIGKILL, 0}, (kills, codes, _log(out))
    assert codes.count(-signal.SIGKILL) >= 8, (kills, codes)  # the points fell inside the runs
    assert forked(out, "ckpt_path=auto") == 0, _log(out)
    steps = [r["step"] for r in records(out)]
    assert steps == sorted(set(steps)), "monitor records duplicated or out of step order"
    assert_same_run(out, reference)


def _log(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()[-3000:]


# --- 2. a kill while a checkpoint is written ----------------------------------------------------------------

@pytest.mark.parametrize("write, resumes_from", [(3, "last.ckpt, step 6"), (4, "step000012.ckpt, step 12")])
def test_a_kill_while_writing_a_checkpoint_resumes_from_the_previous_good_one(forked, reference, tmp_path, write,
                                                                             resumes_from):
    # Writes: step000006.ckpt, last.ckpt (step 6), step000012.ckpt, last.ckpt (step 12): kill inside the 3rd or 4th.
    out = tmp_path / "run"
    assert forked(out, kill=("checkpoint_write", write)) == -signal.SIGKILL
    assert list((out / "checkpoints").glob(".*.tmp-*")), "the killed write left its temp file, not a torn target"
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    assert forked(out, "ckpt_path=auto") == 0, _log(out)
    assert f"resuming from {out / 'checkpoints'}/{resumes_from}" in _log(out)
    assert_same_run(out, reference)


# --- 2b. the end of a run: final measurement, final weights, figures -----------------------------------------

@pytest.fixture(scope="module")
def reference_30(forked, tmp_path_factory):
    """30 steps: a checkpoint step (every 6) that is no monitor step (every 4), so the final checkpoint is written
    after the last validation and before the end-of-run measurement."""
    out = tmp_path_factory.mktemp("reference_30") / "run"
    assert forked(out, "trainer.max_steps=30") == 0, (out.parent / "run.log").read_text()[-3000:]
    return out


@pytest.mark.parametrize("event", ["final_measure", "figures"])
def test_a_kill_at_the_end_of_a_run_is_completed_by_the_resume(forked, reference_30, tmp_path, event):
    out = tmp_path / "run"
    assert forked(out, "trainer.max_steps=30", kill=(event, 1)) == -signal.SIGKILL
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 30
    if event == "final_measure":
        assert [r["step"] for r in records(out)][-1] == 28  # the final record is missing; training is done
    assert forked(out, "trainer.max_steps=30", "ckpt_path=auto") == 0, _log(out)
    assert [r["step"] for r in records(out)][-1] == 30
    assert_same_run(out, reference_30)
    for png in ("collapse_profile.png", "max_share_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 10_000, png


def test_the_final_weights_are_saved_when_max_steps_is_no_multiple_of_the_checkpoint_interval(forked, tmp_path):
    out = tmp_path / "run"
    assert forked(out, "trainer.max_steps=26") == 0, _log(out)  # checkpoints every 6: 24, then the end at 26
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 26
    assert [r["step"] for r in records(out)][-1] == 26


# --- 3. a corrupt last.ckpt ---------------------------------------------------------------------------------

def test_corrupt_last_checkpoint_falls_back_to_the_newest_loadable_one(forked, reference, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"")
    (out / "checkpoints" / "step000024.ckpt").write_bytes(b"PK\x03\x04 truncated")
    (out / "collapse.jsonl").write_text("".join(line + "\n" for line in (out / "collapse.jsonl").read_text()
                                                .splitlines()[:-2]))  # the records after step 18 were never written
    assert forked(out, "ckpt_path=auto") == 0, _log(out)
    assert (f"resuming from {out / 'checkpoints' / 'step000018.ckpt'}, step 18 (last.ckpt is empty (0 bytes))"
            in _log(out))
    assert _close(records(out), records(reference))
    torch.testing.assert_close(torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"],
                               torch.load(reference / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"])


def test_when_no_checkpoint_loads_auto_names_each_file_in_one_line(forked, reference, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"")
    (out / "checkpoints" / "step000006.ckpt").write_bytes(b"garbage")
    assert forked(out, "ckpt_path=auto") == 2
    error = [line for line in _log(out).splitlines() if line.startswith("error:")]
    assert error == [f"error: ckpt_path=auto: no checkpoint in {out / 'checkpoints'} loads (last.ckpt: empty (0 bytes); "
                     f"step000006.ckpt: unreadable (RuntimeError)); delete them to train from step 0, or pass "
                     f"ckpt_path=<a good .ckpt>"]


# --- 4. a torn collapse.jsonl line ------------------------------------------------------------------------

def test_a_torn_last_jsonl_line_is_dropped_with_a_warning_and_cut_on_resume(reference, tmp_path, caplog):
    import shutil

    from analysis.readers.runs import read_run
    from records import read_records

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    whole = (out / "collapse.jsonl").read_text()
    (out / "collapse.jsonl").write_text(whole + whole.splitlines()[-1][:100])  # a kill halfway through an append
    assert read_records(out) == read_records(reference)
    assert "dropped a torn last line" in caplog.text
    assert len(read_run(out).records) == 7  # analysis reads the run as if the torn append never happened
    read_records(out, repair=True)
    assert (out / "collapse.jsonl").read_text() == whole  # what a resumed monitor does before appending


# --- 5. W&B failing at init or mid-run -----------------------------------------------------------------

@pytest.mark.parametrize("where", ["init", "mid-run"])
def test_a_wandb_failure_turns_wandb_off_with_one_warning_and_training_goes_on(train_here, monkeypatch, caplog,
                                                                               where):
    import wandb
    from wandb.sdk.wandb_run import Run

    def dead(*args, **kwargs):  # what a dead wandb-core service gives at the next call (measured)
        raise ConnectionResetError(104, "Connection reset by peer")

    if where == "init":
        monkeypatch.setattr(wandb, "init", dead)
    else:
        log, calls = Run.log, []

        def dies_after_three(self, *args, **kwargs):
            calls.append(1)
            return dead() if len(calls) > 3 else log(self, *args, **kwargs)
        monkeypatch.setattr(Run, "log", dies_after_three)
    out = train_here("logger=wandb")
    assert [r["step"] for r in records(out)] == [0, 4, 8, 12, 16, 20, 24]
    assert max(step for step, key in metrics(out) if key == "train/loss") == 23
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 24
    warnings = [r for r in caplog.records if "W&B failed" in r.getMessage()]
    assert len(warnings) == 1 and "ConnectionResetError" in warnings[0].getMessage()
    assert not (out / "FAILED").exists()
    monkeypatch.undo()
    if wandb.run is not None:  # W&B's run, left open by the simulated outage: later runs must not reuse it
        wandb.finish(exit_code=1)


def test_a_full_disk_under_wandb_gives_one_warning_line_and_training_goes_on(train_here, monkeypatch, caplog, capfd):
    """W&B's own log file (debug.log) on a full disk: Python's logging printed a traceback for every line W&B
    logged (21 measured on a real full tmpfs). Now: one warning naming the cause and the fix, the rest counted."""
    import errno
    import logging

    import wandb

    flush = logging.StreamHandler.flush

    def full_disk(self):  # what a FileHandler's flush raises when the disk is full
        if f"{os.sep}logs{os.sep}debug" in getattr(self, "baseFilename", ""):
            raise OSError(errno.ENOSPC, "No space left on device")
        return flush(self)

    monkeypatch.setattr(logging.StreamHandler, "flush", full_disk)
    capfd.readouterr()
    out = train_here("logger=wandb")
    err = capfd.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err, err[-3000:]
    warnings = [r.getMessage() for r in caplog.records if "W&B failed" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "No space left on device" in warnings[0] and "debug.log" in warnings[0]
    assert "Fix: free space under" in warnings[0] and "logger=csv" in warnings[0]
    from common import loggers

    assert loggers._active.suppressed_errors > 1  # counted, not printed
    assert [r["step"] for r in records(out)] == [0, 4, 8, 12, 16, 20, 24]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 24
    assert not (out / "FAILED").exists()
    monkeypatch.undo()
    if wandb.run is not None:
        wandb.finish(exit_code=1)


@pytest.mark.parametrize("where", ["run dir", "csv"])
def test_a_run_dir_made_unwritable_mid_run_ends_in_one_line_exit_2_and_failed_where_it_can_be(forked, reference,
                                                                                                tmp_path, where):
    """Root ignores chmod, so tests/readonly_dir.py refuses every new write under the folder from step 10 on, as
    a read-only folder does (was: a PermissionError traceback, exit 1, no FAILED). Made writable again (a new
    process), the run resumes exactly."""
    out = tmp_path / "run"
    readonly = ["+callbacks.readonly._target_=tests.readonly_dir.ReadOnlyFrom", "+callbacks.readonly.step=10"]
    code = forked(out, *readonly, *([] if where == "run dir" else ["+callbacks.readonly.sub=csv"]))
    log = (tmp_path / "run.log").read_text()
    assert code == 2 and "Traceback" not in log, log[-3000:]
    (error,) = [line for line in log.splitlines() if line.startswith("error: ")]
    assert re.search(rf"cannot write {re.escape(str(out / 'csv' / 'metrics.csv'))} \(Permission denied\) at step 1\d: "
                     rf"the run directory {re.escape(str(out))} became unwritable .*chmod -R u\+w .*ckpt_path=auto", error)
    if where == "run dir":
        assert error.endswith(f"(FAILED could not be written in {out} either: Permission denied)")
        assert not (out / "FAILED").exists()
    else:
        assert "could not be written" not in error
        assert "became unwritable" in (out / "FAILED").read_text()
    assert forked(out, "ckpt_path=auto") == 0, _log(out)
    assert_same_run(out, reference)


def test_a_full_disk_under_the_run_dir_is_named_with_its_fix_and_other_errors_are_left_alone(tmp_path):
    import errno

    from run import unwritable

    out = tmp_path / "run"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / ".collapse.jsonl.tmp-12.jsonl"))
        except OSError:
            raise RuntimeError("a later failure while handling it")
    except RuntimeError as e:
        message = str(unwritable(out, e, 7))
    assert message == (f"cannot write {out / 'collapse.jsonl'} (No space left on device) at step 7: the disk under the "
                       f"run directory is full; free space there and resume with ckpt_path=auto")
    assert unwritable(out, PermissionError(errno.EACCES, "Permission denied", "/elsewhere/x"), 7) is None
    assert unwritable(out, ValueError("no file"), 7) is None


# --- 6. a non-finite loss or gradient ------------------------------------------------------------------------

class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NaNGradRouter(Transformer):
    """After ``nan_after_steps`` training forwards the loss stays finite but its gradient is NaN."""

    def __init__(self, *args, nan_after_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_after_steps, self.training_forwards = nan_after_steps, 0

    def forward(self, tokens, return_routing=False):
        out = super().forward(tokens, return_routing=return_routing)
        if self.training and not return_routing:
            self.training_forwards += 1
            if self.training_forwards > self.nan_after_steps:
                return _NaNGradient.apply(out)
        return out


def wandb_exit_codes(run: Path) -> list[int]:
    """Exit codes in the offline W&B run files (LevelDB log records of W&B's protobuf ``Record``)."""
    from wandb.proto import wandb_internal_pb2

    codes = []
    for path in run.glob("wandb/offline-run-*/run-*.wandb"):
        data, pos, chunk, block = path.read_bytes(), 7, b"", 32768  # 7: the ":W&B" file header
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
            chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunk)
                if record.WhichOneof("record_type") == "exit":
                    codes.append(record.exit.exit_code)
                chunk = b""
    return codes


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_non_finite_training_stops_with_a_message_and_is_recorded_as_failed(train_here, tmp_path, what):
    from common.errors import UserError

    router = ("tests.nan_router.NaNAfter", "+router.nan_after_steps=9") if what == "loss" else \
        ("tests.test_reliability.NaNGradRouter", "+router.nan_after_steps=9")
    with pytest.raises(UserError) as error:
        train_here("logger=wandb", f"router._target_={router[0]}", router[1])
    out = tmp_path / "run"
    message = str(error.value)
    assert f"{what} became non-finite at step 9" in message and "\n" not in message
    assert f"last good checkpoint {out / 'checkpoints' / 'last.ckpt'} (step 6)" in message
    assert "Fix: lower task.lr" in message
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert all("skipped" not in r for r in records(out))  # the weights stayed finite: every measurement is real
    failure = (out / "FAILED").read_text()
    assert "step: 9" in failure and "non-finite" in failure
    assert wandb_exit_codes(out) == [1]  # W&B records the run as failed, not finished



def test_the_monitor_records_a_skipped_measurement_instead_of_measuring_non_finite_weights(tmp_path, caplog):
    from types import SimpleNamespace

    from callbacks.collapse_monitor import CollapseMonitor
    from records import read_records

    monitor = CollapseMonitor(every_n_steps=4)
    trainer = SimpleNamespace(global_step=8, is_global_zero=True, default_root_dir=str(tmp_path), loggers=[])
    module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        module.weight[0, 0] = float("nan")
    monitor._measure(trainer, module)  # would crash in the metrics (eigvalsh) if it measured
    assert read_records(tmp_path) == []  # analysis sees measurements only
    assert read_records(tmp_path, skipped=True) == [{"schema_version": 2, "step": 8, "skipped": "non-finite weights"}]
    assert "weights are not finite" in caplog.text
    monitor._measure(trainer, module)
    assert len(read_records(tmp_path, skipped=True)) == 1  # once per step, like a measurement


def test_a_measurement_whose_key_spectra_fail_is_recorded_as_skipped_and_training_goes_on(tiny_run, monkeypatch,
                                                                                          caplog):
    """Finite but huge weights (lr 1e6 without clipping) made eigh fail to converge at the end-of-run pass: the
    traceback hid the non-finite guard's message. The failing step is recorded as skipped, with the reason."""
    import callbacks.collapse_monitor as monitor_module
    from records import read_records

    measure = monitor_module.measure_signature

    def does_not_converge(a):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    def measure_failing_at_step_10(module, *args):  # the real pass, its eigensolver failing at step 10
        if module.global_step != 10:
            return measure(module, *args)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.linalg, "eigvalsh", does_not_converge)
            return measure(module, *args)

    monkeypatch.setattr(monitor_module, "measure_signature", measure_failing_at_step_10)
    out, _ = tiny_run("logger=csv")
    assert [r["step"] for r in read_records(out)] == [0, 20]
    (skipped,) = [r for r in read_records(out, skipped=True) if "skipped" in r]
    assert skipped["step"] == 10 and "key spectra failed" in skipped["skipped"]
    assert "measurement skipped" in caplog.text and not (out / "FAILED").exists()

# --- 7. a sweep with a failing job ------------------------------------------------------------------

def cli(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``train.py`` (Hydra and all) or ``analyze.py`` in this process: (exit code, stdout, stderr)."""
    from hydra.core.global_hydra import GlobalHydra

    capsys.readouterr()
    if script == "analyze.py":
        import analyze

        code = analyze.main(argv)
    else:
        import train

        GlobalHydra.instance().clear()
        # Imported, train.py's relative config_path would be looked up as a package: give the folder itself.
        argv = [f"--config-path={ROOT / 'conf'}", *argv, "hydra/job_logging=none", "hydra/hydra_logging=none"]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", ["train.py", *argv])
            try:
                train.main()
                code = 0
            except SystemExit as e:
                code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_a_failing_sweep_job_leaves_a_marker_and_the_other_jobs_finish(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setenv("ROUTECOLLAPSE_DATA", cache)
    sweep = tmp_path / "sweep"
    code, _, err = cli("train.py", ["-m", *SMALL, f"hydra.sweep.dir={sweep}", "router.n_head=2,3,1"], capsys)
    assert code == 1, err[-2000:]  # the sweep ran every job, then reports the failure
    failure = (sweep / "1" / "FAILED").read_text()
    assert "n_head" in failure and "step: null" in failure
    assert "1 job(s) of the sweep failed" in err and "1: " in err
    progress = (sweep / "sweep.log").read_text()  # the local launcher ran them in parallel workers
    assert "3 jobs on JoblibLauncher" in progress and "job 1 (n_head3) FAILED" in progress
    assert "sweep ended: 3/3 jobs done, 1 failed" in progress
    for job in ("0", "2"):
        assert [r["step"] for r in records(sweep / job)][-1] == 24
        assert not (sweep / job / "FAILED").exists()

    import shutil

    shutil.rmtree(sweep / "2" / "checkpoints")  # its config now comes from .hydra/config.yaml, ${data_seed} and all
    code, out, err = cli("analyze.py", [f"sweep={sweep}"], capsys)
    assert code == 0, err
    assert "1 job(s) left out, not results" in out and "n_head" in out
    rows = list(csv.DictReader(open(sweep / "analysis" / "sweep.csv")))
    assert [row["run"] for row in rows] == ["0", "2"]
    assert "axes router.n_head\n" in (sweep / "analysis" / "sweep.md").read_text()  # no fake data_seed axis
    failed = list(csv.DictReader(open(sweep / "analysis" / "failed_jobs.csv")))
    assert [row["job"] for row in failed] == ["1"]


# --- 8. preemption: a signal to a running job ------------------------------------------------------------

SLOW = ["+callbacks.sleep._target_=tests.test_reliability.Sleep", "+callbacks.sleep.ms=50"]  # time to signal it

@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_preemption_signal_checkpoints_at_once_and_the_resume_is_exact(forked, reference, tmp_path, signum):
    out = tmp_path / "run"
    job = forked(out, *SLOW, wait=False)
    deadline = time.monotonic() + 60
    while not any(r["step"] >= 4 for r in (records(out) if (out / "collapse.jsonl").exists() else [])):
        assert time.monotonic() < deadline and job.is_alive(), _log(out)
        time.sleep(0.02)
    os.kill(job.pid, signum)
    job.join(timeout=60)
    assert job.exitcode == 128 + signum, _log(out)  # what a shell shows for a job ended by that signal
    stopped = int(re.search(rf"preempted: {signum.name} at step (\d+)", _log(out)).group(1))
    assert 4 <= stopped < 24
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == stopped  # no step lost
    assert not (out / "FAILED").exists()
    assert forked(out, "ckpt_path=auto") == 0, _log(out)
    assert f"resuming from {out / 'checkpoints' / 'last.ckpt'}, step {stopped}" in _log(out)
    assert_same_run(out, reference)


def test_requeue_hands_the_job_to_submitit_or_slurm_or_says_how_to_continue(tmp_path, monkeypatch):
    from callbacks.checkpointing import Checkpoint, Preempted, requeue

    preempted = Preempted(signal.SIGUSR2, 9, "last.ckpt")
    for key in ("SUBMITIT_EXECUTOR", "SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    assert "ckpt_path=auto" in requeue(Checkpoint(dirpath=tmp_path), preempted)

    # Under submitit, its own handler (in place before training) dumps the job, requeues it and exits.
    calls = []
    monkeypatch.setattr(signal, "getsignal", lambda s: lambda *args: calls.append(s))
    submitit_job = Checkpoint(dirpath=tmp_path)
    monkeypatch.undo()
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    requeue(submitit_job, preempted)
    assert calls == [signal.SIGUSR2]  # submitit's preemption signal

    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}:{os.environ['PATH']}")
    assert requeue(Checkpoint(dirpath=tmp_path), preempted) == "requeued SLURM job 1234"
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "1234"]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "10")
    assert "max_requeues" in requeue(Checkpoint(dirpath=tmp_path, max_requeues=10), preempted)


# --- 9. every bad input in docs/errors.md: one line naming the fix -------------------------------------------

def _bad_input(case: str, tmp: Path, reference: Path) -> tuple[str, list[str]]:
    """(script, arguments) of each docs/errors.md row; files the case needs are made in ``tmp``."""
    import shutil

    copy = tmp / "copy"
    if case in ("ckpt-corrupt", "analyze-corrupt-checkpoint"):
        shutil.copytree(reference, copy)
        (copy / "checkpoints" / ("step000024.ckpt" if case == "ckpt-corrupt" else "last.ckpt")).write_bytes(b"")
    (tmp / "a-file").write_text("")
    if case == "analyze-sweep-all-failed":
        (tmp / "sweep" / "0").mkdir(parents=True)
        (tmp / "sweep" / "0" / "FAILED").write_text('reason: "ValueError: boom"\nstep: 3\n')
    if case == "data-file-unreadable":
        (tmp / "texts").mkdir()
        (tmp / "texts" / "good.txt").write_text("some text " * 200)
        (tmp / "texts" / "broken.txt").symlink_to(tmp / "nowhere.txt")
    big_probe = tmp / "big_probe.pt"
    if case == "analyze-probe-vocabulary":  # SMALL's vocabulary is 64
        from datamodules.probe import TokenProbe

        TokenProbe.from_tokens(torch.randint(0, 500, (4, 16), generator=torch.Generator().manual_seed(0))).save(big_probe)
    if case == "ckpt-auto-none-loads":
        (tmp / "run" / "checkpoints").mkdir(parents=True)
        (tmp / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    train = {
        "unknown-group": ["router/position=spiral"],
        "unknown-choice": ["router.position=spiral"],
        "heads": ["router.n_head=3"],
        "context": ["data.context_length=32"],
        "config-key": ["+router.colour=red"],
        "data-path": ["data=text_files", f"data.path={tmp}/nowhere"],
        "data-file-unreadable": ["data=text_files", f"data.path={tmp}/texts"],
        "offline-download": ["data=wikitext103"],
        "ckpt-missing": [f"ckpt_path={tmp}/nowhere.ckpt"],
        "ckpt-corrupt": [f"ckpt_path={copy}/checkpoints/step000024.ckpt"],
        "ckpt-auto-none-loads": ["ckpt_path=auto"],
        "ckpt-architecture": [f"ckpt_path={reference}/checkpoints/last.ckpt", "router.d_model=32"],
        "run-dir-unwritable": [f"hydra.run.dir={tmp}/a-file/run"],
        "checkpoint-dir-unwritable": [f"callbacks.checkpoint.dirpath={tmp}/a-file/checkpoints"],
        "monitor-interval": ["callbacks.collapse_monitor.every_n_steps=0"],
        "max-steps": ["trainer.max_steps=0"],
        "max-steps-word": ["trainer.max_steps=abc"],
        "max-steps-fraction": ["trainer.max_steps=1.5"],
        "threads": ["threads=-1"],
        "learning-rate": ["task.lr=-1"],
        "batch-size": ["data.batch_size=0"],
        "layers": ["router.n_layer=0"],
        "probe-size": ["data.probe_sequences=-3"],
        "non-finite": ["router._target_=tests.nan_router.NaNAfter", "+router.nan_after_steps=2"],
    }
    if case in train:
        args = train[case]
        base = [a for a in SMALL if not (args[0].startswith("data=") and a.startswith(("data=", "data.synthetic.")))]
        return "train.py", [*base, f"hydra.run.dir={tmp}/run", *args]
    return "analyze.py", {
        "analyze-target": [],
        "analyze-study-needs-sweep": [f"run={reference}", "study=brake_ordering"],
        "analyze-unknown-study": [f"sweep={reference.parent}", "study=brakes"],
        "analyze-not-hf": ["model=gpt2"],
        "analyze-hf-missing": ["model=hf:/no/such/model"],
        "analyze-hf-not-cached": ["model=hf:EleutherAI/no-such-model"],
        "analyze-sweep-missing": ["sweep=/no/such/sweep"],
        "analyze-sweep-is-a-run": [f"sweep={reference}"],
        "analyze-sweep-all-failed": [f"sweep={tmp}/sweep"],
        "analyze-run-missing": ["run=/no/such/run"],
        "analyze-corrupt-checkpoint": [f"run={copy}"],
        "analyze-unknown-probe": [f"run={reference}", "probe=nonsense"],
        "analyze-bad-argument": ["colour=blue"],
        "analyze-probe-vocabulary": [f"run={reference}", f"probe={big_probe}"],
        "analyze-out-unwritable": [f"run={reference}", f"out={tmp}/a-file/out"],
    }[case]


def error_rows() -> dict[str, tuple[str, int]]:
    """docs/errors.md's bad-input table: case -> (message, exit code)."""
    rows = {}
    for line in (ROOT / "docs" / "errors.md").read_text().splitlines():
        if match := re.match(r"^\| `([a-z-]+)` \|[^|]*\| (.*) \| (\d) \|$", line):
            rows[match.group(1)] = (match.group(2).replace("`", "").replace("\\|", "|"), int(match.group(3)))
    return rows


@pytest.mark.parametrize("case", sorted(error_rows()))
def test_every_documented_bad_input_ends_with_its_message_and_exit_code(case, reference, tmp_path, cache, monkeypatch,
                                                                        capsys):
    message, expected_code = error_rows()[case]
    monkeypatch.setenv("ROUTECOLLAPSE_DATA", str(tmp_path / "cache") if case == "offline-download" else cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, _, err = cli(*_bad_input(case, tmp_path, reference), capsys)
    assert code == expected_code, err[-2000:]
    if expected_code == 2:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, err[-2000:]
        pattern = re.escape(message).replace(re.escape("..."), ".*")
        assert re.search(pattern, errors[0]), (errors[0], message)
    else:  # Hydra's own config errors: its message, several lines
        assert all(part in err for part in message.split("..."))


def test_submitit_requeues_a_preempted_sweep_job_which_resumes_exactly(reference, tmp_path, cache, monkeypatch,
                                                                        capsys):
    """The whole SLURM recipe on the local executor: the job gets submitit's preemption signal mid-run, checkpoints,
    submitit requeues it, and the same job folder resumes with ckpt_path=auto."""
    import threading

    import psutil

    monkeypatch.setenv("ROUTECOLLAPSE_DATA", cache)
    sweep, signalled = tmp_path / "sweep", []

    def preempt_at_step_4():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not signalled:
            if (sweep / "0" / "collapse.jsonl").exists() and any(r["step"] >= 4 for r in records(sweep / "0")):
                for process in psutil.Process().children(recursive=True):
                    if "submitit.core._submit" in " ".join(process.cmdline()):
                        process.send_signal(signal.SIGUSR2)  # submitit's signal before a time limit
                        signalled.append(process.pid)
            time.sleep(0.05)

    threading.Thread(target=preempt_at_step_4, daemon=True).start()
    code, _, err = cli("train.py", ["-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}", "ckpt_path=auto",
                                    *SMALL, *SLOW], capsys)
    assert code == 0 and signalled, err[-2000:]
    log = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    stopped = int(re.search(r"preempted: SIGUSR2 at step (\d+)", log).group(1))
    assert f"resuming from {sweep / '0' / 'checkpoints' / 'last.ckpt'}, step {stopped}" in log
    assert_same_run(sweep / "0", reference)


def test_slurm_launcher_presets_requeue_on_time_outs_and_the_cpu_one_asks_for_no_gpu():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    for name in ("slurm", "slurm_cpu"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            launcher = compose("train", [f"hydra/launcher={name}"], return_hydra_config=True).hydra.launcher
        assert launcher.max_num_timeout > 0 and launcher.signal_delay_s >= 60
        if name == "slurm_cpu":
            assert launcher.gpus_per_node is None and launcher.gres is None and launcher.tasks_per_node == 1


# --- one writer per run dir ---------------------------------------------------------------------------------

def _hold_run_dir(out: str, ready) -> None:
    from run.outcome import RunDirLock

    lock = RunDirLock(Path(out)).acquire()  # noqa: F841  (held while this process lives)
    ready.set()
    time.sleep(120)


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tiny_run, tmp_path):
    from common.errors import UserError

    out = tmp_path / "run"
    out.mkdir()
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    holder = context.Process(target=_hold_run_dir, args=(str(out), ready))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(UserError, match=rf"in use by pid {holder.pid} on .* wait for that run to end"):
            tiny_run("logger=csv")
        assert not (out / "collapse.jsonl").exists() and not (out / "FAILED").exists()  # nothing of its touched
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock: the kernel releases it
        holder.join(30)
    out, _ = tiny_run("logger=csv")
    assert [r["step"] for r in records(out)] == [0, 10, 20]


# --- a resume continues the same run, or is refused ----------------------------------------------------------

@pytest.mark.parametrize("changed, named", [
    ("router/position=alibi", "router.position=rope there, alibi here"),
    ("router.n_head=1", "router.n_head=2 there, 1 here"),
    ("router/score=euclidean", "router.score=dot there, euclidean here"),
    ("seed=1", "seed=0 there, 1 here"),
    ("task.lr=0.01", "task.lr="),
])
def test_a_resume_with_another_model_data_or_seed_is_refused_naming_the_keys(train_here, tmp_path, changed, named):
    from common.errors import UserError

    out = train_here("trainer.max_steps=8")
    before = (out / "collapse.jsonl").read_text()
    with pytest.raises(UserError, match=r"holds a different run \(.*" + re.escape(named)):
        train_here("trainer.max_steps=12", "ckpt_path=auto", changed)
    assert (out / "collapse.jsonl").read_text() == before  # nothing mixed in


def test_a_resume_may_change_execution_settings(train_here):
    out = train_here("trainer.max_steps=8")
    train_here("trainer.max_steps=12", "ckpt_path=auto", "threads=1", "print_table=true", "tags=[more]")
    assert [r["step"] for r in records(out)] == [0, 4, 8, 12]


def flip_a_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of a checkpoint's largest tensor, leaving the zip around it intact."""
    import zipfile

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_flipped_bytes_inside_an_intact_zip_falls_back_to_the_newest_good_one(train_here, capsys):
    import zipfile

    from common.checkpoints import inspect

    out = train_here()
    last = out / "checkpoints" / "last.ckpt"
    flip_a_tensor_byte(last)
    assert zipfile.ZipFile(last).namelist()  # still a readable zip, and torch.load would take it
    assert torch.load(last, weights_only=False)["global_step"] == 24
    state, problem = inspect(last)
    assert state is None and "checksum does not match" in problem
    train_here("ckpt_path=auto", "trainer.max_steps=30")
    assert f"resuming from {out / 'checkpoints' / 'step000024.ckpt'}, step 24 (last.ckpt is corrupt" in \
        capsys.readouterr().out
    assert [r["step"] for r in records(out)][-1] == 30


def test_analysis_of_a_run_reads_its_newest_checkpoint_and_refuses_flipped_bytes(train_here, tmp_path, capsys):
    import shutil

    out = train_here("trainer.max_steps=30")  # checkpoints at 6, ..., 30; last.ckpt at 30
    checkpoints = out / "checkpoints"
    shutil.copy(checkpoints / "step000024.ckpt", checkpoints / "last.ckpt")  # a kill left last.ckpt stale
    code, _, err = cli("analyze.py", [f"run={out}", f"out={tmp_path / 'analysis'}"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "analysis" / "signature.json").read_text())["step"] == 30  # step000030.ckpt

    flip_a_tensor_byte(checkpoints / "step000030.ckpt")
    code, _, err = cli("analyze.py", [f"run={out}", f"out={tmp_path / 'analysis2'}"], capsys)
    assert code == 2 and "its tensors' checksum does not match" in err and "step000030.ckpt" in err
    assert "instead" in err  # names a good checkpoint beside it


def test_analysis_lists_jobs_that_never_started_with_the_command_that_runs_them(tmp_path, cache, monkeypatch, capsys):
    import shlex
    import shutil

    monkeypatch.setenv("ROUTECOLLAPSE_DATA", cache)
    sweep = tmp_path / "sweep"
    code, _, err = cli("train.py", ["-m", "hydra/launcher=basic", *SMALL, "trainer.max_steps=8",
                                    f"hydra.sweep.dir={sweep}", "seed=0,1,2"], capsys)
    assert code == 0, err[-2000:]
    shutil.rmtree(sweep / "1")  # as if the sweep had been killed before job 1 began
    code, out, err = cli("analyze.py", [f"sweep={sweep}"], capsys)
    assert code == 0, err
    assert "1 job(s) left out, not results" in out and "1: never started" in out
    (row,) = list(csv.DictReader(open(sweep / "analysis" / "failed_jobs.csv")))
    assert row["job"] == "1" and "seed=1" in row["command"] and f"hydra.run.dir={sweep / '1'}" in row["command"]
    args = shlex.split(row["command"])
    assert args[:2] == ["python", "train.py"]
    code, _, err = cli("train.py", args[2:], capsys)  # the printed command completes the sweep
    assert code == 0, err[-2000:]
    code, out, _ = cli("analyze.py", [f"sweep={sweep}"], capsys)
    assert code == 0 and "left out" not in out
    assert len(list(csv.DictReader(open(sweep / "analysis" / "sweep.csv")))) == 3
