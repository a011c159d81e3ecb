"""Turning CLI input (one prompt or a prompts file) into generation jobs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import Vist3AInputError

DEFAULT_OUT_ROOT = Path("out")


@dataclass(frozen=True)
class Job:
    prompt: str
    seed: int
    out_dir: Path


def slugify(prompt: str, max_length: int = 48) -> str:
    """A folder name from a prompt: lower-case words joined by dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_length].rstrip("-")
    return slug or "scene"


def read_prompts(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise Vist3AInputError(f"prompts file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise Vist3AInputError(f"prompts file {path} is not UTF-8 text: {err}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise Vist3AInputError(f"prompts file {path} holds no prompts")
    return prompts


def plan_jobs(prompt: str | None, prompts_file: Path | None, out_dir: Path | None, seed: int) -> list[Job]:
    """One job for a single prompt; for a prompts file, one folder per prompt under ``out_dir``
    (``NNN-<slug>``) and seeds ``seed + index`` — deterministic, distinct per prompt."""
    if (prompt is None) == (prompts_file is None):
        raise Vist3AInputError("give either a PROMPT or --prompts FILE (exactly one)")
    if prompt is not None:
        if not prompt.strip():
            raise Vist3AInputError("the prompt is empty")
        return [Job(prompt, seed, out_dir or DEFAULT_OUT_ROOT / slugify(prompt))]
    prompts = read_prompts(prompts_file)
    root = out_dir or DEFAULT_OUT_ROOT / prompts_file.stem
    return [Job(p, seed + i, root / f"{i:03d}-{slugify(p)}") for i, p in enumerate(prompts)]
