"""Starting a recipe folder from another one: reuse its finished stages, warm-start others.

A recipe folder's shaping settings are fixed (``recipe.json``), so trying a change to one stage —
say the reconstruction network's loss — means a new folder. Retraining every stage before it
would cost hours for nothing: ``reuse_stages`` copies each finished stage of the source folder
whose own settings equal the new folder's and whose inputs were reused too (a stage trained on
another VAE is not the same stage). ``warm_start`` copies a stage's training state instead, so
the new folder continues training it under its new settings rather than starting from scratch;
its ``done.json`` then records where it started from.

Which settings belong to a stage: those named with its prefix (``STAGE_SETTING_PREFIXES``) plus
``preset`` and ``seed``. Budgets are not part of a stage's identity (a folder may extend them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ...errors import Vist3AInputError
from .workspace import DONE_FILE, STATE_FILE, Workspace, write_json

STAGE_SETTING_PREFIXES = {
    "vae": ("vae_",), "latents": ("latent_",), "denoiser": ("denoiser_",), "recon": ("recon_",),
    "layer_search": ("layer_search_",), "stitch": ("stitch_",), "classifier": ("classifier_",),
    "reward": ("reward_",), "assemble": (),
}
SHARED_SETTINGS = ("preset", "seed")
WARM_START_FILE = "warm_start.json"


def stage_settings(settings: dict, stage: str) -> dict:
    """The settings that shape ``stage``'s result (budgets excluded)."""
    prefixes = STAGE_SETTING_PREFIXES[stage]
    return {k: v for k, v in settings.items()
            if not k.endswith("_budget") and (k in SHARED_SETTINGS or k.startswith(prefixes))}


def read_recorded_settings(folder: Path) -> dict:
    path = folder / "recipe.json"
    if not path.is_file():
        raise Vist3AInputError(f"{folder} is not a recipe folder (no recipe.json)")
    return json.loads(path.read_text())["settings"]


def reuse_stages(target: Workspace, settings: dict, source_dir: str | Path,
                 requires: dict[str, tuple[str, ...]]) -> list[str]:
    """Copy the source folder's reusable finished stages into ``target``; returns their names.

    Stages ``target`` already has (done or started) are left alone; a stage is reusable when it is
    done in the source, its settings match and every stage it needs was reused (or is done in
    ``target`` from that same copy).
    """
    source = Path(source_dir)
    if source.resolve() == target.root.resolve():
        raise Vist3AInputError("--reuse-from must name another recipe folder than --out")
    recorded = read_recorded_settings(source)
    reused: list[str] = []
    for stage in requires:  # recipe order
        if not (source / stage / DONE_FILE).is_file():
            continue
        if stage_settings(recorded, stage) != stage_settings(settings, stage):
            continue
        if any(need not in reused for need in requires[stage]):
            continue
        if (target.root / stage).exists():
            if target.is_done(stage) and target.done_record(stage).get("reused_from") == str(source.resolve()):
                reused.append(stage)
            continue
        shutil.copytree(source / stage, target.root / stage)
        record = target.done_record(stage)
        record["reused_from"] = str(source.resolve())
        target.mark_done(stage, record)
        reused.append(stage)
    return reused


def check_sources(source_dir: str | Path, warm_stages: list[str]) -> None:
    """Refuse a source that is not a recipe folder or lacks a warm-start state, before anything is written."""
    source = Path(source_dir)
    read_recorded_settings(source)
    for stage in warm_stages:
        if not (source / stage / STATE_FILE).is_file():
            raise Vist3AInputError(f"cannot warm-start {stage!r}: {source / stage / STATE_FILE} does not exist")


def warm_start(target: Workspace, source_dir: str | Path, stages: list[str]) -> list[str]:
    """Copy each stage's training state (``state.pt``) from the source folder; returns those copied.

    Refuses a stage that is already done or started in ``target`` (its own state wins) or that
    has no state in the source.
    """
    source = Path(source_dir)
    started = []
    for stage in stages:
        state = source / stage / STATE_FILE
        if not state.is_file():
            raise Vist3AInputError(f"cannot warm-start {stage!r}: {state} does not exist")
        if (target.root / stage / STATE_FILE).exists() or target.is_done(stage):
            continue
        shutil.copyfile(state, target.stage_dir(stage) / STATE_FILE)
        write_json(target.root / stage / WARM_START_FILE, {"from": str(state.resolve())})
        started.append(stage)
    return started


def warm_start_origin(workspace: Workspace, stage: str) -> str | None:
    path = workspace.root / stage / WARM_START_FILE
    return json.loads(path.read_text())["from"] if path.is_file() else None
