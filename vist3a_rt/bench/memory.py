"""Peak memory: resident set of this process, and the torch CUDA allocator's peak."""

from __future__ import annotations

import resource
import sys

import torch

MIB = 2**20


def peak_rss_mib() -> float:
    """This process's peak resident set size so far.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this program's address space.
    Not ``getrusage``'s ``ru_maxrss``: Linux carries that over ``execve``, so a child started by
    a bigger parent reports the parent's size at ``fork``. Elsewhere ``ru_maxrss`` (bytes on
    macOS, KiB on the BSDs).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def reset_gpu_peak(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mib(device: torch.device | str) -> float | None:
    """Peak bytes held by torch's CUDA allocator since the last reset (None off CUDA). Memory that
    a library allocates itself (TensorRT's activations, onnxruntime's arena) is not in it."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / MIB
