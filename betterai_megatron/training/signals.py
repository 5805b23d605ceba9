"""Preemption: SIGTERM / SIGUSR1 and the wall-time limit turn into "save a checkpoint after this step and exit 0".

Slurm sends SIGTERM on ``scancel``, preemption and at the time limit (then SIGKILL after ``KillWait``), and a
signal of the job's choice ahead of the limit (``#SBATCH --signal=USR1@120``, or ``B:USR1`` to the batch shell).
The handler only records the signal — it runs between two Python bytecodes of the main thread, possibly inside
a collective, so it must not save or communicate. The trainer reads :meth:`StopRequest.local_reason` at each
step boundary and all-reduces it with the step's loss (no extra collective), so every rank stops after the same
step, saves the same checkpoint and exits 0. ``train.exit_duration_mins`` (Megatron-LM's ``--exit-duration-in-mins``)
is checked the same way, measured from the start of the run on each rank.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# Reason codes carried through the per-step all-reduce (the largest wins when ranks disagree).
NO_STOP, STOP_DURATION, STOP_SIGNAL = 0, 1, 2


class StopRequest:
    """Records preemption signals and the wall-time limit for the training loop."""

    def __init__(self, *, exit_duration_mins: float | None = None, signals=PREEMPTION_SIGNALS):
        self.exit_duration_s = None if exit_duration_mins is None else exit_duration_mins * 60.0
        self.start_time = time.monotonic()
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def install(self) -> StopRequest:
        """Install the handlers (main thread only; elsewhere Python forbids it and signals keep their handlers)."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: SIGTERM/SIGUSR1 will not trigger a checkpoint")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def local_reason(self) -> int:
        """This rank's reason to stop now (STOP_SIGNAL, STOP_DURATION or NO_STOP)."""
        if self.received is not None:
            return STOP_SIGNAL
        if self.exit_duration_s is not None and time.monotonic() - self.start_time >= self.exit_duration_s:
            return STOP_DURATION
        return NO_STOP

    def describe(self, reason: int) -> str:
        if reason == STOP_SIGNAL:
            name = self.received.name if self.received is not None else "a preemption signal (on another rank)"
            return f"received {name}"
        if reason == STOP_DURATION:
            return f"train.exit_duration_mins={self.exit_duration_s / 60:g} reached"
        return "no stop requested"

