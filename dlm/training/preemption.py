"""Stopping a run early and together: SIGTERM and a time budget, agreed at step boundaries.

Schedulers (Cloud TPU maintenance, SLURM, Kubernetes) send SIGTERM some time before they
kill a job. `StopRequest` turns the signal into a flag, and the trainer asks `poll()` once
per step whether to save a checkpoint and stop. Processes may see the signal at different
steps (or only one of them may get it), so with several processes `poll` combines every
process's flag with a tiny collective (a max over one int per device) and all processes
get the same answer at the same step. The collective is dispatched at one step and read at
the next, so the host never waits for it: a stop takes effect one step after the request.
"""

from __future__ import annotations

import re
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dlm.parallel import DATA_AXIS

SIGTERM = "SIGTERM"
TIME_BUDGET = "time budget"
_REASONS = (SIGTERM, TIME_BUDGET)  # column order of a vote

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float | int | None, flag: str = "--time_budget") -> float | None:
    """Seconds in `text`: a number of seconds ('5400', '90.5') or amounts with units s, m,
    h, d ('4h', '1h30m', '45s'); None or '' for no limit. ValueError names `flag`."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        compact = text.strip().lower().replace(" ", "")
        try:
            seconds = float(compact)
        except ValueError:
            parts = re.fullmatch(r"((\d+(\.\d*)?)[smhd])+", compact)
            if parts is None:
                raise ValueError(f"{flag}={text!r} is not a duration: give seconds or amounts "
                                 "with units s/m/h/d such as '4h' or '1h30m'") from None
            seconds = sum(float(amount) * _UNITS[unit]
                          for amount, unit in re.findall(r"(\d+(?:\.\d*)?)([smhd])", compact))
    if not seconds > 0:
        raise ValueError(f"{flag}={text!r} must be positive")
    return seconds


class StopRequest:
    """SIGTERM and an optional time budget (seconds from construction) as one stop decision.

    `install(mesh)` before the training loop sets the SIGTERM handler (from the main thread
    only) and `uninstall()` after it restores the previous one. `poll()` returns the agreed
    reason to stop (`SIGTERM` or `TIME_BUDGET`) or None, the same on every process.
    """

    def __init__(self, time_budget: float | None = None, clock=time.monotonic):
        self._clock = clock
        self._deadline = None if time_budget is None else clock() + time_budget
        self._signalled = False
        self._installed, self._previous_handler = False, None
        self._multiprocess = False
        self._pending = None  # the vote dispatched at the previous poll

    def install(self, mesh: jax.sharding.Mesh) -> None:
        """Catches SIGTERM from now on; `mesh` (all processes' devices) carries the votes."""
        self._multiprocess = jax.process_count() > 1
        if self._multiprocess:
            self._votes = NamedSharding(mesh, P(DATA_AXIS))
            self._rows = len(mesh.local_devices)
            self._combine = jax.jit(lambda votes: jnp.max(votes, axis=0),
                                    out_shardings=NamedSharding(mesh, P()))
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        else:
            logging.warning("not in the main thread: SIGTERM will not stop training cleanly")

    def uninstall(self) -> None:
        """Gives SIGTERM back to the handler that was there before `install`."""
        if self._installed:
            # None: the previous handler was not set from Python; the default is the closest.
            signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)
            self._installed, self._previous_handler = False, None

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        if not self._signalled:
            logging.warning("SIGTERM received: saving a checkpoint and stopping after the "
                            "current step")
        self._signalled = True

    def local_reasons(self) -> list[str]:
        """This process's own reasons to stop, before agreement."""
        reasons = []
        if self._signalled:
            reasons.append(SIGTERM)
        if self._deadline is not None and self._clock() >= self._deadline:
            reasons.append(TIME_BUDGET)
        return reasons

    def poll(self) -> str | None:
        """The reason every process agrees to stop now, or None. Call once per step on every
        process (it runs a collective when there are several)."""
        local = self.local_reasons()
        if not self._multiprocess:
            return local[0] if local else None
        vote = np.array([[reason in local for reason in _REASONS]] * self._rows, np.int32)
        previous, self._pending = self._pending, self._combine(
            jax.make_array_from_process_local_data(self._votes, vote))
        if previous is None:
            return None
        agreed = np.asarray(previous)
        return next((reason for reason, flag in zip(_REASONS, agreed) if flag), None)
