"""Sections 1 and 2 of the report: the reconstruction network from RGB frames and the stitched
decoder from VAE latents, measured on the same held-out clips and novel views.

Every decoded clip is scored as ``training.recon.evaluate`` scores it (``score_output``): the
ground truth is brought into the network's frame (first camera, metric scale) by
``make_targets``, the novel views' cameras by ``align_views``; PSNR of the Gaussians rendered
at those cameras (official raster settings, the config's background) against the world's
renders; depth abs-rel and δ1 over valid pixels; camera translation, rotation and FoV errors.
The one difference: images are rendered by ``vist3a_rt.render`` (the C++ rasterizer where
built, which matches the torch reference to ~1e-7) rather than the differentiable reference.

Stitched decoding follows the runtime: VAE latents are the posterior means of the clip's
video-size render, raw (not normalised); the frames beside them are the VAE's decoding of
those latents, resized to the network size (``generator.latents.resize_frames``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..decoder.network import DecoderOutput
from ..errors import Vist3AInputError
from ..generator import latents as latent_ops
from ..rendering import RasterConfig, render
from ..scene import Cameras, GaussianScene
from ..training.recon import ReconSettings, _camera_metrics, _depth_metrics, align_views, make_targets, psnr
from .clips import HeldoutClip
from .model import EvalModel

PSNR_TARGET_DB = 1.0  # the stitched decoder should stay within this of the reconstruction network


@dataclass
class EncodedClip:
    latent: Tensor  # [1, 16, T_lat, h, w] raw VAE latents (posterior mean)
    frames: Tensor  # [1, 3, T, S, S] the VAE's decoding, resized to the network size, in [-1, 1]


def render_scene(scene: GaussianScene, cameras: Cameras,
                 background: Tensor,  # [3]
                 ) -> tuple[Tensor, Tensor]:  # -> colour [V, 3, H, W] in [0, 1], accumulated opacity [V, H, W]
    """``scene`` at every camera with the official raster settings (the fastest rasterizer available)."""
    out = render(scene, cameras, background=background, config=RasterConfig())
    return out.color.permute(0, 3, 1, 2), out.alpha[..., 0]


@torch.no_grad()
def score_output(output: DecoderOutput, clip: HeldoutClip, background: Tensor) -> dict[str, float]:
    """Novel-view PSNR, depth and camera errors of one decoded clip (see the module docstring)."""
    c = clip.clip
    targets = make_targets(c.frames[None], c.depth[None], c.camtoworld[None], c.K[None], ReconSettings().scale)
    camtoworld = align_views(clip.novel.camtoworld[None].float(), targets.anchor, targets.scale)[0]
    truth = (clip.novel.frames.float().transpose(0, 1) + 1) / 2  # [V, 3, H, W]
    cameras = Cameras(camtoworld, clip.novel.K.float(), truth.shape[-1], truth.shape[-2])
    rendered, _ = render_scene(output.to_scene(0), cameras, background)
    return {"psnr": float(psnr(rendered, truth).mean()),
            **_depth_metrics(output.depth[0, ..., 0].float(), targets.depth[0], targets.valid[0]),
            **_camera_metrics(output, targets)}


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]} if rows else {}


@torch.no_grad()
def encode_clips(model: EvalModel, clips: list[HeldoutClip]) -> list[EncodedClip]:
    """Raw VAE latents of each clip's video and the frames the runtime would pass beside them."""
    encoded = []
    for clip in clips:
        latent = model.vae.encode(clip.video[None].to(model.vae.dtype)).latent_dist.mean.float()
        encoded.append(EncodedClip(latent, decoded_frames(model, latent)))
    return encoded


def decoded_frames(model: EvalModel, latent: Tensor) -> Tensor:  # [1, 16, T_lat, h, w] raw -> [1, 3, T, S, S]
    """The VAE's decoding of ``latent`` resized to the network size (as the runtime does)."""
    return latent_ops.resize_frames(latent_ops.decode(model.vae, latent), model.sizes.network)


@torch.no_grad()
def reconstruction_section(model: EvalModel, clips: list[HeldoutClip]) -> dict:
    """1. The unstitched network on each clip's exact network-size frames."""
    rows = [score_output(model.reconstruction(clip.clip.frames[None]), clip, model.background) for clip in clips]
    return {"num_clips": len(rows), "metrics": mean_rows(rows),
            "per_clip": [{"index": c.index, **row} for c, row in zip(clips, rows)]}


@torch.no_grad()
def stitched_section(model: EvalModel, clips: list[HeldoutClip], encoded: list[EncodedClip],
                     reconstruction: dict) -> dict:
    """2. The stitched decoder from the same clips' VAE latents (with the VAE-decoded frames, as at
    run time; ``psnr_world_frames``: with the world's exact frames instead), against section 1."""
    rows = []
    for clip, enc in zip(clips, encoded):
        row = score_output(model.stitched(enc.latent, enc.frames), clip, model.background)
        exact = score_output(model.stitched(enc.latent, clip.clip.frames[None]), clip, model.background)
        rows.append({**row, "psnr_world_frames": exact["psnr"]})
    metrics = mean_rows(rows)
    gap = reconstruction["metrics"]["psnr"] - metrics["psnr"] if rows else float("nan")
    return {"num_clips": len(rows), "metrics": metrics, "psnr_gap_db": gap, "target_db": PSNR_TARGET_DB,
            "within_target": bool(gap <= PSNR_TARGET_DB),
            "per_clip": [{"index": c.index, **row} for c, row in zip(clips, rows)],
            "layer_search": layer_search_table(model.layer_search_file)}


def layer_search_table(path: Path) -> dict:
    """A ``layer_search.json`` (``LayerSearchResult.to_dict``), or a note that it is absent."""
    if not path.is_file():
        return {"present": False, "note": f"absent: no {path.name} beside the weights ({path.parent})"}
    try:
        table = json.loads(path.read_text())
        ranking = [{"rank": int(r["rank"]), "block": str(r["block"]), "mse": float(r["mse"])} for r in table["ranking"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise Vist3AInputError(f"{path} is not a layer-search table (LayerSearchResult.to_dict): {err!r}") from None
    return {"present": True, "file": str(path), "best_block": table.get("best_block"), "ranking": ranking,
            **{key: table[key] for key in ("num_videos", "conv_spec", "ridge", "padding") if key in table}}


__all__ = ["PSNR_TARGET_DB", "EncodedClip", "decoded_frames", "encode_clips", "layer_search_table", "mean_rows",
           "reconstruction_section", "render_scene", "score_output", "stitched_section"]
