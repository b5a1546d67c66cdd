"""Metrics: `WORKDIR/metrics.jsonl`, TensorBoard event files and a progress line."""

from __future__ import annotations

import json
import logging as logging_std
import math
import pathlib
import sys
import time

import jax
from absl import logging


class _DropLibraryInfo(logging_std.Filter):
    """Drops INFO lines from checkpointing internals, which log every file they write."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno > logging_std.INFO or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
    """Keeps the run's own progress lines readable (idempotent)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
        handler.addFilter(_DropLibraryInfo())


class MetricWriter:
    """Writes one JSON object per call to `metrics.jsonl` and scalars to TensorBoard.

    Only process 0 writes; other processes get a writer that does nothing.
    """

    def __init__(self, workdir: str | pathlib.Path):
        self._active = jax.process_index() == 0
        if not self._active:
            return
        from tensorboardX import SummaryWriter  # writes event files without TensorFlow

        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self._active:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, float) and math.isfinite(value):
                self._tensorboard.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self._active:
            self._jsonl.close()
            self._tensorboard.close()


def _plain(value) -> float | int | str:
    if isinstance(value, (int, str)):
        return value
    return float(value)


class Progress:
    """Steps per second since the last report and the ETA to `total_steps`."""

    def __init__(self, start_step: int, total_steps: int):
        self._total = total_steps
        self._last_step, self._last_time = start_step, time.perf_counter()

    def report(self, step: int, loss: float) -> float:
        """Logs a progress line and returns steps/s since the previous report; the record
        carries (step, total, loss, steps/s, ETA) as `dlm_progress` for a console handler."""
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = (self._total - step) / rate if rate > 0 else float("inf")
        logging.info("step %d/%d  loss %.4f  %.2f steps/s  ETA %s", step, self._total, loss,
                     rate, _duration(eta),
                     extra={"dlm_progress": (step, self._total, loss, rate, _duration(eta))})
        return rate


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class ProgressLine(logging_std.Handler):
    """Rewrites one console line (on the stdout of its creation) from the trainer's progress
    records."""

    def __init__(self):
        super().__init__()
        self._stream, self.written = sys.stdout, False

    def emit(self, record: logging_std.LogRecord) -> None:
        progress = getattr(record, "dlm_progress", None)
        if progress is not None:
            step, total, loss, rate, eta = progress
            self._stream.write(f"\r  training: step {step}/{total}  loss {loss:.3f}  "
                               f"{rate:.1f} steps/s  ETA {eta}   ")
            self._stream.flush()
            self.written = True
