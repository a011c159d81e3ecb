"""The VIST3A-nano recipe end to end, resumable per stage.

    world → vae → latents → denoiser ┐
          → recon ───────→ layer_search → stitch → classifier → reward → assemble
                  (vae) ──┘

``run_recipe(work_dir, settings, stages)`` runs the requested stages in order, skipping those
already done (``done.json``) and refusing those whose inputs are missing. Every training stage
stops at its step budget or its time budget (minutes, for this run), saves its state every few
minutes and resumes from it. Independent stages can run in separate processes on the same
folder (e.g. ``vae,latents,denoiser`` beside ``recon``): a stage only ever writes its own
sub-folder.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ...errors import Vist3AInputError
from ..nano_models import NanoConfig
from ..world import WorldConfig
from .data import WorldClips
from .reuse import check_sources, read_recorded_settings, reuse_stages, warm_start_origin
from .reuse import warm_start as copy_warm_states
from .workspace import Budget, Workspace, write_json

STAGES = ("vae", "latents", "denoiser", "recon", "layer_search", "stitch", "classifier", "reward", "assemble")
REQUIRES = {"vae": (), "latents": ("vae",), "denoiser": ("latents",), "recon": (),
            "layer_search": ("vae", "recon"), "stitch": ("layer_search",), "classifier": (),
            "reward": ("denoiser", "stitch", "classifier"), "assemble": ("reward",)}


@dataclass
class RecipeSettings:
    """Everything that shapes the result. Budgets: (total steps, minutes per run or None)."""

    preset: str = "nano"
    seed: int = 0
    threads: int = 1
    # vae
    vae_budget: Budget = field(default_factory=lambda: Budget(4000))
    vae_batch: int = 4
    vae_window: int = 5  # frames per training clip (1 + 4: both causal paths of the encoder)
    vae_crop: int = 48  # square crop of each training clip (its full size when larger)
    vae_lr: float = 3e-4
    vae_stat_clips: int = 64
    # latents / denoiser
    latent_clips: int = 4000
    denoiser_budget: Budget = field(default_factory=lambda: Budget(20000))
    denoiser_batch: int = 8
    denoiser_lr: float = 3e-4
    denoiser_ema: float = 0.999
    # reconstruction network
    recon_budget: Budget = field(default_factory=lambda: Budget(4000))
    recon_batch: int = 1
    recon_lr: float = 4e-4
    recon_warmup: int = 100
    recon_rgb_self: float = 0.0
    recon_camera_weight: float = 1.0
    recon_frames: list | None = None  # [min, max] frames per step (frame 0 + random others); None: all
    recon_render_every: int = 1  # the rendered loss terms every N-th step only
    # layer search / stitch
    layer_search_clips: int = 64
    stitch_budget: Budget = field(default_factory=lambda: Budget(2000))
    stitch_batch: int = 1
    stitch_lr: float = 3e-4
    # classifier / reward
    classifier_budget: Budget = field(default_factory=lambda: Budget(1500))
    reward_budget: Budget = field(default_factory=lambda: Budget(200))
    reward_batch: int = 1
    reward_lr: float = 1e-4
    reward_views: int = 2  # rendered views per rollout
    reward_render_size: int = 32  # their size in pixels (the classifier needs >= 16)
    # evaluation sizes inside the stages (the full report is ``vist3a-rt eval``)
    eval_clips_vae: int = 8
    eval_clips_recon: int = 8

    def to_dict(self) -> dict:
        out = asdict(self)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RecipeSettings":
        names = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(names)
        if unknown:
            raise Vist3AInputError(f"unknown recipe settings {sorted(unknown)}")
        values = {k: Budget(**v) if k.endswith("_budget") and isinstance(v, dict) else v for k, v in data.items()}
        return cls(**values)

    def with_overrides(self, overrides: dict) -> "RecipeSettings":
        return RecipeSettings.from_dict({**self.to_dict(), **overrides})


class Run:
    """What every stage function receives: the settings, the folder, the nano sizes, world access."""

    def __init__(self, workspace: Workspace, settings: RecipeSettings) -> None:
        self.workspace, self.settings = workspace, settings
        self.nano = NanoConfig.from_name(settings.preset)
        self._clips: dict[str, WorldClips] = {}

    def decoder_config(self, stitching_location: str | None = None):
        """The reconstruction network's config for this preset (cut at ``stitching_location``)."""
        from ..recon import micro_decoder_config, nano_decoder_config

        make = micro_decoder_config if self.settings.preset == "micro" else nano_decoder_config
        return make() if stitching_location is None else make(stitching_location)

    def clips(self, split: str) -> WorldClips:
        if split not in self._clips:
            size = self.decoder_config().resolutions.feedforward_resolution
            world = WorldConfig(num_frames=self.nano.num_frames)
            self._clips[split] = WorldClips(split, seed=self.settings.seed, video_size=self.nano.height,
                                            network_size=size, config=world)
        return self._clips[split]


STAGE_FUNCTIONS = {"vae": "video_stages:train_vae", "latents": "video_stages:encode_latents",
                   "denoiser": "video_stages:train_denoiser", "recon": "decoder_stages:train_recon",
                   "layer_search": "decoder_stages:search_layer", "stitch": "decoder_stages:train_stitch",
                   "classifier": "reward_stages:train_classifier", "reward": "reward_stages:train_reward",
                   "assemble": "assemble:assemble"}


def stage_function(stage: str):
    """The function of ``stage`` (imported on demand: the stages pull in diffusers / transformers)."""
    import importlib

    module, name = STAGE_FUNCTIONS[stage].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def resolve_stages(names: str | list[str] | None) -> list[str]:
    if names is None or names == "all":
        return list(STAGES)
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    unknown = [n for n in wanted if n not in STAGES]
    if unknown:
        raise Vist3AInputError(f"unknown stages {unknown}; the recipe's stages are {', '.join(STAGES)}")
    return [s for s in STAGES if s in wanted]


def open_workspace(work_dir: str | Path, settings: RecipeSettings | None, overrides: dict | None = None):
    """The folder and its settings: new ones recorded in ``recipe.json``; an existing folder's
    settings are reused (``overrides`` may change budgets and evaluation sizes only)."""
    ws = Workspace(work_dir)
    path = ws.root / "recipe.json"
    if path.is_file():
        recorded = RecipeSettings.from_dict(json.loads(path.read_text())["settings"])
        if settings is not None and settings != recorded:
            raise Vist3AInputError(f"{path} was started with other settings; use another folder or "
                                   "change only budgets through overrides")
        settings = recorded
    settings = settings or RecipeSettings()
    if overrides:
        current = settings.to_dict()
        shaping = [k for k in overrides if not (k.endswith("_budget") or k.startswith("eval_") or k == "threads")
                   and k in current and overrides[k] != current[k]]
        if shaping and path.is_file():
            raise Vist3AInputError(f"{shaping} shape the result and cannot change in an existing recipe folder")
        settings = settings.with_overrides(overrides)
    if not path.is_file():
        write_json(path, {"settings": _budgetless(settings)})
    return ws, settings


def _budgetless(settings: RecipeSettings) -> dict:
    return settings.to_dict()


def run_recipe(work_dir: str | Path, settings: RecipeSettings | None = None, stages=None, *,
               overrides: dict | None = None, redo: list[str] | None = None,
               reuse_from: str | Path | None = None, warm_start: list[str] | None = None) -> dict:
    """Run ``stages`` (default all) in order; returns {stage: done record}.

    ``reuse_from``: another recipe folder whose finished stages are copied where they match
    (``reuse.reuse_stages``); a new folder then starts from its settings (``overrides`` change
    them); ``warm_start``: stages whose training state is copied from it.
    """
    if warm_start and reuse_from is None:
        raise Vist3AInputError("warm_start needs reuse_from (the folder to take the states from)")
    if reuse_from is not None:
        check_sources(reuse_from, resolve_stages(warm_start) if warm_start else [])
    if reuse_from is not None and settings is None and not (Path(work_dir) / "recipe.json").is_file():
        settings = RecipeSettings.from_dict(read_recorded_settings(Path(reuse_from)))
    ws, settings = open_workspace(work_dir, settings, overrides)
    if reuse_from is not None:
        reuse_stages(ws, settings.to_dict(), reuse_from, REQUIRES)
        copy_warm_states(ws, reuse_from, resolve_stages(warm_start) if warm_start else [])
    if redo:
        ws.reopen(resolve_stages(redo), REQUIRES)
    torch.set_num_threads(settings.threads)
    run = Run(ws, settings)
    records = {}
    for stage in resolve_stages(stages):
        if ws.is_done(stage):
            records[stage] = ws.done_record(stage)
            continue
        missing = [r for r in REQUIRES[stage] if not ws.is_done(r)]
        if missing:
            raise Vist3AInputError(f"stage {stage!r} needs {missing} to be done first")
        started = time.time()
        record = stage_function(stage)(run)
        record.update(stage=stage, wall_s=round(time.time() - started, 1), finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                      settings={k: v for k, v in settings.to_dict().items()}, host=platform.node(),
                      torch=torch.__version__, commit=git_commit(), command=_command_line())
        if warm_start_origin(ws, stage):
            record["warm_start"] = warm_start_origin(ws, stage)
        ws.mark_done(stage, record)
        records[stage] = record
    return records


def _command_line() -> str:
    import shlex
    import sys

    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
