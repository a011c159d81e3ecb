"""The procedural world VIST3A-nano is trained on: 1-3 coloured primitives on a checkered ground,
a caption generated from the scene graph, 13 orbit cameras, and exact renders (RGB, depth,
object ids) by analytic ray casting.

    from vist3a_rt.training.world import WorldDataset, sample_scene, orbit_cameras, render

    scene = sample_scene(seed=7, split="train")          # SceneGraph, caption included
    frames = render(scene, orbit_cameras(scene.orbit, 64, 64))   # rgb [T,3,H,W], depth, object_ids
    for sample in WorldDataset("train", height=64, width=64):   # endless, deterministic stream
        ...

Conventions: world z up, ground z = 0; relations hold in the first frame's view; the orbit spans
``WorldConfig.orbit_span_deg`` (120 deg) over 13 frames at a constant distance; the held-out
split is a fixed hash rule over compositions (``compositions``); ``VOCABULARY`` lists every word
a caption can use.
"""

from .cache import DiskCache
from .captions import VOCABULARY, make_caption
from .compositions import SPLITS, heldout_compositions, scene_compositions, uses_heldout
from .config import WorldConfig
from .dataset import WorldDataset, collate_world, scene_seed
from .orbit import orbit_cameras
from .render import RENDER_VERSION, WorldRender, render
from .sampling import camera_coordinates, relation_holds, sample_scene
from .scene_graph import COLOURS, RELATIONS, SHAPES, SIZES, Orbit, Primitive, Relation, SceneGraph

__all__ = [
    "COLOURS", "RELATIONS", "RENDER_VERSION", "SHAPES", "SIZES", "SPLITS", "VOCABULARY", "DiskCache", "Orbit",
    "Primitive", "Relation", "SceneGraph", "WorldConfig", "WorldDataset", "WorldRender", "camera_coordinates",
    "collate_world", "heldout_compositions", "make_caption", "orbit_cameras", "relation_holds", "render",
    "sample_scene", "scene_compositions", "scene_seed", "uses_heldout",
]
