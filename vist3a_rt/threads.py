"""How many CPU threads torch gets: ``--threads auto`` (the CLI's default) or a number.

torch starts with one OpenMP thread per core. On a machine where other processes keep cores busy
that is the worst choice: every parallel region waits at its barrier for a thread the kernel has
descheduled. Measured on the 2-core dev box beside a one-thread training job: nano ``generate`` at
2 threads took 29-110 s, at 1 thread 2.3 s; on the idle box 2 threads win (1.6 s). ``auto``
therefore takes the cores this process may run on minus the ones the 1-minute load average says
are busy, and at least one.
"""

from __future__ import annotations

import os

from .errors import Vist3AInputError


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def idle_cores() -> int:
    """Usable cores not taken by the current load (1-minute average), at least 1."""
    cores = usable_cores()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores
    return max(1, min(cores, int(cores - busy + 0.5)))


def resolve_threads(spec: str | int | None) -> int:
    """``"auto"``/None -> ``idle_cores()``; a positive integer (or its text) -> itself."""
    if spec is None or spec == "auto":
        return idle_cores()
    try:
        count = int(spec)
    except (TypeError, ValueError):
        raise Vist3AInputError(f"threads must be 'auto' or a positive integer, got {spec!r}") from None
    if count < 1:
        raise Vist3AInputError(f"threads must be 'auto' or a positive integer, got {spec!r}")
    return count
