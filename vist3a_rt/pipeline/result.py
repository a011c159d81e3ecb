"""``GenerationResult``: what one prompt produced, and ``save`` to a self-describing folder.

A saved folder holds ``scene.ply`` (standard 3DGS layout, SH degree <= 3 so viewers read it),
``cameras.json`` (the decoder's predicted cameras), ``preview.mp4`` (or ``preview.gif`` when
ffmpeg is unavailable; see ``preview.py``) and ``meta.json`` (prompt, seed, settings, timings,
tool versions, scene statistics, the files written). The folder appears atomically: it is built
as a hidden sibling ``.<name>.tmp-<random>`` and renamed onto ``out_dir`` only when complete, so an
error or Ctrl-C leaves no ``out_dir`` (and no temporary folder) behind.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import Vist3AInputError
from ..scene import Cameras, GaussianScene

META_FORMAT = "vist3a-rt/generation"
META_VERSION = 1
PREVIEW_FPS = 24
_OPTIONAL_LIBRARIES = ("diffusers", "transformers", "peft", "onnxruntime", "tensorrt")


# The preview is rendered by the fastest rasterizer available; with only the torch reference
# on a CPU it costs ~0.3 s per 256² frame, so the default is a short, small orbit.
DEFAULT_PREVIEW_FRAMES = 24
DEFAULT_PREVIEW_SIZE = 192


@dataclass(repr=False)
class GenerationResult:
    """One generation: the scene and cameras, how long each stage took, and how to reproduce it."""

    prompt: str
    scene: GaussianScene
    cameras: Cameras
    timings: dict[str, float]  # seconds per stage
    settings: dict  # steps, guidance, sampler, frames, size, negative prompt, seed, model, backend, ...
    seed: int
    latents: torch.Tensor | None = None  # [B, 16, T_lat, h, w] final (normalised) latents; not saved
    frames: torch.Tensor | None = None  # [B, 3, T, H, W] decoded video in [-1, 1]; not saved

    def __repr__(self) -> str:
        stages = ", ".join(f"{k}={v:.2f}s" for k, v in self.timings.items())
        views = f"{len(self.cameras)}x{self.cameras.width}x{self.cameras.height}"
        return (f"GenerationResult(prompt={self.prompt!r}, seed={self.seed}, scene={self.scene!r}, "
                f"cameras={views}, timings=[{stages}])")

    def save(self, out_dir: str | Path, *, preview: bool = True, preview_frames: int = DEFAULT_PREVIEW_FRAMES,
             preview_size: int = DEFAULT_PREVIEW_SIZE, overwrite: bool = False) -> Path:
        """Write the folder described in the module docstring to ``out_dir``; return its path.

        A non-empty existing ``out_dir`` is an error unless ``overwrite=True``, which replaces it
        (the old folder is moved aside, the new one renamed in, then the old one deleted). Missing
        parent folders are created. With ``preview=True`` but no video writer installed, the
        preview is skipped with a warning (and noted in meta.json) rather than losing the scene.
        """
        out_dir = Path(out_dir)
        if preview:
            _check_int("preview_frames", preview_frames, 1)
            _check_int("preview_size", preview_size, 2)
        _check_destination(out_dir, overwrite)
        tmp = _make_temp_dir(out_dir)
        try:
            self._write_contents(tmp, preview, preview_frames, preview_size)
            _move_into_place(tmp, out_dir)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise Vist3AInputError(f"cannot save to {out_dir}: {err}") from err
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out_dir

    # --- contents ----------------------------------------------------------------------------

    def _write_contents(self, folder: Path, preview: bool, preview_frames: int, preview_size: int) -> None:
        self.scene.save_ply(folder / "scene.ply")
        self.cameras.save_json(folder / "cameras.json")
        files = ["scene.ply", "cameras.json"]
        timings = dict(self.timings)
        preview_info = None
        if preview:
            preview_info = self._write_preview(folder, preview_frames, preview_size, timings)
            if "file" in preview_info:
                files.append(preview_info["file"])
        files.append("meta.json")
        meta = self._meta(timings, preview_info, files)
        (folder / "meta.json").write_text(json.dumps(meta, indent=1, default=_json_default) + "\n")

    def _write_preview(self, folder: Path, num_frames: int, size: int, timings: dict) -> dict:
        from .preview import available_video_formats, render_preview, write_video

        if not available_video_formats():
            reason = "no video writer installed (pip install imageio-ffmpeg, or Pillow for GIF)"
            warnings.warn(f"preview skipped: {reason}", RuntimeWarning, stacklevel=3)
            return {"skipped": reason}
        start = time.perf_counter()
        frames = render_preview(self.scene, self.cameras, num_frames=num_frames, size=size)
        timings["preview_render"] = time.perf_counter() - start
        start = time.perf_counter()
        path = write_video(frames, folder / "preview", fps=PREVIEW_FPS)
        timings["preview_encode"] = time.perf_counter() - start
        return {"file": path.name, "frames": num_frames, "width": frames.shape[2],
                "height": frames.shape[1], "fps": PREVIEW_FPS}

    def _meta(self, timings: dict, preview_info: dict | None, files: list[str]) -> dict:
        return {
            "format": META_FORMAT, "format_version": META_VERSION,
            "prompt": self.prompt, "seed": self.seed, "settings": self.settings, "timings": timings,
            "versions": library_versions(),
            "scene": scene_stats(self.scene),
            "cameras": {"num_views": len(self.cameras), "width": self.cameras.width,
                        "height": self.cameras.height},
            "preview": preview_info, "files": files,
        }


# --- metadata ------------------------------------------------------------------------------------

def library_versions() -> dict[str, str]:
    """vist3a-rt, Python, platform, torch, numpy, and the optional libraries already imported."""
    from .. import __version__

    versions = {"vist3a-rt": __version__, "python": platform.python_version(),
                "platform": platform.platform(), "torch": torch.__version__, "numpy": np.__version__}
    for name in _OPTIONAL_LIBRARIES:
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = str(getattr(module, "__version__", "unknown"))
    return versions


def scene_stats(scene: GaussianScene) -> dict:
    """Counts and bounds of a scene, as saved (the PLY keeps SH degree <= 3)."""
    means = scene.means.detach().to("cpu", torch.float64)
    empty = len(scene) == 0
    return {"num_gaussians": len(scene), "sh_degree": scene.sh_degree,
            "ply_sh_degree": min(scene.sh_degree, 3),
            "bbox_min": None if empty else means.min(dim=0).values.tolist(),
            "bbox_max": None if empty else means.max(dim=0).values.tolist()}


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value).removeprefix("torch.")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return value.item()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    return repr(value)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise Vist3AInputError(f"{name} must be an int >= {minimum}, got {value!r}")


# --- the atomic folder ---------------------------------------------------------------------------

def _check_destination(out_dir: Path, overwrite: bool) -> None:
    try:
        link, other = out_dir.is_symlink(), out_dir.exists() and not out_dir.is_dir()
        non_empty = not (link or other) and out_dir.is_dir() and any(out_dir.iterdir())
    except OSError as err:
        raise Vist3AInputError(f"cannot save to {out_dir}: {err.strerror or err}") from err
    if link or other:
        what = "a symbolic link" if link else "not a folder"
        raise Vist3AInputError(f"cannot save to {out_dir}: it exists and is {what}")
    if non_empty and not overwrite:
        raise Vist3AInputError(f"cannot save to {out_dir}: the folder exists and is not empty "
                               "(pass overwrite=True to replace it)")


def _make_temp_dir(out_dir: Path) -> Path:
    parent = out_dir.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{out_dir.name}.tmp-{secrets.token_hex(6)}"
        tmp.mkdir()
    except OSError as err:
        raise Vist3AInputError(f"cannot save to {out_dir}: cannot create a folder in {parent} "
                               f"({err.strerror or err})") from err
    return tmp


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` onto ``out_dir``; an existing ``out_dir`` is moved aside first and deleted
    after, or moved back if the rename fails (so it is never lost)."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = tmp.with_name(f".{out_dir.name}.old-{secrets.token_hex(6)}")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
