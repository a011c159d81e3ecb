"""Repeated timings and their summary: median, quartiles, min, max."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Median, quartiles (``statistics.quantiles``, inclusive method), min, max and count."""
    if not values:
        raise ValueError("summarize needs at least one value")
    values = sorted(float(v) for v in values)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": values[0], "max": values[-1],
            "n": len(values)}


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued CUDA work so a wall-clock reading covers it (no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], *, device: torch.device | str | None = None) -> tuple[float, object]:
    """(seconds, result) of one call, CUDA work included."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def time_repeats(fn: Callable[[], object], *, repeats: int, warmup: int = 1,
                 device: torch.device | str | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return [time_call(fn, device=device)[0] for _ in range(repeats)]
