"""World clips in the shapes each stage trains on.

Every clip is addressed by (split, index) and rendered on demand (``WorldDataset.sample``):
the VAE and the text-to-video half see it at the video size (``NanoConfig``: 96²), the
reconstruction network at its own input size (84²) — two renders of the same scene with
exact intrinsics, rather than a resize, so depth stays exact. Indices are disjoint per use
(``OFFSETS``) so that, e.g., the layer-search set is not part of what the network trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from ..world import WorldConfig, WorldDataset, collate_world, orbit_cameras
from ..world.scene_graph import SceneGraph

# first index of each use's stream in the train split (streams are far shorter than the gaps)
OFFSETS = {"vae": 0, "recon": 10_000_000, "latents": 20_000_000, "layer_search": 30_000_000,
           "classifier": 40_000_000, "stitch": 50_000_000, "reward": 60_000_000, "eval": 0}


class WorldClips:
    """Batches of world clips for one (split, seed) at the video and the network sizes."""

    def __init__(self, split: str, *, seed: int, video_size: int, network_size: int,
                 config: WorldConfig | None = None) -> None:
        self.video = WorldDataset(split, seed=seed, height=video_size, width=video_size, config=config)
        self.network = WorldDataset(split, seed=seed, height=network_size, width=network_size, config=config)

    def video_batch(self, indices: Sequence[int]) -> dict:
        """Samples at the video size, collated (``video`` [B, 3, T, H, W] in [-1, 1], captions, ...)."""
        return collate_world([self.video.sample(i) for i in indices])

    def network_batch(self, indices: Sequence[int]) -> dict:
        """Samples at the network's input size, collated (video, depth, camtoworld, intrinsics, ...)."""
        return collate_world([self.network.sample(i) for i in indices])


def stream_indices(use: str, step: int, batch: int) -> list[int]:
    """The clip indices of training step ``step`` of ``use``: fresh scenes at every step."""
    start = OFFSETS[use] + step * batch
    return list(range(start, start + batch))


def random_windows(videos: Tensor, frames: int, generator: torch.Generator) -> Tensor:
    """A random window of ``frames`` consecutive frames per clip ([B, 3, T, H, W] -> [B, 3, frames, H, W])."""
    total = videos.shape[2]
    starts = torch.randint(0, total - frames + 1, (videos.shape[0],), generator=generator)
    return torch.stack([v[:, s:s + frames] for v, s in zip(videos, starts.tolist())])


def random_crops(videos: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """The same random ``size``² window of every frame, per clip ([B, 3, T, H, W] -> [B, 3, T, size, size]).
    Crop offsets are multiples of 8 (the VAE's spatial stride), so latent cells stay aligned."""
    H, W = videos.shape[-2:]
    if size >= min(H, W):
        return videos
    ys = torch.randint(0, (H - size) // 8 + 1, (videos.shape[0],), generator=generator) * 8
    xs = torch.randint(0, (W - size) // 8 + 1, (videos.shape[0],), generator=generator) * 8
    return torch.stack([v[..., y:y + size, x:x + size] for v, y, x in zip(videos, ys.tolist(), xs.tolist())])


def novel_views(dataset: WorldDataset, index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Views half-way between the orbit's input frames (never seen as input): frames
    [3, T-1, H, W] in [-1, 1], camtoworld [T-1, 4, 4], pixel K [T-1, 3, 3]."""
    from ..world import render

    sample = dataset.sample(index)
    scene = SceneGraph.from_dict(sample["scene"])
    orbit = scene.orbit
    step = orbit.span_deg / max(orbit.num_frames - 1, 1)
    between = dataclasses.replace(orbit, start_azimuth_deg=orbit.start_azimuth_deg + step / 2,
                                  span_deg=orbit.span_deg - step, num_frames=orbit.num_frames - 1)
    cameras = orbit_cameras(between, dataset.width, dataset.height)
    out = render(scene, cameras, dataset.config)
    rgb = torch.round(out.rgb * 255) / 127.5 - 1  # 8-bit, as the input frames are
    return rgb.transpose(0, 1).contiguous(), cameras.camtoworld, cameras.K
