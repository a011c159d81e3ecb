"""``DiskCache``: arrays saved as ``<key>.npz`` files in one folder, kept under a byte cap.

Two policies: ``"stop"`` (default) writes until the next file would pass the cap, then stops
caching: with epochs that replay the same indices in order (the data set's use) it keeps a hit
rate of cap / epoch size, where LRU would evict every file just before its next use.
``"lru"`` writes every file and then deletes the least recently used (file mtime, refreshed
on every hit) until the folder is under the cap again: for random access with hot samples.

Safe for several processes (data-loader workers) sharing a folder: files are written to a
temporary name and renamed into place, a file that vanishes or is truncated reads as a miss,
and the folder total is re-measured before each write (so the cap can be passed by at most one
file per concurrent writer).
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from ...errors import Vist3AInputError

POLICIES = ("stop", "lru")
_KEY = re.compile(r"^[0-9a-zA-Z_-]+$")


class DiskCache:
    def __init__(self, root: str | Path, max_bytes: int, policy: str = "stop") -> None:
        if policy not in POLICIES:
            raise Vist3AInputError(f"cache policy must be one of {POLICIES}, got {policy!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise Vist3AInputError(f"cache max_bytes must be an int >= 0, got {max_bytes!r}")
        self.root, self.max_bytes, self.policy = Path(root), max_bytes, policy
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise Vist3AInputError(f"cache keys are letters, digits, '-' and '_', got {key!r}")
        return self.root / f"{key}.npz"

    def _entries(self) -> list[tuple[float, int, str]]:  # (mtime, bytes, path), oldest first
        entries = []
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.name.endswith(".npz") and not entry.name.startswith("."):
                    try:
                        stat = entry.stat()
                    except FileNotFoundError:  # evicted by another process meanwhile
                        continue
                    entries.append((stat.st_mtime, stat.st_size, entry.path))
        return sorted(entries)

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        path = self._path(key)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # truncated or foreign: drop it
            path.unlink(missing_ok=True)
            return None
        if self.policy == "lru":
            try:
                os.utime(path)
            except FileNotFoundError:
                pass
        return arrays

    def put(self, key: str, arrays: dict[str, np.ndarray]) -> bool:
        """Store ``arrays`` under ``key``; False when the policy declined (the cap)."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        payload = buffer.getbuffer()
        if payload.nbytes > self.max_bytes:
            return False
        if self.policy == "stop" and self.size_bytes() + payload.nbytes > self.max_bytes:
            return False
        path = self._path(key)
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        tmp.write_bytes(payload)
        os.replace(tmp, path)
        if self.policy == "lru":
            self._evict(keep=str(path))
        return True

    def _evict(self, keep: str) -> None:
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if path != keep:
                Path(path).unlink(missing_ok=True)
                total -= size
