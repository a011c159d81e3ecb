"""A recipe's working folder: one sub-folder per stage, resumable training loops, logs.

    work/
      recipe.json            the settings the run was started with (later runs must agree)
      <stage>/state.pt       the stage's latest training state (resumed from)
      <stage>/log.jsonl      one JSON line per logged step
      <stage>/done.json      written when the stage finished: its metrics and wall time
      <stage>/...            the stage's artifacts

A stage is skipped when its ``done.json`` exists; ``Workspace.reopen(stage)`` removes the
marker (and those of every stage that depends on it) so that a run with a larger budget
continues from ``state.pt``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import Vist3AInputError

DONE_FILE, STATE_FILE, LOG_FILE = "done.json", "state.pt", "log.jsonl"


@dataclass(frozen=True)
class Budget:
    """Train until ``steps`` in total (across resumptions) or ``minutes`` of this run, whichever first."""

    steps: int
    minutes: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise Vist3AInputError(f"budget steps must be an int >= 0, got {self.steps!r}")
        if self.minutes is not None and not self.minutes > 0:
            raise Vist3AInputError(f"budget minutes must be positive, got {self.minutes!r}")


class Workspace:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise Vist3AInputError(f"recipe folder is not writable: {self.root}")

    def stage_dir(self, stage: str) -> Path:
        path = self.root / stage
        path.mkdir(exist_ok=True)
        return path

    def is_done(self, stage: str) -> bool:
        return (self.root / stage / DONE_FILE).is_file()

    def done_record(self, stage: str) -> dict:
        return json.loads((self.root / stage / DONE_FILE).read_text())

    def mark_done(self, stage: str, record: dict) -> None:
        write_json(self.stage_dir(stage) / DONE_FILE, record)

    def reopen(self, stages: list[str], requires: dict[str, tuple[str, ...]]) -> list[str]:
        """Remove the done markers of ``stages`` and of every stage that (transitively) needs one."""
        affected = set(stages)
        changed = True
        while changed:
            dependants = {s for s, needs in requires.items() if affected & set(needs)} - affected
            affected |= dependants
            changed = bool(dependants)
        reopened = [s for s in requires if s in affected and self.is_done(s)]
        for stage in reopened:
            (self.root / stage / DONE_FILE).unlink()
        return reopened

    # -- training state

    def load_state(self, stage: str) -> dict | None:
        path = self.root / stage / STATE_FILE
        return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None

    def save_state(self, stage: str, state: dict) -> None:
        """Atomic: a crash mid-write leaves the previous state in place."""
        path = self.stage_dir(stage) / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def log(self, stage: str, record: dict) -> None:
        with open(self.stage_dir(stage) / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


class TrainLoop:
    """Iterate step numbers from ``start`` within ``budget``, with a progress bar, a JSON log
    every ``log_every`` steps (running means of the metrics) and ``save()`` every
    ``save_every_s`` seconds and at the end."""

    def __init__(self, workspace: Workspace, stage: str, budget: Budget, start: int,
                 save: Callable[[], None], *, log_every: int = 20, save_every_s: float = 300.0) -> None:
        self.workspace, self.stage, self.budget, self.start = workspace, stage, budget, start
        self.save, self.log_every, self.save_every_s = save, log_every, save_every_s
        self.sums: dict[str, float] = {}
        self.count = 0
        self.step = start
        self.started = time.monotonic()

    def __iter__(self) -> Iterator[int]:
        from tqdm.auto import tqdm

        deadline = None if self.budget.minutes is None else self.started + 60 * self.budget.minutes
        last_save = time.monotonic()
        bar = tqdm(total=self.budget.steps, initial=self.start, desc=self.stage, dynamic_ncols=True,
                   mininterval=5.0)
        try:
            while self.step < self.budget.steps and (deadline is None or time.monotonic() < deadline):
                yield self.step
                self.step += 1
                bar.update(1)
                if self.step % self.log_every == 0:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in self._flush().items() if k in ("loss", "total")})
                if time.monotonic() - last_save > self.save_every_s:
                    self.save()
                    last_save = time.monotonic()
        finally:
            bar.close()
        self._flush()
        self.save()

    def record(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1

    def _flush(self) -> dict[str, float]:
        if not self.count:
            return {}
        means = {k: v / self.count for k, v in self.sums.items()}
        self.workspace.log(self.stage, {"step": self.step, "time_s": round(time.monotonic() - self.started, 1),
                                        **means})
        self.sums, self.count = {}, 0
        return means

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started
