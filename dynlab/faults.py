"""Named fault points, for tests that interrupt real dynlab processes at chosen moments.

Code that must survive an interruption calls `fault_point("phase-name")` at the moments that
matter (between two writes, after a rename). Unless the environment variable DYNLAB_FAULT
names that phase, the call does nothing. DYNLAB_FAULT is a comma list of `PHASE:ACTION`:

    kill       the process sends itself SIGKILL (no cleanup runs, as with `kill -9`)
    interrupt  the process sends itself SIGINT (as Ctrl-C: KeyboardInterrupt is raised)
    pause      the process creates the file named by DYNLAB_FAULT_MARK (if set), then sleeps
               until a signal ends it, so a test can send SIGKILL or SIGINT itself

`PHASE:ACTION@N` acts on the N-th time the phase is reached (1-based; default 1).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

ENV = "DYNLAB_FAULT"
MARK_ENV = "DYNLAB_FAULT_MARK"

_seen: Counter[str] = Counter()


def fault_point(phase: str) -> None:
    """Act on `phase` if DYNLAB_FAULT names it (see the module docstring); else nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _seen[phase] += 1
    for item in spec.split(","):
        name, _, action = item.strip().partition(":")
        if name != phase:
            continue
        action, _, nth = action.partition("@")
        if _seen[phase] != (int(nth) if nth else 1):
            continue
        if action in ("", "kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "interrupt":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the KeyboardInterrupt arrives here
        elif action == "pause":
            mark = os.environ.get(MARK_ENV)
            if mark:
                with open(mark, "w") as f:
                    f.write(f"{os.getpid()} {phase}\n")
            while True:
                time.sleep(0.05)
        else:
            raise ValueError(f"{ENV}={spec!r}: unknown action {action!r} "
                             "(expected kill, interrupt or pause)")
