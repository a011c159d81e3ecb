"""``WorldDataset``: a deterministic stream of rendered orbit clips with captions.

Sample ``index`` of a data set is a pure function of (``seed``, ``index``, ``split``, image size,
``WorldConfig``): its scene seed is ``scene_seed(seed, index)`` and everything after that is
deterministic, so a stream can be resumed at any index, sharded over data-loader workers
(worker w of n takes indices w, w + n, ...), or cached on disk without changing a bit: RGB is
quantised to 8 bits before it is returned (as a video file would be) and that is what the cache
holds.

Each sample is a dict:

| key          | value                                                                 |
|--------------|-----------------------------------------------------------------------|
| video        | float32 [3, T, H, W] in [-1, 1] (uint8 / 127.5 - 1)                   |
| depth        | float32 [T, H, W] camera-space z (0 where nothing is hit: sky)        |
| object_ids   | int64 [T, H, W]: -1 sky, 0 ground, 1 + i for ``scene["objects"][i]``  |
| camtoworld   | float32 [T, 4, 4] OpenCV camera-to-world                             |
| intrinsics   | float32 [T, 3, 3] pixel K for H x W                                   |
| cameras      | the same as a ``vist3a_rt.Cameras``                                   |
| caption      | str                                                                   |
| scene        | the scene graph as a JSON-able dict (``SceneGraph.from_dict`` reads it) |
| index, scene_seed | int                                                              |

``collate_world`` batches them (tensors stacked, the rest as lists).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ...errors import Vist3AInputError
from .cache import DiskCache
from .compositions import SPLITS
from .config import WorldConfig
from .orbit import orbit_cameras
from .render import RENDER_VERSION, render
from .sampling import sample_scene
from .scene_graph import SceneGraph


def scene_seed(seed: int, index: int) -> int:
    """The scene seed of sample ``index`` in the stream of ``seed`` (63-bit, well mixed)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def render_sample_arrays(scene: SceneGraph, height: int, width: int, config: WorldConfig) -> dict[str, np.ndarray]:
    """What the cache stores: uint8 video [3,T,H,W], float32 depth, int8 ids, the scene as JSON."""
    out = render(scene, orbit_cameras(scene.orbit, width, height), config)
    video = np.round(out.rgb.numpy().transpose(1, 0, 2, 3) * np.float32(255)).astype(np.uint8)
    return {"video": video, "depth": out.depth.numpy(), "object_ids": out.object_ids.numpy().astype(np.int8),
            "scene": np.array(json.dumps(scene.to_dict(), sort_keys=True))}


class WorldDataset(IterableDataset):
    """Rendered clips of the procedural world for ``split`` ("train" | "heldout").

    ``length=None`` streams forever from ``start``; otherwise indices ``start .. start+length-1``.
    ``cache_dir`` enables the disk cache (``cache_max_bytes``, ``cache_policy``: see ``DiskCache``).
    """

    def __init__(self, split: str = "train", *, seed: int = 0, height: int = 64, width: int = 64,
                 config: WorldConfig | None = None, start: int = 0, length: int | None = None,
                 cache_dir: str | Path | None = None, cache_max_bytes: int = 2**30,
                 cache_policy: str = "stop") -> None:
        if split not in SPLITS:
            raise Vist3AInputError(f"split must be one of {SPLITS}, got {split!r}")
        for name, value, minimum in (("height", height, 1), ("width", width, 1), ("seed", seed, 0),
                                     ("start", start, 0), ("length", 0 if length is None else length, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise Vist3AInputError(f"{name} must be an int >= {minimum}, got {value!r}")
        self.split, self.seed, self.height, self.width = split, seed, height, width
        self.config = config or WorldConfig()
        self.start, self.length = start, length
        self.cache = None if cache_dir is None else DiskCache(cache_dir, cache_max_bytes, cache_policy)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless WorldDataset (length=None) has no len()")
        return self.length

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        index = self.start + worker
        while self.length is None or index < self.start + self.length:
            yield self.sample(index)
            index += workers

    def cache_key(self, index: int) -> str:
        """The disk-cache file name (without ``.npz``) of sample ``index``: a hash of all it depends on."""
        spec = {"render_version": RENDER_VERSION, "config": self.config.to_dict(), "split": self.split,
                "scene_seed": scene_seed(self.seed, index), "height": self.height, "width": self.width}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]

    def arrays(self, index: int) -> dict[str, np.ndarray]:
        """The stored form of sample ``index`` (from the cache when there)."""
        key = self.cache_key(index)
        arrays = self.cache.get(key) if self.cache is not None else None
        if arrays is None:
            scene = sample_scene(scene_seed(self.seed, index), self.split, self.config)
            arrays = render_sample_arrays(scene, self.height, self.width, self.config)
            if self.cache is not None:
                self.cache.put(key, arrays)
        return arrays

    def sample(self, index: int) -> dict:
        """Sample ``index`` as the dict described in the module docstring."""
        arrays = self.arrays(index)
        scene = SceneGraph.from_dict(json.loads(str(arrays["scene"])))
        cameras = orbit_cameras(scene.orbit, self.width, self.height)
        # numpy, not torch, for the conversions: see render's docstring on thread stalls
        video = arrays["video"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        return {"video": torch.from_numpy(video), "depth": torch.from_numpy(arrays["depth"]),
                "object_ids": torch.from_numpy(arrays["object_ids"].astype(np.int64)),
                "camtoworld": cameras.camtoworld, "intrinsics": cameras.K, "cameras": cameras,
                "caption": scene.caption, "scene": scene.to_dict(), "index": index, "scene_seed": scene.seed}


def collate_world(batch: list[dict]) -> dict:
    """Stack the tensors of ``WorldDataset`` samples; cameras, captions, scenes and ints as lists."""
    out = {}
    for key in batch[0]:
        values = [sample[key] for sample in batch]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
