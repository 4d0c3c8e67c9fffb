"""``nnfast bench --contended``: a process that keeps one core busy, switched on and off between samples.

A kernel that splits its work evenly between threads and waits for the
last one is as slow as its slowest thread: on a machine where another
process holds one core, the thread on that core runs a time slice now and
then, and the whole kernel with it. ``--contended`` measures every case
twice, side by side in the same rounds: quiet, and with a spinning process
beside it, and reports how much of its quiet speed each implementation
keeps (``kept = quiet median / contended median``).

The spinner is a separate Python process in a session of its own (on Linux,
where the scheduler shares the CPU between sessions first, it competes as
another user's job does), pinned to the last CPU where the OS allows, and
paused (``SIGSTOP``) whenever a quiet sample is taken. It is stopped when
the run ends, also on an error or Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

_SPIN = "while True:\n    pass\n"


class Spinner:
    """A busy-looping child process; :meth:`on` / :meth:`off` resume and pause it."""

    #: Seconds given to the scheduler after a switch, before timing starts.
    settle = 0.01

    def __init__(self) -> None:
        if not hasattr(signal, "SIGSTOP"):
            raise RuntimeError("--contended needs POSIX signals (SIGSTOP / SIGCONT) to pause the spinning process")
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        #: The CPU the spinner is pinned to (None: left to the OS).
        self.cpu: int | None = cpus[-1] if len(cpus) > 1 else None
        self._proc = subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        self._running = True
        self.off()
        if self.cpu is not None:
            os.sched_setaffinity(self._proc.pid, {self.cpu})

    def _signal(self, sig: int, running: bool) -> None:
        if self._running == running or self._proc.poll() is not None:
            return
        os.kill(self._proc.pid, sig)
        self._running = running
        time.sleep(self.settle)

    def on(self) -> None:
        """Let the spinner run."""
        self._signal(signal.SIGCONT, True)

    def off(self) -> None:
        """Pause the spinner."""
        self._signal(signal.SIGSTOP, False)

    def close(self) -> None:
        """End the spinner (idempotent)."""
        if self._proc.poll() is None:
            self._proc.kill()  # SIGKILL ends a stopped process too
        self._proc.wait()

    def describe(self) -> dict[str, Any]:
        """What the report records about the competing process."""
        where = f"pinned to CPU {self.cpu}" if self.cpu is not None else "placed by the OS"
        return {"what": f"a busy-looping Python process in its own session, {where}",
                **({"cpu": self.cpu} if self.cpu is not None else {})}

    def __enter__(self) -> "Spinner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
