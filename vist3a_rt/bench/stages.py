"""Stage timings of one loaded model, through the public API only (so every backend is timed
the same way): ``generate`` reports text / denoise / VAE decode / 3D decode, and around it the
bench times one preview frame, saving without and with the preview, and the whole call.

Per run (``one_run``):

* text — ``timings["text"]`` for a prompt string the model has not cached (``fresh_prompt``),
  so it is what a new prompt costs; the negative prompt stays cached, as in a long-running
  process (a bundle stores its embedding);
* denoise_step — ``timings["denoise"]`` / the number of steps (transformer forward with the CFG
  batch + guidance + solver step);
* vae_decode, decode_3d — as reported;
* render — one frame of the preview orbit (the first predicted camera at the preview size),
  drawable Gaussians only, with the fastest rasterizer here (``render(backend="auto")``);
* save — ``result.save(preview=False)``: scene.ply, cameras.json, meta.json;
* generate — the wall time of the ``generate`` call (CUDA work included);
* e2e_no_preview, e2e_with_preview — generate + save without / with the preview video (what
  ``vist3a-rt generate --no-preview`` / ``vist3a-rt generate`` wait for once loaded).

On CUDA the reported stage split is approximate (kernels run asynchronously and the pipeline
does not synchronise between stages); generate and the end-to-end times are synchronised.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..pipeline.preview import orbit_cameras
from ..rendering import render
from ..scene import Camera, Cameras, GaussianScene
from .stats import time_call

STAGES = ("text", "denoise_step", "vae_decode", "decode_3d", "render", "save", "generate", "e2e_no_preview",
          "e2e_with_preview")
BACKGROUND = (1.0, 1.0, 1.0)  # the preview's


@dataclass(frozen=True)
class RunSettings:
    prompt: str
    seed: int
    num_steps: int | None  # None: the model's default
    preview_frames: int
    preview_size: int
    device: str


def fresh_prompt(prompt: str, index: int) -> str:
    """``prompt`` with its first space widened to ``index + 1`` spaces: the same text once the
    pipelines' whitespace cleaning has run (same tokens, same output), but a string their
    embedding caches (keyed by the exact string) have not seen, so the text stage costs what a
    new prompt costs. A prompt without a space is returned as is (its text time is then a
    cache hit after the first run)."""
    head, space, tail = prompt.partition(" ")
    return head + " " * (index + 1) + tail if space else prompt


def preview_camera(cameras: Cameras, size: int) -> Camera:
    """The first view of the preview orbit: the first predicted camera, longer side ``size``."""
    return orbit_cameras(cameras, 1, size)[0]


def render_view(scene: GaussianScene, camera: Camera) -> torch.Tensor:  # -> [H, W, 3] in [0, 1]
    with torch.inference_mode():
        return render(scene.prune(), camera, backend="auto", background=BACKGROUND).color


def generate(model, settings: RunSettings, index: int = 0):
    """The bench's generation number ``index`` (0: the reference) on ``model``."""
    return model.generate(fresh_prompt(settings.prompt, index), seed=settings.seed, num_steps=settings.num_steps)


def one_run(model, settings: RunSettings, workdir: Path, index: int) -> tuple[dict[str, float], object]:
    """Seconds per stage (``STAGES``) of generation number ``index``, and its result."""
    generate_s, result = time_call(lambda: generate(model, settings, index), device=settings.device)
    timings, steps = result.timings, result.settings["num_steps"]
    camera = preview_camera(result.cameras, settings.preview_size)
    render_s, _ = time_call(lambda: render_view(result.scene, camera), device=settings.device)
    save_s, _ = time_call(lambda: result.save(workdir / "plain", preview=False, overwrite=True))
    preview_s, _ = time_call(lambda: result.save(workdir / "preview", overwrite=True,
                                                 preview_frames=settings.preview_frames,
                                                 preview_size=settings.preview_size))
    shutil.rmtree(workdir, ignore_errors=True)
    return {"text": timings["text"], "denoise_step": timings["denoise"] / steps, "vae_decode": timings["vae_decode"],
            "decode_3d": timings["decode_3d"], "render": render_s, "save": save_s, "generate": generate_s,
            "e2e_no_preview": generate_s + save_s, "e2e_with_preview": generate_s + preview_s}, result


def measure_runs(model, settings: RunSettings, *, repeats: int, warmup: int,
                 workdir: Path) -> tuple[dict[str, list[float]], object]:
    """Every stage's seconds over ``repeats`` runs after ``warmup`` untimed ones, and the first
    timed run's result (for the agreement check)."""
    for index in range(1, warmup + 1):  # 0 is the reference generation's
        one_run(model, settings, workdir, index)
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    first = None
    for index in range(warmup + 1, warmup + repeats + 1):
        seconds, result = one_run(model, settings, workdir, index)
        first = result if first is None else first
        for stage in STAGES:
            samples[stage].append(seconds[stage])
    return samples, first
