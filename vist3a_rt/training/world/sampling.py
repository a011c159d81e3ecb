"""``sample_scene(seed, split)``: a random scene graph, laid out so that its caption is true.

1. Symbolic: 1-3 objects (the count drawn once, with ``WorldConfig.object_count_weights``;
   distinct colours), shapes and sizes; object i > 0 gets one relation to
   an earlier object. "on top of" needs a cube or cylinder below, nothing else on it yet, and an
   object no larger than it. Drawn again until its compositions fit the split (``compositions``).
2. Layout in the first camera's ground-plane frame (u = its right, v = its forward): left/right
   of = one footprint-sum plus a gap along u, in front/behind = the same along -v/+v (with some
   sideways jitter so the back object shows), on top = centred on the top face. Then turned to
   a random start azimuth and shifted against the ground texture; the orbit targets the
   centre of the layout's bounding box.
3. Checked, or laid out again: footprints do not overlap (except along a stack), every
   relation holds in frame 0 (projected x of the bounding-box centres differ by 5% of the focal
   length; depths by 0.3), every object's centre stays in view in every frame, and in frame 0
   every object shows at least 40% of its unoccluded pixels.

The generator is ``numpy.random.default_rng(seed)`` and nothing else is random: the same seed,
split and ``WorldConfig`` give the same scene graph on every machine.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ...errors import Vist3AInputError
from .captions import make_caption
from .compositions import SPLITS, uses_heldout
from .config import WorldConfig
from .orbit import horizontal_axes, orbit_cameras
from .render import camera_rays, trace
from .scene_graph import COLOURS, FLAT_TOPPED, SHAPES, SIZES, Orbit, Primitive, Relation, SceneGraph

_SYMBOLIC_ATTEMPTS, _LAYOUT_ATTEMPTS = 500, 20
_CHECK_SIZE = 48  # pixels per side of the frame-0 visibility check
MIN_VISIBLE_FRACTION = 0.4
_MIN_CLEARANCE = 0.05  # between footprints of objects that are not stacked
_VIEW_MARGIN = 0.85  # object centres stay within this fraction of the half field of view


def _footprint(kind: tuple[str, str, str]) -> float:  # (shape, colour, size)
    return Primitive(*kind, (0.0, 0.0, 0.0)).footprint_radius


def _allowed_relations(types, parent: int, child_size: str, stacked_on: set[int]) -> list[str]:
    shape, _, size = types[parent]
    can_stack = shape in FLAT_TOPPED and parent not in stacked_on and SIZES[child_size] <= SIZES[size]
    return ["left_of", "right_of", "in_front_of", "behind"] + (["on_top_of"] if can_stack else [])


def _sample_symbolic(rng: np.random.Generator, count: int) -> tuple[list, list[Relation]]:
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    types = [(SHAPES[int(rng.integers(len(SHAPES)))], str(c), ("small", "large")[int(rng.integers(2))])
             for c in colours]
    relations, stacked_on = [], set()
    for child in range(1, count):
        parent = int(rng.integers(child))
        options = _allowed_relations(types, parent, types[child][2], stacked_on)
        relation = options[int(rng.integers(len(options)))]
        if relation == "on_top_of":
            stacked_on.add(parent)
        relations.append(Relation(child, relation, parent))
    return types, relations


def _local_layout(rng, types, relations) -> list[tuple[float, float, float]] | None:
    """(u, v, bottom z) per object in the first camera's ground frame, or None if they collide."""
    radius = [_footprint(t) for t in types]
    height = [2 * SIZES[size] for _, _, size in types]
    places = [(0.0, 0.0, 0.0)]
    for rel in relations:
        u, v, base = places[rel.object]
        r_sum = radius[rel.object] + radius[rel.subject]
        sep = r_sum + rng.uniform(0.1, 0.3)
        along = rng.uniform(-0.3, 0.3) * min(radius[rel.object], radius[rel.subject])
        across = rng.uniform(-0.6, 0.6) * max(radius[rel.object], radius[rel.subject])
        places.append({"left_of": (u - sep, v + along, 0.0), "right_of": (u + sep, v + along, 0.0),
                       "in_front_of": (u + across, v - sep, 0.0), "behind": (u + across, v + sep, 0.0),
                       "on_top_of": (u, v, base + height[rel.object])}[rel.relation])
    support = {r.subject: r.object for r in relations if r.relation == "on_top_of"}

    def below(i: int) -> set[int]:
        return {support[i]} | below(support[i]) if i in support else set()

    for i in range(len(places)):
        for j in range(i):
            if j in below(i) or i in below(j):
                continue
            if math.dist(places[i][:2], places[j][:2]) < radius[i] + radius[j] + _MIN_CLEARANCE:
                return None
    return places


def _layout(rng, types, relations, config: WorldConfig) -> SceneGraph | None:
    places = _local_layout(rng, types, relations)
    if places is None:
        return None
    azimuth = float(rng.uniform(0.0, 360.0))
    right, forward = horizontal_axes(azimuth)
    world = [u * right + v * forward for u, v, _ in places]
    radius = [_footprint(t) for t in types]
    low = np.min([w[:2] - r for w, r in zip(world, radius)], 0)
    high = np.max([w[:2] + r for w, r in zip(world, radius)], 0)
    shift = rng.uniform(-1.0, 1.0, 2) * config.ground_tile - (low + high) / 2
    objects = tuple(Primitive(shape, colour, size, (float(w[0] + shift[0]), float(w[1] + shift[1]), base),
                              float(rng.uniform(0.0, math.pi / 2)) if shape == "cube" else 0.0)
                    for (shape, colour, size), w, (_, _, base) in zip(types, world, places))
    top = max(o.top for o in objects)
    target = (float(shift[0] + (low[0] + high[0]) / 2), float(shift[1] + (low[1] + high[1]) / 2), top / 2)
    orbit = Orbit(target, config.camera_distance, float(rng.uniform(*config.elevation_deg)), azimuth,
                  config.orbit_span_deg, config.fov_y_deg, config.num_frames)
    return SceneGraph(objects, tuple(relations), orbit)


def camera_coordinates(scene: SceneGraph) -> np.ndarray:  # [T, P, 3]
    """Bounding-box centres of ``scene.objects`` in every orbit camera's OpenCV coordinates."""
    c2w = orbit_cameras(scene.orbit, 2, 2).camtoworld.double().numpy()  # [T, 4, 4]
    centres = np.array([o.centre for o in scene.objects])  # [P, 3]
    return np.einsum("tpi,tij->tpj", centres[None] - c2w[:, None, :3, 3], c2w[:, :3, :3])


def relation_holds(scene: SceneGraph, relation: Relation, cam: np.ndarray | None = None) -> bool:
    """Whether ``relation`` is true in frame 0 (with the margins the sampler demands)."""
    cam = camera_coordinates(scene)[0] if cam is None else cam[0]
    s, o = cam[relation.subject], cam[relation.object]
    sx, ox = s[0] / s[2], o[0] / o[2]
    top, below = scene.objects[relation.subject], scene.objects[relation.object]
    stacked = top.position[2] == below.top and top.position[:2] == below.position[:2]
    return {"left_of": sx < ox - 0.05, "right_of": sx > ox + 0.05,
            "in_front_of": s[2] < o[2] - 0.3, "behind": s[2] > o[2] + 0.3, "on_top_of": stacked,
            }[relation.relation]


def _in_view(scene: SceneGraph, cam: np.ndarray) -> bool:
    half = math.tan(math.radians(scene.orbit.fov_y_deg) / 2) * _VIEW_MARGIN
    return bool((cam[..., 2] > 0).all() and (np.abs(cam[..., :2] / cam[..., 2:]) <= half).all())


def _visible(scene: SceneGraph) -> bool:
    cameras = orbit_cameras(replace(scene.orbit, num_frames=1, span_deg=0.0), _CHECK_SIZE, _CHECK_SIZE)
    t, _ = trace(scene.objects, camera_rays(cameras))  # [1 + P, 1, H, W]
    ids = t.argmin(0)
    for i in range(1, t.shape[0]):
        alone = int(np.isfinite(t[i]).sum())
        if alone < 4 or int((ids == i).sum()) < MIN_VISIBLE_FRACTION * alone:
            return False
    return True


def sample_scene(seed: int, split: str = "train", config: WorldConfig | None = None) -> SceneGraph:
    """The scene graph (caption included) drawn from ``seed`` for ``split`` ("train" | "heldout")."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise Vist3AInputError(f"seed must be a non-negative int, got {seed!r}")
    if split not in SPLITS:
        raise Vist3AInputError(f"split must be one of {SPLITS}, got {split!r}")
    config = config or WorldConfig()
    rng = np.random.default_rng(int(seed))
    weights = np.asarray(config.object_count_weights, dtype=np.float64)
    count = 1 + int(rng.choice(3, p=weights / weights.sum()))  # kept through the retries: no bias
    for _ in range(_SYMBOLIC_ATTEMPTS):
        types, relations = _sample_symbolic(rng, count)
        if uses_heldout([(colour, shape) for shape, colour, _ in types], relations) != (split == "heldout"):
            continue
        for _ in range(_LAYOUT_ATTEMPTS):
            scene = _layout(rng, types, relations, config)
            if scene is None:
                continue
            cam = camera_coordinates(scene)
            if all(relation_holds(scene, r, cam) for r in scene.relations) and _in_view(scene, cam) \
                    and _visible(scene):
                scene = replace(scene, seed=int(seed), split=split)
                return replace(scene, caption=make_caption(scene, rng))
    raise RuntimeError(f"no {split} scene found for seed {seed} under {config}")  # not seen in practice
