"""``run_eval``: the evaluation report of a trained model on the world's held-out compositions.

    report = run_eval(EvalSettings(model="path/to/model", clips=8, prompts=64))
    write_report(report, "out/eval")          # report.md + report.json, each written atomically

Sections (each a function returning a dict; ``report["sections"][name]``):

1. ``reconstruction`` — the unstitched network from RGB frames (``world_eval``);
2. ``stitched`` — the stitched decoder from VAE latents of the same clips, its gap to (1),
   the layer-search table when the folder has ``layer_search.json`` (``world_eval``);
3. ``robustness`` — noisy latents: stitched vs decode-then-reconstruct (``robustness``);
4. ``faithfulness`` — colour/shape of generated scenes, by a checker validated on exact renders
   (``faithfulness``, ``attribute_check``);
5. ``consistency`` — renders at the predicted cameras vs the decoded frames (``faithfulness``);
6. ``comparison`` — with ``baseline``: its sections 4–5 on the same prompts and seeds.

Sizes come from the model's config; clips, prompts and noise draws are fixed by ``seed``, so
two runs with the same settings on the same model give the same numbers (timings aside).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shlex
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import Vist3AInputError
from .attribute_check import AttributeChecker, CheckerSettings, validate_checker
from .clips import heldout_clips, heldout_prompts, world_config
from .faithfulness import compare, consistency_section, faithfulness_section, generate_and_check
from .markdown import render_markdown
from .model import EvalModel, load_eval_model, model_paths
from .robustness import NOISE_LEVELS, robustness_section
from .world_eval import encode_clips, reconstruction_section, stitched_section

REPORT_FORMAT, REPORT_VERSION = "vist3a-rt/eval", 1
DEFAULT_CLIPS, DEFAULT_PROMPTS = 8, 64
REPORT_FILES = ("report.json", "report.md")


@dataclass
class EvalSettings:
    """What a report depends on besides the model's weights."""

    model: str | Path = "nano"
    baseline: str | Path | None = None  # a model folder (e.g. before reward fine-tuning): sections 4-5 again
    clips: int = DEFAULT_CLIPS  # held-out clips for sections 1-3 (0 skips them)
    prompts: int = DEFAULT_PROMPTS  # held-out captions for sections 4-5 (0 skips them)
    steps: int | None = None  # denoising steps (None: the model's default)
    seed: int = 0  # the held-out stream, the noise draws, and the base of the generation seeds
    noise_levels: tuple[float, ...] = NOISE_LEVELS
    device: str = "cpu"
    checker: CheckerSettings = field(default_factory=CheckerSettings)

    def __post_init__(self) -> None:
        self.model = str(self.model)  # a Path is welcome; the report records text
        self.baseline = None if self.baseline is None else str(self.baseline)
        for name, minimum in (("clips", 0), ("prompts", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise Vist3AInputError(f"{name} must be an int >= {minimum}, got {value!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise Vist3AInputError(f"steps must be an int >= 1, got {self.steps!r}")
        if not self.noise_levels or any(not (isinstance(v, (int, float)) and v > 0) for v in self.noise_levels):
            raise Vist3AInputError(f"noise levels must be positive numbers, got {self.noise_levels!r}")
        self.noise_levels = tuple(float(v) for v in self.noise_levels)

    def command_line(self, out_dir: str | Path | None = None) -> str:
        """The ``vist3a-rt eval`` command that makes this report (writing it to ``out_dir``)."""
        args = ["vist3a-rt", "eval", "--model", self.model, "--clips", str(self.clips), "--prompts",
                str(self.prompts), "--seed", str(self.seed), "--device", self.device]
        if self.baseline is not None:
            args += ["--baseline", self.baseline]
        if self.steps is not None:
            args += ["--steps", str(self.steps)]
        if out_dir is not None:
            args += ["--out", str(out_dir)]
        return shlex.join(args)


def run_eval(settings: EvalSettings, *, command: str | None = None, log=None) -> dict:
    """Every section for ``settings.model`` (and the comparison with ``settings.baseline``).

    ``command``: recorded as the command that made the report (default: the equivalent
    ``vist3a-rt eval`` line); ``log``: called with one line per stage, for progress.
    """
    log = log or (lambda line: None)
    started, timings = time.perf_counter(), {}
    for source in (settings.model, settings.baseline):  # bad folders fail before the long part
        if source is not None:
            model_paths(source)
    log(f"loading {settings.model}")
    model = load_eval_model(settings.model, device=settings.device)
    timings["load_model"] = model.load_seconds
    checkers: dict = {}
    sections = {**_world_sections(model, settings, timings, log),
                **_prompt_sections(model, settings, checkers, timings, log)}
    if settings.baseline is not None and settings.prompts:
        log(f"loading baseline {settings.baseline}")
        baseline = load_eval_model(settings.baseline, device=settings.device)
        timings["load_baseline"] = baseline.load_seconds
        before = _prompt_sections(baseline, settings, checkers, timings, log, prefix="baseline_")
        sections["comparison"] = {"baseline": settings.baseline, **compare(sections, before),
                                  "baseline_sections": before}
    timings["total"] = time.perf_counter() - started
    return _finite({
        "format": REPORT_FORMAT, "format_version": REPORT_VERSION,
        "command": command or settings.command_line(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"source": settings.model, "folder": str(model.paths.stitched.parent),
                  "manifest": model.manifest, "sizes": asdict(model.sizes),
                  "stitching": model.config.stitching.stitching_layer_location,
                  "lora": None if model.paths.lora is None else str(model.paths.lora)},
        "settings": {**asdict(settings), "threads": torch.get_num_threads()},
        "environment": _environment(),
        "sections": sections, "timings": timings})


def _world_sections(model: EvalModel, settings: EvalSettings, timings: dict, log) -> dict:
    if not settings.clips:
        return {}
    log(f"rendering {settings.clips} held-out clips at {model.sizes.video} / {model.sizes.network} px")
    with _timed(timings, "clips"):
        clips = heldout_clips(model.sizes, settings.clips, seed=settings.seed)
    log("1. reconstruction network from RGB frames")
    with _timed(timings, "reconstruction"):
        reconstruction = reconstruction_section(model, clips)
    log("2. stitched decoder from VAE latents")
    with _timed(timings, "stitched"):
        encoded = encode_clips(model, clips)
        stitched = stitched_section(model, clips, encoded, reconstruction)
    log("3. robustness to latent noise")
    with _timed(timings, "robustness"):
        robustness = robustness_section(model, clips, encoded, levels=settings.noise_levels, seed=settings.seed)
    return {"reconstruction": reconstruction, "stitched": stitched, "robustness": robustness}


def _prompt_sections(model: EvalModel, settings: EvalSettings, checkers: dict, timings: dict, log, *,
                     prefix: str = "") -> dict:
    """Sections 4-5; ``checkers`` keeps one validated checker per model size across calls."""
    if not settings.prompts:
        return {}
    if model.sizes not in checkers:
        log("building and validating the colour/shape checker on exact renders")
        with _timed(timings, "checker"):
            checker = AttributeChecker.build(model.sizes.network, world=world_config(model.sizes),
                                             settings=settings.checker)
            checkers[model.sizes] = checker, validate_checker(checker, list(range(settings.prompts)),
                                                              seed=settings.seed)
    checker, validation = checkers[model.sizes]
    prompts = heldout_prompts(model.sizes, settings.prompts, seed=settings.seed)
    generation = {"num_steps": settings.steps or model.runtime.defaults.num_steps,
                  "guidance_scale": model.runtime.defaults.guidance_scale, "seed_base": settings.seed}
    log(f"4-5. generating {len(prompts)} held-out prompts with {model.source}")
    with _timed(timings, f"{prefix}generation"):
        records = generate_and_check(model.runtime, prompts, checker, model.background, seed=settings.seed,
                                     steps=generation["num_steps"], log=log)
    timings[f"{prefix}seconds_per_prompt"] = timings[f"{prefix}generation"] / len(records)
    return {"faithfulness": faithfulness_section(records, validation, generation),
            "consistency": consistency_section(records)}


@contextmanager
def _timed(timings: dict, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _environment() -> dict:
    from ..pipeline.result import library_versions
    from ..training.nano.recipe import git_commit

    return {"versions": library_versions(), "commit": git_commit()}


def _finite(value):
    """The report with non-finite floats as None: strict JSON, and 'no number' reads as such."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------- writing


def check_output_folder(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path, after checking a report can be written there (run before the long part)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise Vist3AInputError(f"cannot write the report to {out_dir}: it exists and is not a folder")
    parent = next((p for p in (out_dir, *out_dir.absolute().parents) if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK):
        raise Vist3AInputError(f"cannot write the report to {out_dir}: {parent} is not writable")
    return out_dir


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``report.json`` and ``report.md`` in ``out_dir`` (created if needed). Both are rendered
    before anything is written, and each file appears whole (temporary file + rename)."""
    out_dir = check_output_folder(out_dir)
    contents = {"report.json": json.dumps(report, indent=1, allow_nan=False) + "\n",
                "report.md": render_markdown(report)}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        temporary = {name: out_dir / f".{name}.tmp-{secrets.token_hex(4)}" for name in contents}
        try:
            for name, text in contents.items():
                temporary[name].write_text(text, encoding="utf-8")
            for name in REPORT_FILES:
                os.replace(temporary[name], out_dir / name)
        finally:
            for path in temporary.values():
                path.unlink(missing_ok=True)
    except OSError as err:
        raise Vist3AInputError(f"cannot write the report to {out_dir}: {err}") from err
    return out_dir / "report.json", out_dir / "report.md"


__all__ = ["DEFAULT_CLIPS", "DEFAULT_PROMPTS", "EvalSettings", "check_output_folder", "run_eval", "write_report"]
