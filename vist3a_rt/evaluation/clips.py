"""Held-out clips of the procedural world at a model's sizes, and their captions as prompts.

Clip ``i`` is sample ``i`` of ``WorldDataset("heldout", seed=seed)`` — a composition training
never saw — rendered twice with exact intrinsics: at the video size (what the VAE encodes) and
at the network's input size (what the reconstruction network reads, with depth and cameras),
plus the novel views half-way between its orbit frames (``training.nano.data.novel_views``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..training.nano.data import novel_views
from ..training.recon import Clip, Views
from ..training.world import WorldConfig, WorldDataset, sample_scene, scene_seed
from .model import ModelSizes


@dataclass
class HeldoutClip:
    index: int
    caption: str
    video: Tensor  # [3, T, S_video, S_video] in [-1, 1]: the VAE's input
    clip: Clip  # frames [3, T, S, S] in [-1, 1], depth, camtoworld, K at the network size S
    novel: Views  # [3, T-1, S, S] views between the input frames, their cameras


def world_config(sizes: ModelSizes) -> WorldConfig:
    return WorldConfig(num_frames=sizes.frames)


def heldout_clips(sizes: ModelSizes, count: int, *, seed: int = 0) -> list[HeldoutClip]:
    """The first ``count`` held-out clips of the stream ``seed``."""
    world = world_config(sizes)
    video = WorldDataset("heldout", seed=seed, height=sizes.video, width=sizes.video, config=world)
    network = WorldDataset("heldout", seed=seed, height=sizes.network, width=sizes.network, config=world)
    clips = []
    for index in range(count):
        sample = network.sample(index)
        clips.append(HeldoutClip(
            index=index, caption=sample["caption"], video=video.sample(index)["video"],
            clip=Clip(sample["video"], sample["depth"], sample["camtoworld"], sample["intrinsics"]),
            novel=Views(*novel_views(network, index))))
    return clips


def heldout_prompts(sizes: ModelSizes, count: int, *, seed: int = 0) -> list[str]:
    """The captions of the first ``count`` held-out clips (scene graphs only; nothing rendered)."""
    world = world_config(sizes)
    return [sample_scene(scene_seed(seed, index), "heldout", world).caption for index in range(count)]


__all__ = ["HeldoutClip", "heldout_clips", "heldout_prompts", "world_config"]
